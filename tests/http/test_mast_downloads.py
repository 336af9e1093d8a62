"""MAST download jobs end to end: the API, the embedded downloader and dispatcher, the event
store and read models, against a local server of real FITS files (SQLite and PostgreSQL)."""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import astropy
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from infra.settings import Settings
from tests.conftest import grant, make_settings
from tests.support.mast_server import MastTestServer

FITS_DIR = Path(astropy.__file__).parent / "io" / "fits" / "tests" / "data"
FITS_FILES = ("o4sp040b0_raw.fits", "test0.fits")


@pytest.fixture
def mast_server() -> Iterator[MastTestServer]:
    s = MastTestServer()
    for name in FITS_FILES:
        s.add(name, (FITS_DIR / name).read_bytes())
    s.add("generated.bin", os.urandom(3 * 1024 * 1024 + 17))
    s.start()
    yield s
    s.stop()


def download_settings(tmp_path: Path, store_kind: str, dbname: str | None,
                      server: MastTestServer, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "mast_base_url": server.url, "download_root": tmp_path / "downloads",
        "download_chunk_bytes": 64 * 1024, "download_checkpoint_chunks": 2,
        "download_backoff_base_s": 0.01, "download_backoff_max_s": 0.05,
        "download_poll_s": 0.1, "missing_target_deadline_s": 0.5,
        "embedded_audit_chain": False, "embedded_results_automation": False}
    values.update(overrides)
    return make_settings(tmp_path, store_kind, dbname, **values)


@pytest.fixture
def dl_settings(tmp_path: Path, store_kind: str, pg_database_if_needed: str | None,
                mast_server: MastTestServer) -> Settings:
    return download_settings(tmp_path, store_kind, pg_database_if_needed, mast_server)


@pytest.fixture
def dl_client(dl_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(dl_settings), headers=grant(dl_settings)) as c:
        yield c


def product(name: str, size: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"data_uri": f"mast:HST/product/{name}", "size": size, "obs_id": "O4SP040B0",
            "obsid": "2003738726", "product_type": "SCIENCE", **extra}


def start(client: TestClient, products: list[dict[str, Any]], destination: str = "hst/run1",
          chunked: bool = True, **extra: Any) -> str:
    path = "/mast/download/start-chunked" if chunked else "/mast/download/start"
    r = client.post(path, json={"products": products, "destination": destination, **extra})
    assert r.status_code == 202, r.text
    return str(r.json()["ids"]["download_job_id"])


