"""Observation results through HTTP, on SQLite and PostgreSQL: materializing request specs
(idempotently), fulfillment, the data-product lifecycle with an injected clock, the smart
queries (pending rows, tasks, runs, outputs), the scheduler's view and the counts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from bootstrap.ledger import Ledger
from domain.results import observation_result_id
from infra.settings import Settings
from tests.conftest import grant
from tests.http.test_api import applied

T0 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


class Clock:
    """The dispatcher's clock: moves only when the test says so."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def rc(settings: Settings, clock: Clock) -> Iterator[TestClient]:
    s = settings.model_copy(update={"result_debounce_s": 30.0, "processing_retry_base_s": 10.0,
                                    "processing_retry_limit": 2})
    with TestClient(create_app(s, Ledger(s, clock=clock)), headers=grant(s)) as c:
        yield c


SPEC = {"observation_id": 7, "request_id": 42, "epochs": 2, "samples": 3,
        "copies_mode": "all_eligible", "eligible_instruments": ["HARPS", "ESPRESSO"],
        "spec_snapshot": {"exptime": 600, "target": "HD 10700"}}


def materialize(c: TestClient, spec: dict[str, Any] | None = None) -> list[str]:
    body = applied(c.post("/observation_results/materialize?wait=true", json=spec or SPEC))
    return list(body["ids"]["observation_result_ids"])


def get(c: TestClient, rid: str) -> dict[str, Any]:
    r = c.get(f"/observation_results/{rid}")
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def settled(c: TestClient, rid: str) -> dict[str, Any]:
    """The result once nothing about it is pending any more."""
    for _ in range(200):
        row = get(c, rid)
        if not row["pending"]:
            return row
        time.sleep(0.02)
    raise AssertionError(f"{rid} still pending")


def test_materializing_is_idempotent_and_ids_are_the_leaf_cells(rc: TestClient) -> None:
    ids = materialize(rc)
    assert len(ids) == 2 * 3 * 2
    assert ids[0] == str(observation_result_id(7, 42, 0, 0, 0))
    again = applied(rc.post("/observation_results/materialize?wait=true", json=SPEC))
    assert again["ids"]["observation_result_ids"] == ids  # same cells, nothing new
    page = rc.get("/observation_results", params={"request_id": 42, "limit": 100}).json()
    assert page["total"] == 12 and len(page["items"]) == 12
    copies = {(i["epoch_index"], i["sample_index"], i["copy_index"], i["instrument_id"])
              for i in page["items"]}
    assert (1, 2, 1, "ESPRESSO") in copies and (0, 0, 0, "HARPS") in copies
    first = settled(rc, ids[0])
    assert first["spec_snapshot"] == SPEC["spec_snapshot"]
    page = rc.get("/observation_results", params={
        "request_id": 42, "limit": 100, "min_position": again["position"]}).json()
    short_ids = {i["short_id"] for i in page["items"]}
    assert len(short_ids) == 12 and all(isinstance(i, int) for i in short_ids)
    assert first["fulfillment_status"] == "pending_dispatch"
    assert first["data_product_status"] == "PENDING"


def test_a_pending_materialization_is_read_at_once(settings: Settings, clock: Clock) -> None:
    s = settings.model_copy(update={"embedded_projector": False})
    with TestClient(create_app(s, Ledger(s, clock=clock)), headers=grant(s)) as c:
        body = applied(c.post("/observation_results/materialize?wait=true", json={
            "observation_id": 1, "request_id": 2, "epochs": 2}))
        rid = body["ids"]["observation_result_ids"][1]
        row = get(c, rid)  # the projector is not running: the journal answers
        assert row["pending"] is True and row["epoch_index"] == 1
        page = c.get("/observation_results", params={"request_id": 2}).json()
        assert page["pending_count"] == 2 and page["total"] == 0


