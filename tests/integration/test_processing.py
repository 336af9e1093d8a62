"""The processing pipeline through HTTP, with real components: the embedded worker, the
local object store (and the S3 one on a real moto_server), real FITS frames (the SAAO CCD frame
from the ccdproc wheel, WFPC2's test0.fits from astropy's), SQLite and PostgreSQL.

ingest → process → catalog → products → download → lineage (JSON and PROV-JSON); plan records
nothing; 4xx for what cannot be done; cancel mid-job leaves no product; a processing run the
results scheduler starts goes through the same worker and ends READY with its outputs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import ccdproc
import numpy as np
import pytest
from astropy.io import fits
from fastapi.testclient import TestClient
from prov.model import ProvDocument

from api.app import create_app
from api.dashboard.models import NightSummary
from domain.raw_data import raw_data_file_id
from infra.object_store import Area
from infra.settings import Settings
from tests.conftest import ROOT, grant, make_settings, settings_env
from tests.http.test_api import applied
from tests.http.test_mast_downloads import FITS_DIR
from tests.support.s3_server import ACCESS_KEY_ID, SECRET_ACCESS_KEY

SAAO = Path(ccdproc.__file__).parent / "tests" / "data" / "a8280271.fits"  # SAAO 1.0m CCD
WFPC2 = FITS_DIR / "test0.fits"
FINAL = {"succeeded", "failed", "cancelled"}


def proc_settings(tmp_path: Path, store_kind: str, dbname: str | None,
                  **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "missing_target_deadline_s": 0.5, "processing_poll_s": 0.1,
        "processing_progress_interval_s": 0.2, "result_debounce_s": 0.0,
        "results_scheduler_interval_s": 0.2, **overrides}
    return make_settings(tmp_path, store_kind, dbname, **values)


@pytest.fixture
def ps(tmp_path: Path, store_kind: str, pg_database_if_needed: str | None) -> Settings:
    return proc_settings(tmp_path, store_kind, pg_database_if_needed)


@pytest.fixture
def pc(ps: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(ps), headers=grant(ps)) as c:
        yield c


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def register(c: TestClient, settings: Settings, source: Path, name: str,
             file_type: str = "raw_science", instrument: str = "SAAO-CCD",
             executed_obs_unit_id: str | None = None) -> str:
    """A real FITS file where the instrument host keeps raw data, registered."""
    relative = f"2026-11-30/{name}"
    dest = settings.raw_data_dir / relative
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    body: dict[str, Any] = {
        "name": name, "relative_path": relative, "size": dest.stat().st_size,
        "checksum": {"algorithm": "sha256", "value": sha256(dest.read_bytes())},
        "instrument": instrument, "file_type": file_type}
    if executed_obs_unit_id:
        body["executed_obs_unit_id"] = executed_obs_unit_id
    return str(applied(c.post("/raw_data_files?wait=true", json=body))["ids"][
        "raw_data_file_id"])


def submit(c: TestClient, path: str, body: dict[str, Any]) -> str:
    r = c.post(path, json=body)
    assert r.status_code == 202, r.text
    return str(r.json()["ids"]["processing_job_id"])


def wait_job(c: TestClient, job_id: str, statuses: set[str] = FINAL,
             timeout: float = 90.0, **fields: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        r = c.get(f"/ops/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if job["status"] in statuses and not job["pending"] and all(
                job.get(k) == v for k, v in fields.items()):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {statuses}: {job}")


def test_ingest_process_catalog_download_and_lineage(pc: TestClient, ps: Settings) -> None:
    unit = applied(pc.post("/executed_obs_units/start?wait=true", json={
        "obs_unit_id": "OU-SAAO-1", "instrument": "SAAO-CCD",
        "start_time": datetime(2026, 11, 30, 1, 0, tzinfo=UTC).isoformat()}))
    unit_id = unit["ids"]["executed_obs_unit_id"]
    files = [register(pc, ps, SAAO, f"saao_{i}.fits", executed_obs_unit_id=unit_id)
             for i in range(3)]
    # ingest: each file validated, its header facts recorded
    ingest = wait_job(pc, submit(pc, "/ops/ingest", {"file_ids": files}))
    assert ingest["status"] == "succeeded", ingest
    facts = {o["file_id"]: o["metadata"] for o in ingest["outputs"]}
    assert set(facts) == set(files)
    assert list(facts[files[0]]["shape"]) == list(fits.getdata(SAAO).shape)
    assert [s["name"] for s in ingest["steps"]] == [f"ingest saao_{i}.fits" for i in range(3)]
    assert all(s["status"] == "completed" for s in ingest["steps"])
    # process: products built, not yet catalogued
    job = wait_job(pc, submit(pc, "/ops/process", {
        "file_ids": files, "algorithm": "ccd_stack", "parameters": {"sigma": 3.0}}))
    assert job["status"] == "succeeded", job
    assert job["algorithm_version"] == "1.1.0" and job["attempts"] == 1
    assert job["progress"] == 1.0 and job["duration_s"] is not None
    assert {"combine", "detect", "write_products", "fetch inputs", "upload products"} <= {
        s["name"] for s in job["steps"]}
    assert {o["kind"] for o in job["outputs"]} == {"combined_image", "source_catalog"}
    assert set(job["software"]) == {"obsledger", "numpy", "scipy", "astropy"}
    assert pc.get("/products").json()["total"] == 0  # built is not catalogued
    built = pc.get("/products", params={"status": "built", "job_id": job["id"]}).json()
    assert built["total"] == 2
    ids = [p["id"] for p in built["items"]]
    counts = pc.get("/products/counts").json()
    assert counts["status"] == {"built": 2} and counts["total"] == 2
    assert counts["kind"] == {"combined_image": 1, "source_catalog": 1}
    assert counts["bytes"] == sum(p["size"] for p in built["items"]) > 0
    # catalog, published
    cat = wait_job(pc, submit(pc, "/ops/catalog", {"product_ids": ids, "publish": True}))
    assert cat["status"] == "succeeded", cat
    page = pc.get("/products", params={"min_position": cat["last_position"]}).json()
    assert page["total"] == 2 and {p["status"] for p in page["items"]} == {"published"}
    counts = pc.get("/products/counts").json()
    assert counts["status"] == {"published": 2} and counts["pending_commands"] == 0
    summary = pc.get("/dashboard/summary").json()  # the jobs on the dashboard, typed
    assert {j["id"] for j in summary["processing_jobs"]["items"]} == {
        ingest["id"], job["id"], cat["id"]}
    NightSummary.model_validate(summary)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert pc.get("/products/counts", params={"built_from": future}).json()["total"] == 0
    image = next(p for p in page["items"] if p["kind"] == "combined_image")
    assert image["media_type"] == "application/fits" and image["metrics"]["nframes"] == 3
    assert {"noise", "background", "source_count", "rejected_pixels"} <= set(image["metrics"])
    detail = pc.get(f"/products/{image['id']}").json()
    assert {i["file_id"] for i in detail["inputs"]} == set(files)
    # download: the file streamed from the local object store, as recorded
    r = pc.get(f"/products/{image['id']}/download")
    assert r.status_code == 200 and r.headers["content-type"] == "application/fits"
    assert sha256(r.content) == image["checksum"]["value"] and len(r.content) == image["size"]
    assert r.content[:9] == b"SIMPLE  ="
    # lineage: product → job → algorithm, parameters, software, raw files → execution
    for product in page["items"]:
        graph = pc.get(f"/products/{product['id']}/lineage").json()
        nodes = {n["id"]: n for n in graph["nodes"]}
        assert graph["root"] == f"product:{product['id']}"
        assert nodes["algorithm:ccd_stack:1.1.0"]["attributes"]["version"] == "1.1.0"
        assert nodes[f"parameters:{product['id']}"]["attributes"]["sigma"] == 3.0
        assert {n["attributes"]["name"] for n in nodes.values() if n["kind"] == "software"} \
            == {"obsledger", "numpy", "scipy", "astropy"}
        raw = [n for n in nodes.values() if n["kind"] == "raw_data_file"]
        assert {n["attributes"]["file_id"] for n in raw} == set(files)
        assert all(n["attributes"]["checksum"] == sha256(SAAO.read_bytes()) for n in raw)
        assert nodes[f"executed_obs_unit:{unit_id}"]["attributes"]["obs_unit_id"] == \
            "OU-SAAO-1"
        edges = {(e["source"], e["relation"], e["target"]) for e in graph["edges"]}
        job_node = f"job:{job['id']}"
        assert (graph["root"], "wasGeneratedBy", job_node) in edges
        assert all((job_node, "used", f"raw_data_file:{f}") in edges for f in files)
        assert {(e["target"], e["attributes"]["role"], e["attributes"]["classified_from"])
                for e in graph["edges"] if e["relation"] == "used"
                and e["target"].startswith("raw_data_file:")} == {
            (f"raw_data_file:{f}", "science", "file_type 'raw_science'") for f in files}
        assert all((f"raw_data_file:{f}", "wasGeneratedBy", f"executed_obs_unit:{unit_id}")
                   in edges for f in files)
        agents = {n["attributes"]["agent_type"]: n for n in nodes.values()
                  if n["kind"] == "agent"}
        assert agents["software"]["label"] == "service:test-automation"  # who requested it
        assert agents["worker"]["label"] == job["completed_by"]  # whose attempt built it
        prov = pc.get(f"/products/{product['id']}/lineage", params={"format": "prov-json"})
        assert prov.status_code == 200
        doc = ProvDocument.deserialize(content=prov.text, format="json")
        assert len(doc.get_records()) >= len(graph["nodes"])
        assert "obsledger" in prov.json()["prefix"]
    # archived later: still published, now archived too
    arc = wait_job(pc, submit(pc, "/ops/catalog", {"product_ids": [image["id"]],
                                                   "archive": True}))
    assert arc["status"] == "succeeded", arc
    archived = pc.get(f"/products/{image['id']}",
                      params={"min_position": arc["last_position"]}).json()
    assert (archived["status"], archived["published"], archived["archived"]) == (
        "archived", True, True)
    assert pc.get("/products", params={"status": "archived"}).json()["total"] == 1
    # every processing read model equals a fresh build from the log
    ledger = pc.app.state.ledger  # type: ignore[attr-defined]
    _, report = ledger.projector.check()
    for model in ("processing_jobs", "processing_job_steps", "data_products",
                  "product_inputs"):
        assert report[model]["rows"] and not (report[model]["missing"] or report[model][
            "extra"] or report[model]["different"]), (model, report[model])


def test_frames_told_apart_by_imagetyp_keep_their_roles(pc: TestClient, ps: Settings) -> None:
    """Eight raw files registered as file_type ``raw_ccd`` (the instrument says nothing more):
    ccd_stack tells bias, flat and science frames apart by their IMAGETYP, and the product's
    inputs, its lineage (JSON and PROV-JSON) and its HISTORY say how each frame was used;
    NCOMBINE counts the 3 science frames, NBIAS and NFLAT the calibration frames."""
    science = fits.getdata(SAAO).astype(np.float32)
    rng = np.random.default_rng(17)
    frames = [("bias", "BIAS", lambda: 300 + rng.normal(0, 5, science.shape))] * 3 + [
        ("flat", "FLAT", lambda: 20000 + rng.normal(0, 100, science.shape))] * 2 + [
        ("science", "object", lambda: science + rng.normal(0, 5, science.shape))] * 3
    (ps.data_dir / "frames").mkdir()
    expected: dict[str, tuple[str, str]] = {}
    for n, (role, imagetyp, make) in enumerate(frames):
        path = ps.data_dir / "frames" / f"{role}_{n}.fits"
        fits.PrimaryHDU(make().astype(np.float32), header=fits.Header(
            {"IMAGETYP": imagetyp, "EXPTIME": 0.0 if role == "bias" else 10.0})).writeto(path)
        expected[register(pc, ps, path, path.name, file_type="raw_ccd")] = (role, imagetyp)
    files = list(expected)
    assert wait_job(pc, submit(pc, "/ops/ingest", {"file_ids": files}))["status"] == "succeeded"
    job = wait_job(pc, submit(pc, "/ops/process", {"file_ids": files}))
    assert job["status"] == "succeeded", job
    assert [s["name"] for s in job["steps"] if s["name"].startswith("master")] == [
        "master_bias", "master_flat"]
    image = pc.get("/products", params={"status": "built", "job_id": job["id"],
                                        "kind": "combined_image"}).json()["items"][0]
    # the product's inputs: each file's role, and what gave it
    detail = pc.get(f"/products/{image['id']}").json()
    assert {i["file_id"]: (i["file_type"], i["role"], i["classified_from"])
            for i in detail["inputs"]} == {
        f: ("raw_ccd", role, f"IMAGETYP '{imagetyp}'") for f, (role, imagetyp) in
        expected.items()}
    # lineage JSON: the run used each file in its role
    graph = pc.get(f"/products/{image['id']}/lineage").json()
    used = {e["target"]: e.get("attributes", {}) for e in graph["edges"]
            if e["relation"] == "used" and e["target"].startswith("raw_data_file:")}
    assert {t.split(":", 1)[1]: a["role"] for t, a in used.items()} == {
        f: role for f, (role, _) in expected.items()}
    # PROV-JSON: prov:role on each usage, readable by the prov package
    prov = pc.get(f"/products/{image['id']}/lineage", params={"format": "prov-json"})
    ProvDocument.deserialize(content=prov.text, format="json")
    usages = [u for u in prov.json()["used"].values()
              if "raw_data_file" in u["prov:entity"]]
    assert sorted(u["prov:role"] for u in usages) == sorted(r for r, _ in expected.values())
    assert {u["obsledger:classified_from"] for u in usages} == {
        "IMAGETYP 'BIAS'", "IMAGETYP 'FLAT'", "IMAGETYP 'object'"}
    # the product itself: keywords, HISTORY with each role and whole hashes
    downloaded = ps.data_dir / "combined_image.fits"
    downloaded.write_bytes(pc.get(f"/products/{image['id']}/download").content)
    header = fits.getheader(downloaded)
    assert (header["NCOMBINE"], header["NBIAS"], header["NDARK"], header["NFLAT"]) == \
        (3, 3, 0, 2)
    history = [str(h) for h in header["HISTORY"]]
    assert "input 1/8 bias bias_0.fits" in history and "input 4/8 flat flat_3.fits" in history
    assert "input 8/8 science science_7.fits" in history
    assert "input 1/8 from IMAGETYP 'BIAS'" in history
    raw = {f: (ps.raw_data_dir / "2026-11-30" / f"{role}_{n}.fits").read_bytes()
           for n, (f, (role, _)) in enumerate(expected.items())}
    assert all(f"sha256:{sha256(data)}" in history for data in raw.values())
    # the read models equal a fresh build from the log, roles included
    ledger = pc.app.state.ledger  # type: ignore[attr-defined]
    _, report = ledger.projector.check()
    assert report["product_inputs"]["rows"] == 16 and not (
        report["product_inputs"]["missing"] or report["product_inputs"]["extra"]
        or report["product_inputs"]["different"]), report["product_inputs"]


def test_plan_answers_without_creating_a_job(pc: TestClient, ps: Settings) -> None:
    files = [register(pc, ps, SAAO, f"plan_{i}.fits") for i in range(2)]
    r = pc.post("/ops/plan", json={"file_ids": files, "algorithm": "ccd_stack"})
    assert r.status_code == 200, r.text
    plan = r.json()
    assert plan["steps"][0] == "classify" and "combine" in plan["steps"]
    assert plan["input_count"] == 2 and plan["input_bytes"] == 2 * SAAO.stat().st_size
    assert [i["size"] for i in plan["inputs"]] == [SAAO.stat().st_size] * 2
    assert {p["kind"] for p in plan["products"]} == {"combined_image", "source_catalog"}
    assert plan["parameters"]["sigma"] == 3.0  # defaults filled in
    assert pc.get("/ops/jobs").json()["items"] == []
    # what cannot be planned is a clear 4xx naming the field
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"file_ids": files, "algorithm": "no_such"}, 422, "algorithm"),
        ({"file_ids": files, "algorithm_version": "9.9.9"}, 422, "version"),
        ({"file_ids": files, "parameters": {"sigma": -1}}, 422, "parameters.sigma"),
        ({"file_ids": files, "parameters": {"nope": 1}}, 422, "parameters.nope"),
        ({"file_ids": [str(UUID(int=7))]}, 404, "file_ids.0"),
        ({"result_ids": [str(UUID(int=8))]}, 404, "result_ids.0"),
        ({}, 422, "body"),
    ]
    for body, status, field in cases:
        r = pc.post("/ops/plan", json=body)
        assert r.status_code == status, (body, r.text)
        assert any(e["field"].startswith(field) for e in r.json()["errors"]), r.json()
    other = register(pc, ps, WFPC2, "wfpc2.fits", instrument="WFPC2")
    r = pc.post("/ops/process", json={"file_ids": [files[0], other]})
    assert r.status_code == 422 and "differ in shape" in r.json()["detail"], r.text
    assert pc.get("/ops/jobs").json()["items"] == []


def test_unknown_and_finished_jobs(pc: TestClient, ps: Settings) -> None:
    unknown = UUID(int=99)
    assert pc.get(f"/ops/jobs/{unknown}").status_code == 404
    assert pc.delete(f"/ops/jobs/{unknown}").status_code == 404
    assert pc.get(f"/products/{unknown}").status_code == 404
    assert pc.get(f"/products/{unknown}/lineage").status_code == 404
    assert pc.get(f"/products/{unknown}/download").status_code == 404
    r = pc.post("/ops/catalog", json={"product_ids": [str(unknown)]})
    assert r.status_code == 404 and r.json()["errors"][0]["field"] == "product_ids.0"
    f = register(pc, ps, WFPC2, "done.fits", instrument="WFPC2")
    job = wait_job(pc, submit(pc, "/ops/ingest", {"file_ids": [f]}))
    assert job["status"] == "succeeded", job
    r = pc.delete(f"/ops/jobs/{job['id']}")
    assert r.status_code == 409 and "succeeded" in r.json()["detail"], r.text
    listed = pc.get("/ops/jobs", params={"kind": "ingest", "status": "succeeded"}).json()
    assert [j["id"] for j in listed["items"]] == [job["id"]]
    assert pc.get("/ops/jobs", params={"kind": "process"}).json()["items"] == []


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_cancel_mid_job_catalogues_nothing(tmp_path: Path, store_kind: str) -> None:
    settings = proc_settings(tmp_path, store_kind, None, processing_progress_interval_s=0.0)
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        files = [register(c, settings, SAAO, f"slow_{i}.fits") for i in range(5)]
        job_id = submit(c, "/ops/process", {
            "file_ids": files, "parameters": {"chunk_rows": 1}, "catalog": True,
            "publish": True})
        wait_job(c, job_id, {"running"}, current_step="combine")
        r = c.delete(f"/ops/jobs/{job_id}", params={"reason": "wrong frames"})
        assert r.status_code == 202, r.text
        job = wait_job(c, job_id)
        assert job["status"] == "cancelled" and job["reason"] == "wrong frames", job
        assert job["outputs"] == [] and job["lease"] is None and job["progress"] < 1.0
        # stopped between two chunks of the combine: that step never completed
        assert (job["steps"][-1]["name"], job["steps"][-1]["status"]) == ("combine",
                                                                          "interrupted")
        assert "write_products" not in {s["name"] for s in job["steps"]}
        for status in (None, "built"):
            assert c.get("/products", params={"status": status} if status else {}
                         ).json()["total"] == 0
        ledger = c.app.state.ledger  # type: ignore[attr-defined]
        assert not list((ledger.settings.object_store_root / Area.PRODUCTS.value).rglob(
            "*.fits"))


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_s3_object_store_end_to_end(tmp_path: Path, store_kind: str, s3_server: Any) -> None:
    """Raw files uploaded to the RAW bucket, products to the PRODUCTS bucket, the download a
    presigned URL fetched with a plain HTTP GET."""
    buckets = s3_server.store().buckets  # names of this test's own
    settings = proc_settings(
        tmp_path, store_kind, None, object_store="s3", s3_endpoint_url=s3_server.endpoint_url,
        s3_access_key_id=ACCESS_KEY_ID, s3_secret_access_key=SECRET_ACCESS_KEY,
        s3_bucket_raw=buckets[Area.RAW], s3_bucket_products=buckets[Area.PRODUCTS],
        s3_bucket_intermediate=buckets[Area.INTERMEDIATE])
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        files = [register(c, settings, SAAO, f"s3_{i}.fits") for i in range(2)]
        job = wait_job(c, submit(c, "/ops/process", {"file_ids": files, "catalog": True}))
        assert job["status"] == "succeeded", job
        ledger = c.app.state.ledger  # type: ignore[attr-defined]
        assert ledger.objects.exists(Area.RAW, "2026-11-30/s3_0.fits")
        product = c.get("/products", params={"job_id": job["id"],
                                             "kind": "combined_image"}).json()["items"][0]
        assert product["status"] == "catalogued" and product["uri"].startswith("s3://")
        r = c.get(f"/products/{product['id']}/download")
        assert r.status_code == 200, r.text
        body = r.json()
        with urllib.request.urlopen(body["url"], timeout=10) as got:
            data = got.read()
            assert "combined_image.fits" in got.headers["Content-Disposition"]
        assert sha256(data) == product["checksum"]["value"] == body["checksum"]["value"]
        # the instrument host's copies gone: the next job reads the RAW bucket's
        shutil.rmtree(settings.raw_data_dir)
        again = wait_job(c, submit(c, "/ops/process", {"file_ids": files}))
        assert again["status"] == "succeeded", again
        metrics = {o["kind"]: o["metrics"] for o in job["outputs"]}
        assert {o["kind"]: o["metrics"] for o in again["outputs"]} == metrics  # same pixels


def dispatched_result(c: TestClient, request_id: int) -> tuple[str, str]:
    """A result dispatched to an execution: (result id, executed obs unit id)."""
    rid = applied(c.post("/observation_results/materialize?wait=true", json={
        "observation_id": 8, "request_id": request_id, "epochs": 1, "samples": 1,
        "copies_mode": "single", "eligible_instruments": ["SAAO-CCD"]}))["ids"][
        "observation_result_ids"][0]
    unit_id = applied(c.post("/executed_obs_units/start?wait=true", json={
        "obs_unit_id": f"OU-8-{request_id}", "instrument": "SAAO-CCD",
        "start_time": datetime(2026, 11, 30, 2, 0, tzinfo=UTC).isoformat()}))["ids"][
        "executed_obs_unit_id"]
    applied(c.post(f"/observation_results/{rid}/dispatch?wait=true",
                   json={"instrument_id": "SAAO-CCD", "executed_obs_unit_id": unit_id}))
    return rid, unit_id


def wait_product_status(c: TestClient, rid: str, status: str) -> dict[str, Any]:
    deadline = time.monotonic() + 90
    result: dict[str, Any] = {}
    while time.monotonic() < deadline:
        result = c.get(f"/observation_results/{rid}").json()
        if result["data_product_status"] == status and not result["pending"]:
            return result
        time.sleep(0.1)
    raise AssertionError(result)


def test_a_scheduler_run_whose_job_fails_leaves_the_result_failed(pc: TestClient,
                                                                  ps: Settings) -> None:
    rid, unit_id = dispatched_result(pc, 2)
    notes = ps.data_dir / "notes.txt"
    notes.write_text("not an image")
    register(pc, ps, notes, "notes.txt", executed_obs_unit_id=unit_id)
    result = wait_product_status(pc, rid, "FAILED")
    run = result["runs"][-1]
    assert run["status"] == "failed" and "notes.txt is not a FITS file" in run["error"]
    assert result["failed_runs"] == 1 and result["next_eligible_run_at"] is not None


def test_a_scheduler_run_goes_through_the_worker_and_ends_ready(pc: TestClient,
                                                                 ps: Settings) -> None:
    rid, unit_id = dispatched_result(pc, 1)
    files = [register(pc, ps, SAAO, f"run_{i}.fits", executed_obs_unit_id=unit_id)
             for i in range(2)]
    assert files == [str(raw_data_file_id("SAAO-CCD", f"run_{i}.fits")) for i in range(2)]
    result = wait_product_status(pc, rid, "READY")
    assert result["last_built_revision"] == result["assets_revision"] == 2
    run = result["runs"][-1]
    assert run["status"] == "completed"
    assert {o["kind"] for o in run["outputs"]} == {"combined_image", "source_catalog"}
    product_id = run["outputs"][0]["metadata"]["product_id"]
    product = pc.get(f"/products/{product_id}").json()
    assert product["run_id"] == run["id"] and product["result_id"] == rid
    assert product["status"] == "published"
    graph = pc.get(f"/products/{product_id}/lineage").json()
    edges = {(e["source"], e["relation"], e["target"]) for e in graph["edges"]}
    assert (graph["root"], "wasGeneratedBy", f"processing_run:{run['id']}") in edges
    assert (f"observation_result:{rid}", "hadMember", graph["root"]) in edges
    jobs = pc.get("/ops/jobs", params={"kind": "process"}).json()["items"]
    assert [j["run_id"] for j in jobs] == [run["id"]]
    # an operator's job over the result's files: its products belong to the result too
    plan = pc.post("/ops/plan", json={"result_ids": [rid]}).json()
    assert {i["file_id"] for i in plan["inputs"]} == set(files)
    mine = wait_job(pc, submit(pc, "/ops/process", {"result_ids": [rid], "catalog": True}))
    assert mine["status"] == "succeeded" and mine["result_id"] == rid and not mine["run_id"]
    by_result = pc.get("/products", params={"result_id": rid, "kind": "combined_image",
                                            "min_position": mine["last_position"]}).json()
    assert by_result["total"] == 2


def test_roles_of_the_processing_routes(pc: TestClient, ps: Settings) -> None:
    viewer = grant(ps, "dash", ("viewer",), kind="user")
    for method, path in [("post", "/ops/plan"), ("post", "/ops/ingest"),
                         ("post", "/ops/process"), ("post", "/ops/catalog"),
                         ("delete", f"/ops/jobs/{UUID(int=1)}")]:
        r = getattr(pc, method)(path, headers=viewer, **({"json": {}} if method == "post"
                                                          else {}))
        assert r.status_code == 403, (path, r.text)
    for path in ("/ops/jobs", "/ops/algorithms", "/products"):
        assert pc.get(path, headers=viewer).status_code == 200
    algorithms = pc.get("/ops/algorithms", headers=viewer).json()
    assert algorithms[0]["name"] == "ccd_stack" and "sigma" in str(algorithms[0]["parameters"])


def test_a_requested_job_shows_before_it_is_projected(ps: Settings) -> None:
    settings = ps.model_copy(update={"embedded_workers": False})
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        r = c.post("/ops/ingest", json={"file_ids": [str(UUID(int=5))]})
        assert r.status_code == 404  # the file is unknown even to the journal
        ledger = c.app.state.ledger  # type: ignore[attr-defined]
        body = {"name": "pending.fits", "relative_path": "p/pending.fits", "size": 10,
                "checksum": {"algorithm": "sha256", "value": "ab" * 32},
                "instrument": "SAAO-CCD", "file_type": "raw_science"}
        file_id = c.post("/raw_data_files", json=body).json()["ids"]["raw_data_file_id"]
        job_id = submit(c, "/ops/ingest", {"file_ids": [file_id]})
        job = c.get(f"/ops/jobs/{job_id}").json()
        assert job["pending"] and job["status"] == "requested" and job["kind"] == "ingest"
        assert job["command_status"] == "accepted" and ledger.journal.depth() == 2
        assert c.get("/ops/jobs").json()["items"][0]["id"] == job_id
        assert c.delete(f"/ops/jobs/{job_id}").status_code == 202
        assert c.get(f"/ops/jobs/{job_id}").json()["status"] == "cancelled"


def test_obsledger_worker_once_and_the_health_metrics(tmp_path: Path) -> None:
    settings = proc_settings(tmp_path, "sqlite", None, embedded_processing_worker=False)
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        f = register(c, settings, WFPC2, "cli.fits", instrument="WFPC2")
        job_id = submit(c, "/ops/ingest", {"file_ids": [f]})
        wait_job(c, job_id, {"requested"})
        health = c.get("/health").json()
        assert health["processing_worker"]["running"] is False
        assert health["processing_worker"]["current_job"] is None
        assert health["object_store"] == {"kind": "local", "reachable": True, "error": None}
        assert 'obsledger_processing_jobs{status="requested"} 1.0' in c.get("/metrics").text
    stale = settings.processing_work_dir / str(UUID(int=3)) / "1"  # a dead worker's leftovers
    stale.mkdir(parents=True)
    (stale / "combined_image.fits").write_bytes(b"half")
    r = subprocess.run([sys.executable, "-m", "api.cli", "worker", "--once"],
                       env=settings_env(settings), cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "processing worker idle; 1 jobs done" in r.stdout, r.stderr
    assert not stale.parent.exists() and not list(settings.processing_work_dir.iterdir())
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        job = wait_job(c, job_id)
        assert job["status"] == "succeeded" and job["outputs"][0]["metadata"]["shape"]


def test_two_workers_race_for_a_job_and_one_takes_over_after_expiry(ps: Settings) -> None:
    """Real workers on the real dispatcher: exactly one claim wins; the loser's later claim,
    once the winner's lease expired without a word from it, takes the job over."""
    from workers.processing_worker import ProcessingWorker

    settings = ps.model_copy(update={"embedded_processing_worker": False,
                                     "processing_lease_s": 4.0})
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        f = register(c, settings, WFPC2, "race.fits", instrument="WFPC2")
        job_id = submit(c, "/ops/ingest", {"file_ids": [f]})
        wait_job(c, job_id, {"requested"})
        lg = c.app.state.ledger  # type: ignore[attr-defined]
        a, b = (ProcessingWorker(lg.store, lg.processing, lg.commands, settings, lg.objects,
                                 worker_id=w) for w in ("worker-a", "worker-b"))
        won = a.claim(UUID(job_id))
        assert won is not None and won.held_by("worker-a", 1)
        assert b.claim(UUID(job_id)) is None  # the lease is live
        deadline = time.monotonic() + 30  # worker-a dies silently: no renewal
        while job_id not in lg.processing.claimable(datetime.now(UTC)):  # until it expired
            assert time.monotonic() < deadline
            time.sleep(0.1)
        taken = b.claim(UUID(job_id))
        assert taken is not None and taken.held_by("worker-b", 2)
        b.run_job(taken)
        job = wait_job(c, job_id)
        assert job["status"] == "succeeded" and job["attempts"] == 2


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_a_role_for_a_file_the_job_did_not_use_is_refused(tmp_path: Path,
                                                         store_kind: str) -> None:
    from commands.processing import ProductInputUse, ProductOutputFile, SucceedProcessingJob
    from workers.processing_worker import ProcessingWorker

    settings = proc_settings(tmp_path, store_kind, None, embedded_processing_worker=False)
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        f = register(c, settings, WFPC2, "used.fits", instrument="WFPC2")
        job_id = submit(c, "/ops/process", {"file_ids": [f]})
        wait_job(c, job_id, {"requested"})
        lg = c.app.state.ledger  # type: ignore[attr-defined]
        worker = ProcessingWorker(lg.store, lg.processing, lg.commands, settings, lg.objects,
                                  worker_id="w")
        assert worker.claim(UUID(job_id)) is not None
        stranger = UUID(int=77)
        product = ProductOutputFile(kind="combined_image", name="c.fits", area="products",
                                    key=f"{job_id}/c.fits", size=1, sha256="ab" * 32,
                                    media_type="application/fits",
                                    inputs=[ProductInputUse(file_id=stranger, role="bias")])
        entry = worker.send("processing_job.succeed", SucceedProcessingJob(
            id=UUID(job_id), worker="w", attempt=1, products=[product]), "roles-1")
        done = worker.outcome(entry)
        assert done is not None and done.status == "rejected", done
        assert f"raw data file {stranger} is not an input of the job" in (done.reason or "")
        assert c.get(f"/ops/jobs/{job_id}").json()["status"] == "running"


