# ruff: noqa: F811  (the fixtures of test_mast_downloads are imported, then asked for)
"""What a download must never do, whatever the server or the request says (issue 16, item 11):
follow a redirect off the allowed hosts, spin on a name the file system refuses, or write over
a completed, registered file. Against the local MAST test server (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from commands.downloads import DownloadFileSpec, RequestDownload
from infra.settings import Settings
from tests.conftest import grant
from tests.http.test_mast_downloads import (  # the fixtures too
    dl_client,  # noqa: F401
    dl_settings,  # noqa: F401
    download_settings,
    mast_server,  # noqa: F401
    product,
    sha,
    start,
    wait_status,
)
from tests.support.mast_server import MastTestServer


@pytest.fixture
def internal() -> Iterator[MastTestServer]:
    """Another HTTP server on this machine: what a redirect must not reach."""
    s = MastTestServer()
    s.add("internal-secret", b"the internal service's secret\n")
    s.start()
    yield s
    s.stop()


def _redirect_to(server: MastTestServer, name: str, target: MastTestServer,
                 target_name: str) -> None:
    server.add(name, b"never served")
    server.faults[name] = {"redirect": f"{target.url}/api/v0.1/Download/file?uri=mast:x/"
                                       f"{target_name}"}


def test_a_redirect_to_another_host_is_not_followed(
        dl_client: TestClient, dl_settings: Settings, mast_server: MastTestServer,
        internal: MastTestServer) -> None:
    _redirect_to(mast_server, "redirected.fits", internal, "internal-secret")
    job_id = start(dl_client, [product("redirected.fits")], register_files=False)
    job = wait_status(dl_client, job_id, {"failed"})
    assert "not an allowed download host" in job["reason"], job["reason"]
    assert f"127.0.0.1:{internal.port}" in job["reason"]
    assert internal.requests == []  # nothing was asked of the other host
    directory = dl_settings.download_dir / "hst/run1"
    assert not (directory / "redirected.fits").exists()
    assert not (directory / "redirected.fits.part").exists() or \
        (directory / "redirected.fits.part").stat().st_size == 0


def test_redirects_within_the_mast_host_and_to_configured_hosts_are_followed(
        tmp_path: Any, store_kind: str, pg_database_if_needed: str | None,
        mast_server: MastTestServer, internal: MastTestServer) -> None:
    internal.add("mirror.fits", mast_server.files["test0.fits"])
    _redirect_to(mast_server, "moved.fits", mast_server, "test0.fits")  # same host
    _redirect_to(mast_server, "mirrored.fits", internal, "mirror.fits")  # a download host
    settings = download_settings(tmp_path, store_kind, pg_database_if_needed, mast_server,
                                 mast_download_hosts=f"http://127.0.0.1:{internal.port}")
    with TestClient(create_app(settings), headers=grant(settings)) as client:
        job_id = start(client, [product("moved.fits"), product("mirrored.fits")],
                       register_files=False)
        job = wait_status(client, job_id, {"completed", "failed"})
    assert job["status"] == "completed", job["reason"]
    for name in ("moved.fits", "mirrored.fits"):
        data = (settings.download_dir / "hst/run1" / name).read_bytes()
        assert sha(data) == sha(mast_server.files["test0.fits"])


@pytest.mark.parametrize("name", ["a" * 246 + ".fits",  # 251 bytes: <name>.part is 256
                                  "b" * 250 + ".fits",
                                  "é" * 124 + ".fits",  # 253 bytes in UTF-8
                                  "nul\x00.fits", "line\nbreak.fits"])
def test_a_file_name_the_file_system_refuses_is_422(dl_client: TestClient,
                                                    name: str) -> None:
    r = dl_client.post("/mast/download/start-chunked", json={
        "products": [product("test0.fits", filename=name)], "destination": "x"})
    assert r.status_code == 422, r.text
    assert any("products.0.filename" in e["field"] + e["message"]
               for e in r.json()["errors"]), r.text
    # …and a data_uri whose last part is the name
    r = dl_client.post("/mast/download/start-chunked", json={
        "products": [{"data_uri": f"mast:HST/product/{name}"}], "destination": "x"})
    assert r.status_code == 422, r.text
    r = dl_client.post("/mast/download/start", json={
        "products": [product("test0.fits")], "destination": "d" * 256})
    assert r.status_code == 422, r.text


def test_the_longest_file_name_is_downloaded(dl_client: TestClient, dl_settings: Settings,
                                             mast_server: MastTestServer) -> None:
    name = "c" * 245 + ".fits"  # 250 bytes: <name>.part is exactly 255
    mast_server.add(name, mast_server.files["test0.fits"])
    job_id = start(dl_client, [product(name)], register_files=False)
    assert wait_status(dl_client, job_id, {"completed", "failed"})["status"] == "completed"
    assert (dl_settings.download_dir / "hst/run1" / name).exists()


def test_a_file_system_error_fails_the_job_instead_of_looping(
        dl_client: TestClient, dl_settings: Settings, mast_server: MastTestServer,
        caplog: pytest.LogCaptureFixture) -> None:
    """The file system refuses the file (here its directory is a file; a name too long, a
    full disk): the downloader fails the job once with the reason, and does not start it
    again and again (it did, ~600 ERROR lines a second)."""
    blocked = dl_settings.download_dir / "blocked"
    blocked.parent.mkdir(parents=True, exist_ok=True)
    blocked.write_bytes(b"a file where the job's directory should be")
    with caplog.at_level(logging.INFO, logger="obsledger.downloader"):
        job_id = start(dl_client, [product("test0.fits")], destination="blocked/run",
                       register_files=False)
        job = wait_status(dl_client, job_id, {"failed"})
        time.sleep(1.0)  # a looping downloader would log hundreds of lines meanwhile
    assert job["reason"].startswith("test0.fits: ") and "directory" in job["reason"].lower(), \
        job["reason"]
    lines = [r for r in caplog.records
             if r.name.startswith("obsledger") and job_id in r.getMessage()]
    assert 1 <= len(lines) <= 3, [r.getMessage() for r in lines]
    assert dl_client.get(f"/mast/download/progress/{job_id}").json()["status"] == "failed"
    assert mast_server.requests == []  # refused before anything was fetched


def test_a_second_job_for_the_same_file_is_refused_and_never_overwrites(
        dl_client: TestClient, dl_settings: Settings, mast_server: MastTestServer) -> None:
    request = {"products": [product("test0.fits")], "destination": "hst/run1"}
    r = dl_client.post("/mast/download/start-chunked", json=request,
                       headers={"Idempotency-Key": "dl-once"})
    assert r.status_code == 202, r.text
    first = r.json()["ids"]["download_job_id"]
    done = wait_status(dl_client, first, {"completed"})
    # a retry of the same request is its first answer, not a conflict with itself
    again = dl_client.post("/mast/download/start-chunked", json=request,
                           headers={"Idempotency-Key": "dl-once"})
    assert again.status_code == 202 and again.json()["ids"]["download_job_id"] == first
    recorded = done["files"][0]["sha256"]
    path = dl_settings.download_dir / "hst/run1/test0.fits"
    assert sha(path.read_bytes()) == recorded
    # the archive's file changes; a second job for the same place is refused at once
    mast_server.add("test0.fits", mast_server.files["o4sp040b0_raw.fits"],
                    modified=1_800_000_000.0)
    for url in ("/mast/download/start", "/mast/download/start-chunked"):
        r = dl_client.post(url, json={"products": [product("test0.fits")],
                                      "destination": "hst/run1"})
        assert r.status_code == 409, r.text
        assert r.json()["errors"][0]["field"] == "destination"
        assert "never written over" in r.json()["detail"]
    # another destination is fine
    other = start(dl_client, [product("test0.fits")], destination="hst/run2",
                  register_files=False)
    wait_status(dl_client, other, {"completed"})
    assert sha(path.read_bytes()) == recorded  # the registered file is untouched


def test_a_job_claiming_the_same_file_is_refused_while_the_first_runs(
        dl_client: TestClient, mast_server: MastTestServer) -> None:
    mast_server.faults["generated.bin"] = {"delay": 0.05}
    first = start(dl_client, [product("generated.bin")], register_files=False)
    r = dl_client.post("/mast/download/start", json={"products": [product("generated.bin")],
                                                      "destination": "hst/run1"})
    assert r.status_code == 409, r.text
    assert first in r.json()["detail"]
    assert dl_client.delete(f"/mast/download/{first}").status_code == 202
    wait_status(dl_client, first, {"cancelled"})
    mast_server.faults["generated.bin"] = {}
    second = start(dl_client, [product("generated.bin")], register_files=False)
    assert wait_status(dl_client, second, {"completed"})["status"] == "completed"


def test_the_downloader_never_writes_over_a_completed_file(
        dl_client: TestClient, dl_settings: Settings, mast_server: MastTestServer) -> None:
    """Two jobs accepted for one file (a race of two requests, or journaled before the
    check): the second fails; the first's file and its recorded sha256 stand."""
    first = start(dl_client, [product("test0.fits")], register_files=False)
    recorded = wait_status(dl_client, first, {"completed"})["files"][0]["sha256"]
    path = dl_settings.download_dir / "hst/run1/test0.fits"
    mast_server.add("test0.fits", b"another file" * 1000, modified=1_800_000_000.0)
    ledger = dl_client.app.state.ledger  # type: ignore[attr-defined]
    spec = DownloadFileSpec.model_construct(
        url=f"{mast_server.url}/api/v0.1/Download/file?uri=mast:HST/product/test0.fits",
        filename="test0.fits", data_uri=None, obs_id=None, obsid=None, product_type=None,
        instrument=None, size=None)
    job_id = uuid.uuid4()
    prechecks = ledger.commands.prechecks
    saved = dict(prechecks)
    prechecks.clear()  # as if it raced past the acceptance check
    try:
        asyncio.run(ledger.commands.submit(
            "download_job.request", RequestDownload.model_construct(
                id=job_id, files=[spec], destination="hst/run1", mode="chunked",
                chunk_size=64 * 1024, register_files=False),
            actor="tests", correlation_id=None, idempotency_key=None))
    finally:
        prechecks.update(saved)
    ledger.downloader.wake()
    job = wait_status(dl_client, str(job_id), {"failed", "completed"})
    assert job["status"] == "failed" and "never written over" in job["reason"], job
    assert sha(path.read_bytes()) == recorded