def wait_status(client: TestClient, job_id: str, statuses: set[str],
                timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = client.get(f"/mast/download/progress/{job_id}")
        if r.status_code == 200:
            body = r.json()
            if body["status"] in statuses and not body["pending"]:
                return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not {statuses}: {body}")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("chunked", [True, False])
def test_fits_files_downloaded_verified_and_registered(
        dl_client: TestClient, dl_settings: Settings, mast_server: MastTestServer,
        chunked: bool) -> None:
    sizes = {n: len(mast_server.files[n]) for n in FITS_FILES}
    job_id = start(dl_client, [product(n, sizes[n]) for n in FITS_FILES], chunked=chunked)
    job = wait_status(dl_client, job_id, {"completed"})
    assert job["files_completed"] == 2 and job["bytes_done"] == job["bytes_total"] == sum(
        sizes.values())
    assert job["percent"] == 100.0
    for f in job["files"]:
        data = mast_server.files[f["filename"]]
        on_disk = (dl_settings.download_dir / "hst/run1" / f["filename"]).read_bytes()
        assert sha(on_disk) == sha(data) == f["sha256"]
        assert f["status"] == "complete" and f["fits"]["hdus"] >= 1
        assert f["data_uri"] == f"mast:HST/product/{f['filename']}"
    assert not list((dl_settings.download_dir / "hst/run1").glob("*.part"))
    # the stis raw file carries no checksums; test0 neither: verified means readable HDUs
    raw = next(f for f in job["files"] if f["filename"] == "o4sp040b0_raw.fits")
    assert raw["fits"]["hdus"] == 7
    # registered as raw data files, in the files read model
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        files = dl_client.get("/raw_data_files", params={"instrument": "MAST"}).json()["items"]
        if len(files) == 2 and not any(f["pending"] for f in files):
            break
        time.sleep(0.05)
    assert sorted(f["name"] for f in files) == sorted(FITS_FILES)
    assert {f["relative_path"] for f in files} == {f"hst/run1/{n}" for n in FITS_FILES}
    assert all(f["checksum"]["algorithm"] == "sha256" for f in files)


def test_checkpoints_are_events_not_per_chunk(dl_client: TestClient,
                                              mast_server: MastTestServer) -> None:
    size = len(mast_server.files["generated.bin"])
    job_id = start(dl_client, [product("generated.bin", size)], register_files=False)
    wait_status(dl_client, job_id, {"completed"})
    ledger = dl_client.app.state.ledger  # type: ignore[attr-defined]
    recorded = ledger.store.recorder.select_events(uuid.UUID(job_id))
    topics = [r.topic.rpartition(".")[2] for r in recorded]
    chunks = -(-size // (64 * 1024))
    assert topics[0] == "Requested" and topics[-1] == "Completed"
    assert topics.count("FileStarted") == 1 and topics.count("FileCompleted") == 1
    # a checkpoint every 2 chunks of 64 KB (or 5 s), never one per chunk
    assert 1 <= topics.count("Checkpointed") <= chunks // 2 + 1


def test_pause_resume_and_cancel(dl_client: TestClient, dl_settings: Settings,
                                 mast_server: MastTestServer) -> None:
    mast_server.faults["generated.bin"] = {"delay": 0.02}
    size = len(mast_server.files["generated.bin"])
    job_id = start(dl_client, [product("generated.bin", size)], register_files=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        body = dl_client.get(f"/mast/download/progress/{job_id}").json()
        if body["bytes_done"] > 0:
            break
        time.sleep(0.05)
    assert body["status"] == "running" and 0 < body["bytes_done"] < size
    assert body["files"][0]["bytes_per_s"] and body["eta_s"] is not None
    r = dl_client.post(f"/mast/download/pause/{job_id}")
    assert r.status_code == 202, r.text
    paused = wait_status(dl_client, job_id, {"paused"})
    # the file in progress is paused too, at its checkpoint: no speed, no ETA
    assert paused["files"][0]["status"] == "paused" and paused["files"][0]["eta_s"] is None
    time.sleep(0.5)
    sent = mast_server.sent["generated.bin"]
    time.sleep(0.5)
    assert mast_server.sent["generated.bin"] == sent  # the downloader stopped
    resumable = dl_client.get("/mast/download/resumable").json()["items"]
    assert [j["id"] for j in resumable] == [job_id]
    mast_server.faults["generated.bin"] = {}
    assert dl_client.post(f"/mast/download/resume/{job_id}").status_code == 202
    done = wait_status(dl_client, job_id, {"completed"})
    on_disk = (dl_settings.download_dir / "hst/run1/generated.bin").read_bytes()
    assert sha(on_disk) == sha(mast_server.files["generated.bin"])
    # resumed from the checkpoint: the server sent again at most what was past it on disk
    # (one checkpoint) and the parts in flight or held in memory (one chunk a connection)
    in_flight = dl_settings.download_connections_per_file * 64 * 1024
    assert mast_server.sent["generated.bin"] - size <= 2 * 64 * 1024 + in_flight
    assert paused["bytes_done"] <= done["bytes_done"]
    # a completed job can be neither paused nor cancelled
    r = dl_client.post(f"/mast/download/pause/{job_id}")
    assert r.status_code == 409 and r.json()["errors"]
    r = dl_client.delete(f"/mast/download/{job_id}")
    assert r.status_code == 409


def test_cancel_and_retention_purge(dl_client: TestClient, dl_settings: Settings,
                                    mast_server: MastTestServer) -> None:
    import asyncio
    from datetime import UTC, datetime, timedelta

    mast_server.faults["generated.bin"] = {"delay": 0.05}
    job_id = start(dl_client, [product("generated.bin")], destination="tmp/cancel",
                   register_files=False)
    partial = dl_settings.download_dir / "tmp/cancel/generated.bin.part"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not partial.exists():
        time.sleep(0.05)
    r = dl_client.delete(f"/mast/download/{job_id}", params={"reason": "wrong product"})
    assert r.status_code == 202
    job = wait_status(dl_client, job_id, {"cancelled"})
    assert job["reason"] == "wrong product"
    assert job["files"][0]["status"] in ("cancelled", "pending")  # never "downloading"
    assert partial.exists()  # kept until the retention has passed
    ledger = dl_client.app.state.ledger  # type: ignore[attr-defined]
    downloader = ledger.downloader
    loop = downloader._loop
    fut = asyncio.run_coroutine_threadsafe(
        downloader.purge_expired(datetime.now(UTC) + timedelta(days=6)), loop)
    assert fut.result(10) == 0 and partial.exists()
    fut = asyncio.run_coroutine_threadsafe(
        downloader.purge_expired(datetime.now(UTC) + timedelta(days=8)), loop)
    assert fut.result(10) == 1
    assert not partial.exists()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        job = dl_client.get(f"/mast/download/progress/{job_id}").json()
        if job["partials_purged"] and not job["pending"]:
            break
        time.sleep(0.05)
    assert job["partials_purged"] and job["bytes_done"] == 0


def test_5xx_storm_fails_the_job_with_a_reason_and_resume_finishes_it(
        dl_client: TestClient, mast_server: MastTestServer) -> None:
    mast_server.faults["test0.fits"] = {"fail": 50, "fail_status": 503}
    job_id = start(dl_client, [product("test0.fits")], register_files=False)
    job = wait_status(dl_client, job_id, {"failed"})
    assert "HTTP 503 (after 3 retries)" in job["reason"]
    assert job["files"][0]["status"] == "failed"
    mast_server.faults["test0.fits"] = {}
    assert dl_client.post(f"/mast/download/resume/{job_id}").status_code == 202
    wait_status(dl_client, job_id, {"completed"})


def test_changed_file_restarts_from_zero(dl_client: TestClient, dl_settings: Settings,
                                         mast_server: MastTestServer) -> None:
    mast_server.faults["generated.bin"] = {"delay": 0.03}
    job_id = start(dl_client, [product("generated.bin")], register_files=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if dl_client.get(f"/mast/download/progress/{job_id}").json()["bytes_done"] > 0:
            break
        time.sleep(0.05)
    dl_client.post(f"/mast/download/pause/{job_id}")
    wait_status(dl_client, job_id, {"paused"})
    new = os.urandom(2 * 1024 * 1024)
    mast_server.add("generated.bin", new, modified=1_800_000_000.0)
    mast_server.faults["generated.bin"] = {}
    dl_client.post(f"/mast/download/resume/{job_id}")
    job = wait_status(dl_client, job_id, {"completed"})
    assert job["files"][0]["restarts"] == 1 and job["files"][0]["size"] == len(new)
    on_disk = (dl_settings.download_dir / "hst/run1/generated.bin").read_bytes()
    assert sha(on_disk) == sha(new)


def test_a_pause_and_resume_in_quick_succession_stop_the_running_transfer(
        dl_client: TestClient, dl_settings: Settings, mast_server: MastTestServer) -> None:
    """A pause followed at once by a resume (the read model may never show the pause) still
    stops the transfer under way: the resumed job reads the file again and sees it changed."""
    mast_server.faults["generated.bin"] = {"delay": 0.03}
    job_id = start(dl_client, [product("generated.bin")], chunked=False, register_files=False)
    deadline = time.monotonic() + 20
    while dl_client.get(f"/mast/download/progress/{job_id}").json()["bytes_done"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    new = os.urandom(2 * 1024 * 1024)
    mast_server.add("generated.bin", new, modified=1_800_000_000.0)  # the old body goes on
    assert dl_client.post(f"/mast/download/pause/{job_id}").status_code == 202
    assert dl_client.post(f"/mast/download/resume/{job_id}").status_code == 202
    mast_server.faults["generated.bin"] = {}
    job = wait_status(dl_client, job_id, {"completed", "failed"})
    assert job["status"] == "completed", job
    assert job["files"][0]["restarts"] == 1 and job["files"][0]["size"] == len(new)
    on_disk = (dl_settings.download_dir / "hst/run1/generated.bin").read_bytes()
    assert sha(on_disk) == sha(new)


def test_a_damaged_fits_file_fails_the_job(dl_client: TestClient,
                                           mast_server: MastTestServer) -> None:
    data = bytearray(mast_server.files["test0.fits"])
    mast_server.add("broken.fits", bytes(data[:2880 + 100]))  # a header and a torn block
    job_id = start(dl_client, [product("broken.fits")])
    job = wait_status(dl_client, job_id, {"failed"})
    assert "broken.fits" in job["reason"] and "FITS" in job["reason"]


@pytest.mark.parametrize("destination", ["../outside", "/etc", "a/../../b", "a\\b", "C:/x"])
def test_destination_outside_the_root_is_refused(dl_client: TestClient,
                                                 destination: str) -> None:
    r = dl_client.post("/mast/download/start", json={
        "products": [product("test0.fits")], "destination": destination})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["status_code"] == 422 and body["errors"]
    assert any("destination" in e["field"] for e in body["errors"])


@pytest.mark.parametrize("body", [
    {"destination": "x"},  # neither products nor obs_id
    {"products": [], "destination": "x"},
    {"products": [{"data_uri": "http://evil/x"}], "destination": "x"},
    {"products": [{"data_uri": "mast:HST/x.fits", "filename": "../x.fits"}]},
    {"products": [{"data_uri": "mast:HST/x.fits", "size": -1}]},
    {"products": [{"data_uri": "mast:HST/x.fits"}], "obs_id": "X"},
    {"products": [{"data_uri": "mast:HST/x.fits"}], "chunk_size": 10},
])
def test_bad_download_requests_are_4xx(dl_client: TestClient, body: dict[str, Any]) -> None:
    r = dl_client.post("/mast/download/start-chunked", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["errors"]


def test_unknown_jobs_are_404(dl_client: TestClient) -> None:
    job = "0b7f8a52-1c1e-4a53-8f0e-2f8e0d7c9a11"
    assert dl_client.get(f"/mast/download/progress/{job}").status_code == 404
    for path in (f"/mast/download/pause/{job}", f"/mast/download/resume/{job}"):
        assert dl_client.post(path).status_code == 404
    assert dl_client.delete(f"/mast/download/{job}").status_code == 404
    assert dl_client.get("/mast/download/progress/not-a-uuid").status_code == 422


def test_pending_job_shows_before_it_is_projected(dl_settings: Settings,
                                                  mast_server: MastTestServer) -> None:
    settings = dl_settings.model_copy(update={"embedded_workers": False})
    with TestClient(create_app(settings), headers=grant(settings)) as client:
        job_id = start(client, [product("test0.fits", 8640)])
        body = client.get(f"/mast/download/progress/{job_id}").json()
        assert body["pending"] is True and body["command_status"] == "accepted"
        assert body["status"] == "requested" and body["files"][0]["filename"] == "test0.fits"
        items = client.get("/mast/download/jobs").json()["items"]
        assert items[0]["id"] == job_id and items[0]["pending"]


def test_downloader_in_health_and_metrics(dl_client: TestClient,
                                          mast_server: MastTestServer) -> None:
    job_id = start(dl_client, [product("test0.fits")], register_files=False)
    wait_status(dl_client, job_id, {"completed"})
    health = dl_client.get("/health").json()
    assert health["downloader"]["running"] is True
    assert health["downloader"]["bytes_fetched"] >= len(mast_server.files["test0.fits"])
    ready = dl_client.get("/ready").json()
    assert ready["checks"]["downloader"]["running"] is True
    metrics = dl_client.get("/metrics").text
    assert "obsledger_download_bytes_total" in metrics
    assert "obsledger_download_active_jobs" in metrics