def test_damaged_or_altered_inputs_fail_the_job_with_the_reason(pc: TestClient,
                                                                 ps: Settings) -> None:
    good = register(pc, ps, WFPC2, "good.fits", instrument="WFPC2")
    cut = ps.data_dir / "cut.fits"
    cut.write_bytes(WFPC2.read_bytes()[:5000])
    truncated = register(pc, ps, cut, "cut.fits", instrument="WFPC2")
    job = wait_job(pc, submit(pc, "/ops/ingest", {"file_ids": [good, truncated]}))
    assert job["status"] == "failed" and job["attempts"] == 1, job
    assert job["reason"].startswith("raw data file cut.fits: "), job["reason"]
    assert job["outputs"] == []
    # bytes changed after registration: the recorded checksum no longer matches
    files = [register(pc, ps, SAAO, f"altered_{i}.fits") for i in range(2)]
    altered = ps.raw_data_dir / "2026-11-30/altered_1.fits"
    data = bytearray(altered.read_bytes())
    data[-1] ^= 0xFF
    altered.write_bytes(bytes(data))
    job = wait_job(pc, submit(pc, "/ops/process", {"file_ids": files}))
    assert job["status"] == "failed", job
    assert "altered_1.fits: its sha256 checksum differs" in job["reason"]
    assert pc.get("/products", params={"status": "built", "job_id": job["id"]}
                  ).json()["total"] == 0


