"""``obsledger worker`` killed with SIGKILL mid-job (in the combine step): the job stays
``running`` under the dead worker's lease until it expires, then a new worker (with its own
journal and dispatcher, as on another host) claims it (attempt 2), the dead attempt's step
shows ``interrupted``, and the job finishes with its products and a complete lineage. SQLite
and PostgreSQL. SIGTERM releases the job at once."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from tests.conftest import CliProcess, grant
from tests.integration.test_processing import SAAO, proc_settings, register, submit, wait_job

pytestmark = pytest.mark.slow
LEASE_S = 3.0


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_sigkill_mid_job_then_another_worker_takes_over(
        tmp_path: Path, store_kind: str, pg_database_if_needed: str | None) -> None:
    settings = proc_settings(tmp_path, store_kind, pg_database_if_needed,
                             embedded_processing_worker=False, processing_lease_s=LEASE_S,
                             processing_progress_interval_s=0.0)
    with TestClient(create_app(settings), headers=grant(settings)) as client:
        files = [register(client, settings, SAAO, f"kill_{i}.fits") for i in range(5)]
        job_id = submit(client, "/ops/process", {
            "file_ids": files, "parameters": {"chunk_rows": 1}, "catalog": True})
        first = CliProcess(settings, "worker")
        try:
            job = wait_job(client, job_id, {"running"}, timeout=60, current_step="combine")
            first.kill()
        finally:
            first.stop()
        dead = job["lease"]["worker"]
        ledger = client.app.state.ledger  # type: ignore[attr-defined]
        deadline = time.monotonic() + 20
        while ledger.journal.depth() and time.monotonic() < deadline:
            time.sleep(0.05)
        stuck = wait_job(client, job_id, {"running"})
        assert stuck["lease"]["worker"] == dead and stuck["attempts"] == 1
        expired_at = _time(stuck["lease"]["expires_at"])
        # the next worker as on another host: its own journal, applied by its own dispatcher
        second = CliProcess(settings.model_copy(update={
            "journal_path": tmp_path / "worker-journal.sqlite3"}), "worker", "--with-dispatcher")
        try:
            done = wait_job(client, job_id, {"succeeded", "failed", "cancelled"}, timeout=120)
        finally:
            second.stop()
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    first_attempt = [s for s in done["steps"] if s["attempt"] == 1]
    second_attempt = [s for s in done["steps"] if s["attempt"] == 2]
    assert first_attempt[-1]["name"] == "combine"
    assert first_attempt[-1]["status"] == "interrupted"
    assert all(s["status"] == "completed" for s in second_attempt)
    assert _time(second_attempt[0]["started_at"]) >= expired_at  # only after the expiry
    assert not (settings.processing_work_dir / job_id).exists()  # the dead one's swept too
    with TestClient(create_app(settings.model_copy(update={"embedded_workers": True})),
                    headers=grant(settings)) as client:
        page = client.get("/products", params={"job_id": job_id}).json()
        assert page["total"] == 2
        for product in page["items"]:
            graph = client.get(f"/products/{product['id']}/lineage").json()
            raw = {n["attributes"]["file_id"] for n in graph["nodes"]
                   if n["kind"] == "raw_data_file"}
            assert raw == set(files)


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_sigterm_releases_the_job_at_once(tmp_path: Path, store_kind: str) -> None:
    settings = proc_settings(tmp_path, store_kind, None, embedded_processing_worker=False,
                             processing_lease_s=60.0, processing_progress_interval_s=0.0)
    with TestClient(create_app(settings), headers=grant(settings)) as client:
        files = [register(client, settings, SAAO, f"term_{i}.fits") for i in range(5)]
        job_id = submit(client, "/ops/process", {"file_ids": files,
                                                 "parameters": {"chunk_rows": 1}})
        worker = CliProcess(settings, "worker")
        try:
            wait_job(client, job_id, {"running"}, timeout=60, current_step="combine")
        finally:
            worker.stop()  # SIGTERM
        assert worker.proc.returncode == 0
        job = wait_job(client, job_id, {"requested"}, timeout=30)
        assert job["reason"] == "the worker stopped" and job["lease"] is None
        assert job["attempts"] == 1  # released long before its 60 s lease would expire