def test_fulfillment_through_tasks(rc: TestClient, clock: Clock) -> None:
    rid = materialize(rc)[0]
    unit = applied(rc.post("/executed_obs_units/start?wait=true", json={
        "obs_unit_id": "OU-7", "instrument": "HARPS", "start_time": T0.isoformat()}))
    unit_id = unit["ids"]["executed_obs_unit_id"]
    first = applied(rc.post(f"/observation_results/{rid}/dispatch?wait=true",
                            json={"instrument_id": "HARPS", "executed_obs_unit_id": unit_id}))
    task1 = first["ids"]["task_id"]
    # a second dispatch while a task is open is a clear conflict
    r = rc.post(f"/observation_results/{rid}/dispatch?wait=true", json={})
    assert r.status_code == 409, r.text
    applied(rc.put(f"/observation_results/{rid}/tasks/{task1}?wait=true",
                   json={"outcome": "failed", "finished_at": T0.isoformat()}))
    second = applied(rc.post(f"/observation_results/{rid}/dispatch?wait=true", json={}))
    task2 = second["ids"]["task_id"]
    done = T0 + timedelta(hours=3)
    applied(rc.put(f"/observation_results/{rid}/tasks/{task2}?wait=true",
                   json={"outcome": "succeeded", "finished_at": done.isoformat()}))
    row = settled(rc, rid)
    assert row["fulfillment_status"] == "fulfilled" and row["task_count"] == 2
    assert datetime.fromisoformat(row["fulfilled_on"]) == done
    assert [(t["attempt"], t["status"]) for t in row["tasks"]] == [(1, "failed"),
                                                                   (2, "succeeded")]
    assert row["tasks"][0]["executed_obs_unit_id"] == unit_id
    # fulfilled is final: cancel is refused
    r = rc.post(f"/observation_results/{rid}/cancel?wait=true", json={"reason": "late"})
    assert r.status_code == 409, r.text
    assert "fulfilled" in r.json()["detail"]


def test_cancel_and_unknown_results(rc: TestClient) -> None:
    rid = materialize(rc)[1]
    applied(rc.post(f"/observation_results/{rid}/dispatch?wait=true", json={}))
    applied(rc.post(f"/observation_results/{rid}/cancel?wait=true",
                    json={"reason": "weather"}))
    row = settled(rc, rid)
    assert row["fulfillment_status"] == "canceled"
    assert row["tasks"][0]["status"] == "canceled"
    unknown = str(observation_result_id(1, 1, 1, 1, 1))
    r = rc.post(f"/observation_results/{unknown}/dispatch", json={})
    assert r.status_code == 404 and r.json()["status_code"] == 404
    assert rc.get(f"/observation_results/{unknown}").status_code == 404
    r = rc.put(f"/observation_results/{rid}/tasks/not-a-uuid", json={"outcome": "failed"})
    assert r.status_code == 422


def test_a_burst_of_assets_is_built_once_after_the_debounce(rc: TestClient,
                                                            clock: Clock) -> None:
    rid = materialize(rc)[0]
    for i in range(20):
        applied(rc.post(f"/observation_results/{rid}/assets?wait=true",
                        json={"asset_id": f"raw_data_file:{i}"}))
        clock.advance(seconds=1)
    applied(rc.post(f"/observation_results/{rid}/assets?wait=true",
                    json={"asset_id": "raw_data_file:3"}))  # counted once
    row = settled(rc, rid)
    assert (row["assets_revision"], row["dirty_from_revision"], row["dirty"]) == (20, 1, True)
    due = rc.get("/observation_results/due").json()
    assert [(i["id"], i["due"]) for i in due["items"]] == [(rid, False)]
    clock.advance(seconds=30)
    due = rc.get("/observation_results/due").json()
    assert [(i["id"], i["due"]) for i in due["items"]] == [(rid, True)]

    run = applied(rc.post(f"/observation_results/{rid}/runs?wait=true", json={}))
    run_id = run["ids"]["run_id"]
    assert rc.get("/observation_results/due").json()["items"] == []  # building
    # an asset arrives during the build: the result ends STALE, still dirty
    applied(rc.post(f"/observation_results/{rid}/assets?wait=true",
                    json={"asset_id": "raw_data_file:late"}))
    outputs = [{"name": "combined.fits", "kind": "combined_image", "size": 1024,
                "checksum": {"algorithm": "sha256", "value": "ab" * 32}}]
    applied(rc.put(f"/observation_results/{rid}/runs/{run_id}?wait=true",
                   json={"end": "completed", "outputs": outputs}))
    row = settled(rc, rid)
    assert row["data_product_status"] == "STALE"
    assert (row["last_built_revision"], row["dirty_from_revision"]) == (20, 21)
    assert row["runs"][0]["outputs"][0]["name"] == "combined.fits"
    assert row["runs"][0]["status"] == "completed" and row["runs"][0]["revision"] == 20

    clock.advance(seconds=30)
    run2 = applied(rc.post(f"/observation_results/{rid}/runs?wait=true", json={}))
    applied(rc.put(f"/observation_results/{rid}/runs/{run2['ids']['run_id']}?wait=true",
                   json={"end": "completed", "outputs": outputs}))
    row = settled(rc, rid)
    assert row["data_product_status"] == "READY" and not row["dirty"]
    assert row["last_built_revision"] == row["assets_revision"] == 21
    counts = rc.get("/observation_results/counts").json()
    assert counts["data_product_status"]["READY"] == 1 and counts["total"] == 12