def test_an_unreachable_object_store_shows_in_health(tmp_path: Path) -> None:
    settings = proc_settings(tmp_path, "sqlite", None, object_store="s3",
                             s3_endpoint_url="http://127.0.0.1:9", s3_connect_timeout_s=0.5,
                             s3_access_key_id=ACCESS_KEY_ID,
                             s3_secret_access_key=SECRET_ACCESS_KEY)
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        store = c.get("/health").json()["object_store"]
        assert store["kind"] == "s3" and store["reachable"] is False and store["error"]
        assert c.get("/ready").status_code == 200  # commands are still accepted


def test_a_repeated_request_with_its_idempotency_key_is_one_job(pc: TestClient,
                                                                 ps: Settings) -> None:
    f = register(pc, ps, WFPC2, "once.fits", instrument="WFPC2")
    headers = {"Idempotency-Key": "ingest-once-1"}
    first = pc.post("/ops/ingest", json={"file_ids": [f]}, headers=headers)
    again = pc.post("/ops/ingest", json={"file_ids": [f]}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["ids"] == first.json()["ids"]
    g = register(pc, ps, WFPC2, "twice.fits", instrument="WFPC2")
    other = pc.post("/ops/ingest", json={"file_ids": [g]}, headers=headers)
    assert other.status_code == 409  # the key was used for another request
    assert other.json()["errors"][0]["field"] == "Idempotency-Key"
    wait_job(pc, first.json()["ids"]["processing_job_id"])
    assert pc.get("/ops/jobs", params={"kind": "ingest"}).json()["total"] == 1