def test_failed_runs_are_retried_with_backoff(rc: TestClient, clock: Clock) -> None:
    rid = materialize(rc)[0]
    applied(rc.post(f"/observation_results/{rid}/assets?wait=true", json={"asset_id": "a"}))
    clock.advance(seconds=30)
    for wait in (10, 20):
        run = applied(rc.post(f"/observation_results/{rid}/runs?wait=true", json={}))
        applied(rc.put(f"/observation_results/{rid}/runs/{run['ids']['run_id']}?wait=true",
                       json={"end": "failed", "error": "no bias frames"}))
        row = settled(rc, rid)
        assert row["data_product_status"] == "FAILED"
        assert datetime.fromisoformat(row["next_eligible_run_at"]) == clock.now + timedelta(
            seconds=wait)
        clock.advance(seconds=wait)
    run = applied(rc.post(f"/observation_results/{rid}/runs?wait=true", json={}))
    applied(rc.put(f"/observation_results/{rid}/runs/{run['ids']['run_id']}?wait=true",
                   json={"end": "failed", "error": "no bias frames"}))
    row = settled(rc, rid)
    assert row["next_eligible_run_at"] is None and row["failed_runs"] == 3  # gave up
    r = rc.put(f"/observation_results/{rid}/runs/{run['ids']['run_id']}?wait=true",
               json={"end": "completed"})
    assert r.status_code == 409  # not the run in progress any more
    r = rc.put(f"/observation_results/{rid}/runs/{run['ids']['run_id']}",
               json={"end": "failed", "outputs": [{"name": "x", "kind": "y"}]})
    assert r.status_code == 422 and r.json()["status_code"] == 422


@pytest.mark.parametrize("body", [
    {"observation_id": -1, "request_id": 1},
    {"observation_id": 1, "request_id": 1, "copies_mode": "all_eligible"},
    {"observation_id": 1, "request_id": 1, "epochs": 1000, "samples": 1000},
    {"observation_id": 1, "request_id": 1, "copies": 3},
    {"observation_id": 1, "request_id": 1, "eligible_instruments": ["A", "A"]},
    {"observation_id": "x", "request_id": 1},
])
def test_bad_specs_are_clear_422s(rc: TestClient, body: dict[str, Any]) -> None:
    r = rc.post("/observation_results/materialize", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["errors"]


# -- the process manager and the scheduler ----------------------------------------------------
@pytest.fixture
def automation_ledger(settings: Settings, clock: Clock) -> Iterator[Ledger]:
    s = settings.model_copy(update={"result_debounce_s": 30.0})
    lg = Ledger(s, workers=False, clock=clock)
    yield lg
    lg.stop()


def _submit(lg: Ledger, command_type: str, request: Any,
            path: dict[str, Any] | None = None) -> dict[str, Any]:
    import asyncio

    sub = asyncio.run(lg.commands.submit(command_type, request, path=path, actor="night",
                                         correlation_id=None, idempotency_key=None))
    return sub.body  # type: ignore[no-any-return]


def _settle(lg: Ledger) -> None:
    assert lg.dispatcher is not None and lg.projector is not None
    lg.dispatcher.drain()
    lg.projector.catch_up()


def _dispatched_result(lg: Ledger, obs_unit_id: str, observation_id: int,
                      request_id: int) -> tuple[str, str]:
    """An execution started and a result materialized and dispatched to it: their ids."""
    from commands.obs_units import StartExecutedObsUnitRequest
    from commands.results import (
        DispatchObservationResultRequest,
        MaterializeObservationResultsRequest,
    )

    unit = _submit(lg, "executed_obs_unit.start", StartExecutedObsUnitRequest(
        obs_unit_id=obs_unit_id, instrument="HARPS", start_time=T0,
    ))["ids"]["executed_obs_unit_id"]
    rid = _submit(lg, "observation_result.materialize", MaterializeObservationResultsRequest(
        observation_id=observation_id, request_id=request_id,
    ))["ids"]["observation_result_ids"][0]
    _submit(lg, "observation_result.dispatch",
            DispatchObservationResultRequest(executed_obs_unit_id=unit), {"id": rid})
    return unit, rid


def test_the_process_manager_links_files_and_finished_executions_exactly_once(
        automation_ledger: Ledger, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    from commands.obs_units import FinishExecutedObsUnitRequest
    from commands.raw_data import BulkRegisterRawDataFilesRequest

    lg = automation_ledger
    assert lg.results is not None
    unit, rid = _dispatched_result(lg, "OU-7", 7, 1)
    _settle(lg)
    files = BulkRegisterRawDataFilesRequest.model_validate({"files": [{
        "name": f"HARPS.{i}.fits", "relative_path": f"n/{i}.fits", "size": 100,
        "checksum": {"algorithm": "md5", "value": f"{i:032x}"}, "instrument": "HARPS",
        "executed_obs_unit_id": unit, "file_type": "raw_science",
        "created_at": T0.isoformat()} for i in range(5)]})
    _submit(lg, "raw_data_file.register_bulk", files)
    _submit(lg, "executed_obs_unit.finish", FinishExecutedObsUnitRequest(
        status="success", end_time=T0 + timedelta(hours=1)), {"id": UUID(unit)})
    _settle(lg)

    pm = lg.results.process_manager
    crashes = iter([True])  # the first page "crashes" after its commands were sent

    def record(position: int, original: Any = pm.record_position) -> None:
        if next(crashes, False):
            raise RuntimeError("killed before recording the position")
        original(position)

    monkeypatch.setattr(pm, "record_position", record)
    with pytest.raises(RuntimeError):
        pm.once()
    assert pm.position() == 0
    assert lg.results.catch_up().startswith(f"{len(lg.store.select_notifications(0, 10**6))}")  # type: ignore[union-attr]
    _settle(lg)
    row = lg.queries.result(rid)
    assert row is not None
    assert row["assets_revision"] == 5  # once per file, the crashed page's included
    assert row["fulfillment_status"] == "fulfilled"
    assert row["fulfilled_on"] == T0 + timedelta(hours=1)
    assert row["tasks"][0]["status"] == "succeeded"
    assert lg.journal.unprojected(lg.queries.read_model_position()) == []  # all projected
    assert lg.journal.get(f"pm:finish:{unit}:{row['tasks'][0]['id']}") is not None

    # the scheduler: nothing before the debounce, one run after it, none while it runs
    clock.advance(seconds=29)
    assert lg.results.scheduler.once() == 0 and lg.results.scheduler.sent == 0
    clock.advance(seconds=1)
    lg.results.scheduler.once()
    lg.results.scheduler.once()  # the start is pending: not asked again
    _settle(lg)
    lg.results.scheduler.once()
    row = lg.queries.result(rid)
    assert row is not None and row["data_product_status"] == "BUILDING"
    assert len(row["runs"]) == 1 and lg.results.scheduler.sent == 1


@pytest.mark.slow
def test_a_process_manager_killed_mid_way_applies_each_effect_once(
        automation_ledger: Ledger) -> None:
    import signal
    import sqlite3
    import subprocess
    import sys

    from commands.raw_data import BulkRegisterRawDataFilesRequest
    from tests.conftest import ROOT, settings_env

    lg = automation_ledger
    unit, rid = _dispatched_result(lg, "OU-K", 9, 9)
    files = 1500
    for chunk in range(0, files, 500):
        _submit(lg, "raw_data_file.register_bulk", BulkRegisterRawDataFilesRequest.model_validate(
            {"files": [{"name": f"K.{i}.fits", "relative_path": f"k/{i}.fits", "size": 1,
                        "checksum": {"algorithm": "md5", "value": f"{i:032x}"},
                        "instrument": "HARPS", "executed_obs_unit_id": unit,
                        "file_type": "raw_science", "created_at": T0.isoformat()}
                       for i in range(chunk, chunk + 500)]}))
    _settle(lg)
    assert lg.results is not None and lg.store is not None
    head = lg.store.max_position()

    def sent() -> int:  # commands the process manager journaled, whatever their status
        with sqlite3.connect(lg.settings.journal_file) as db:
            return int(db.execute("SELECT COUNT(*) FROM commands WHERE actor = ?",
                                  ("obsledger:results",)).fetchone()[0])

    env = settings_env(lg.settings)
    worker = subprocess.Popen([sys.executable, "-m", "api.cli", "results"], env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while sent() < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    pm = lg.results.process_manager
    assert sent() > 0 and pm.position() < head, "killed mid-way"
    done = subprocess.run([sys.executable, "-m", "api.cli", "results", "--once"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pm.position() >= head
    _settle(lg)
    assert sent() == files  # one command per file, the repeats answered from the journal
    row = lg.queries.result(rid)
    assert row is not None and row["assets_revision"] == files
