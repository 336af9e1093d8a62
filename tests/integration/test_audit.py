"""Tamper evidence: the audit hash chain and its anchors against edits made behind obsledger's
back, in SQL, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from typing import Any
from uuid import UUID

import orjson
import pytest

from bootstrap.ledger import Ledger
from commands.obs_units import StartExecutedObsUnitRequest
from infra.audit_chain import AnchorLog, ChainKeeper, verify
from tests.conftest import ROOT, settings_env
from tests.http.test_api import T0


@pytest.fixture
def chained(ledger: Ledger) -> Ledger:
    """A ledger with 40 events, all chained in pages of 7, the head anchored once 10 or more
    events passed since the last anchor: at positions 14, 28 and 40."""
    async def go() -> None:
        for i in range(20):
            await ledger.commands.submit("executed_obs_unit.start", StartExecutedObsUnitRequest(
                obs_unit_id=f"OU-{i}", instrument="HARPS", start_time=T0), path=None,
                actor="night", correlation_id=None, idempotency_key=None)
    asyncio.run(go())
    assert ledger.dispatcher is not None and ledger.store is not None
    ledger.dispatcher.drain()
    keeper = keeper_of(ledger)
    assert keeper.catch_up() == ledger.store.max_position() == 40
    return ledger


def keeper_of(ledger: Ledger) -> ChainKeeper:
    assert ledger.store is not None
    return ChainKeeper(ledger.store, ledger.engine, AnchorLog(ledger.settings.anchors_file),
                       anchor_every=10, page_size=7)


def check(ledger: Ledger) -> Any:
    assert ledger.store is not None
    return verify(ledger.store, ledger.engine, AnchorLog(ledger.settings.anchors_file),
                  page_size=6)


def sql(ledger: Ledger, statement: str, *params: Any) -> list[Any]:
    """Run SQL on the event store's own database, as an intruder with credentials would."""
    assert ledger.store is not None
    recorder = ledger.store.recorder
    with recorder.datastore.transaction(commit=True) as curs:
        curs.execute(statement, params)
        try:
            return list(curs.fetchall())
        except Exception:
            return []


def events_table(ledger: Ledger) -> tuple[str, str, str]:
    """(table, position column, placeholder) of the stored events."""
    assert ledger.store is not None
    recorder = ledger.store.recorder
    if ledger.store.kind == "sqlite":
        return recorder.events_table_name, "rowid", "?"
    return (f'"{recorder.datastore.schema}"."{recorder.events_table_name}"',
            "notification_id", "%s")


def state_of(ledger: Ledger, position: int) -> bytes:
    table, pos, mark = events_table(ledger)
    rows = sql(ledger, f"SELECT state FROM {table} WHERE {pos} = {mark}", position)
    row = rows[0]
    return bytes(row["state"] if isinstance(row, dict) else row[0])


def set_state(ledger: Ledger, position: int, state: bytes) -> None:
    table, pos, mark = events_table(ledger)
    sql(ledger, f"UPDATE {table} SET state = {mark} WHERE {pos} = {mark}", state, position)


def test_an_untouched_store_verifies_clean(chained: Ledger) -> None:
    result = check(chained)
    assert result.ok and result.events == 40 and result.chained_head == 40
    assert result.anchors_checked == 3
    assert [a["position"] for a in AnchorLog(chained.settings.anchors_file).read()] == [
        14, 28, 40]


def test_one_changed_byte_is_found_at_its_position(chained: Ledger) -> None:
    state = bytearray(state_of(chained, 17))
    i = state.index(b"HARPS")
    state[i + 4] = ord("Z")  # HARPS -> HARPZ
    set_state(chained, 17, bytes(state))
    result = check(chained)
    assert result.finding is not None
    assert (result.finding.position, result.finding.kind) == (17, "modified")


def test_a_deleted_event_is_found(chained: Ledger) -> None:
    table, pos, mark = events_table(chained)
    sql(chained, f"DELETE FROM {table} WHERE {pos} = {mark}", 23)
    result = check(chained)
    assert result.finding is not None
    assert (result.finding.position, result.finding.kind) == (23, "deleted")


def test_two_swapped_events_are_found(chained: Ledger) -> None:
    a, b = state_of(chained, 5), state_of(chained, 9)
    set_state(chained, 5, b)
    set_state(chained, 9, a)
    result = check(chained)
    assert result.finding is not None
    assert (result.finding.position, result.finding.kind) == (5, "modified")


def test_a_truncated_chain_table_is_found_by_the_anchors(chained: Ledger) -> None:
    with chained.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM audit_chain")
    result = check(chained)
    assert result.finding is not None
    assert (result.finding.position, result.finding.kind) == (40, "chain-missing")


def test_rewriting_events_and_chain_together_is_found_by_the_anchors(chained: Ledger) -> None:
    state = bytearray(state_of(chained, 11))
    state[state.index(b"HARPS") + 4] = ord("Z")
    set_state(chained, 11, bytes(state))
    with chained.engine.begin() as conn:  # the intruder rebuilds the chain table too
        conn.exec_driver_sql("DELETE FROM audit_chain")
    anchors = chained.settings.anchors_file.read_bytes()
    chained.settings.anchors_file.unlink()
    keeper_of(chained).catch_up()  # a consistent chain over the altered log …
    chained.settings.anchors_file.write_bytes(anchors)  # … but the anchors outside remain
    result = check(chained)
    assert result.finding is not None
    assert (result.finding.position, result.finding.kind) == (14, "anchor-mismatch")


def test_obsledger_verify_on_the_command_line(chained: Ledger) -> None:
    env = settings_env(chained.settings)
    ok = subprocess.run([sys.executable, "-m", "api.cli", "verify", "--quiet"], env=env,
                        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert orjson.loads(ok.stdout)["ok"] is True
    set_state(chained, 3, state_of(chained, 3).replace(b"HARPS", b"HARPX"))
    bad = subprocess.run([sys.executable, "-m", "api.cli", "verify", "--quiet"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert orjson.loads(bad.stdout)["finding"] == {
        "position": 3, "kind": "modified",
        "detail": "the stored event (or the chain row) does not match its chained hash"}


# -- replay, state, trail ---------------------------------------------------------------------
def _result_history(ledger: Ledger) -> tuple[str, str]:
    """An executed obs unit, and a result with a task and assets (several events each)."""
    from uuid import UUID

    from commands.obs_units import FinishExecutedObsUnitRequest
    from commands.results import (
        ContributeAssetRequest,
        DispatchObservationResultRequest,
        MaterializeObservationResultsRequest,
    )

    async def submit(ctype: str, req: Any, path: dict[str, Any] | None = None,
                     actor: str = "night") -> Any:
        return (await ledger.commands.submit(ctype, req, path=path, actor=actor,
                                             correlation_id="corr-9",
                                             idempotency_key=None)).body

    async def go() -> tuple[str, str]:
        unit = (await submit("executed_obs_unit.start", StartExecutedObsUnitRequest(
            obs_unit_id="OU-A", instrument="HARPS", start_time=T0)))["ids"][
            "executed_obs_unit_id"]
        rid = (await submit("observation_result.materialize",
                            MaterializeObservationResultsRequest(observation_id=5,
                                                                 request_id=5)))["ids"][
            "observation_result_ids"][0]
        await submit("observation_result.dispatch",
                     DispatchObservationResultRequest(executed_obs_unit_id=UUID(unit)),
                     {"id": rid}, actor="scheduler")
        for i in range(3):
            await submit("observation_result.contribute_asset",
                         ContributeAssetRequest(asset_id=f"a{i}"), {"id": rid})
        await submit("executed_obs_unit.finish", FinishExecutedObsUnitRequest.model_validate(
            {"status": "success", "end_time": "2026-11-21T23:45:00Z"}), {"id": UUID(unit)})
        return unit, rid

    unit, rid = asyncio.run(go())
    assert ledger.dispatcher is not None
    ledger.dispatcher.drain()
    return unit, rid


def test_state_travels_in_versions_and_recorded_time(ledger: Ledger) -> None:
    from queries.audit import aggregate_state, state_at

    _, rid = _result_history(ledger)
    assert ledger.store is not None
    stored = ledger.store.recorder.select_events(UUID(rid))
    assert len(stored) == 5  # materialized, dispatched, three assets
    aggregate: Any = None
    for n, s in enumerate(stored, start=1):
        aggregate = ledger.store.mapper.to_domain_event(s).mutate(aggregate)
        state, events, _ = state_at(ledger.store, rid, version=n)
        assert state == aggregate_state(aggregate) and len(events) == n
        recorded = events[-1].recorded_at
        by_time, known, _ = state_at(ledger.store, rid, recorded_at=recorded)
        assert by_time == state and [e.version for e in known] == list(range(1, n + 1))
    assert state is not None and state["assets_revision"] == 3
    assert state_at(ledger.store, rid, version=0) == (None, [], None)


def test_state_as_observed_at_the_telescope(ledger: Ledger) -> None:
    from datetime import timedelta

    from queries.audit import state_at

    unit, _ = _result_history(ledger)
    assert ledger.store is not None
    during, _, _ = state_at(ledger.store, unit, observed_at=T0 + timedelta(minutes=30))
    after, events, _ = state_at(ledger.store, unit, observed_at=T0 + timedelta(hours=1))
    assert during is not None and during["status"] == "running"
    assert after is not None and after["status"] == "success" and len(events) == 2


def test_replay_filters_and_the_command_line(ledger: Ledger, tmp_path: Any) -> None:
    from queries.audit import EventFilter, replay

    unit, rid = _result_history(ledger)
    assert ledger.store is not None
    everything = list(replay(ledger.store, EventFilter()))
    assert [e.position for e in everything] == list(range(1, len(everything) + 1))
    assets = list(replay(ledger.store, EventFilter(event_type="AssetContributed")))
    assert len(assets) == 3 and {e.aggregate_id for e in assets} == {rid}
    assert [e.data["revision"] for e in assets] == [1, 2, 3]
    by_actor = list(replay(ledger.store, EventFilter(actor="scheduler")))
    assert {e.event_type for e in by_actor} == {"ObservationResult.Dispatched",
                                                "CommandReceipt.Recorded"}
    one = list(replay(ledger.store, EventFilter(aggregate_id=unit)))
    assert [e.event_type for e in one] == ["ExecutedObsUnit.Started",
                                           "ExecutedObsUnit.Finished"]
    out = tmp_path / "replay.jsonl"
    done = subprocess.run([sys.executable, "-m", "api.cli", "replay", "--format", "jsonl",
                           "--aggregate-type", "ObservationResult", "--output", str(out)],
                          env=settings_env(ledger.settings), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 5 and lines[0]["event_type"] == "ObservationResult.Materialized"
    assert lines[0]["correlation_id"] == "corr-9" and lines[0]["data"]["observation_id"] == 5


def test_trail_names_the_commands_that_touched_an_entity(ledger: Ledger) -> None:
    from queries.audit import trail

    _, rid = _result_history(ledger)
    assert ledger.store is not None
    rows = trail(ledger.store, rid)
    assert [(r["event_type"], r["command_type"], r["actor"]) for r in rows] == [
        ("ObservationResult.Materialized", "observation_result.materialize", "night"),
        ("ObservationResult.Dispatched", "observation_result.dispatch", "scheduler"),
        *[("ObservationResult.AssetContributed", "observation_result.contribute_asset",
           "night")] * 3]


def test_check_projections_finds_a_read_model_edited_behind_its_back(ledger: Ledger) -> None:
    _, rid = _result_history(ledger)
    assert ledger.projector is not None
    ledger.projector.catch_up()
    position, report = ledger.projector.check()
    assert position == ledger.projector.position
    assert all(not (r["missing"] or r["extra"] or r["different"]) for r in report.values())
    assert report["observation_results"]["rows"] == 1
    with ledger.engine.begin() as conn:
        conn.exec_driver_sql(
            "UPDATE observation_results SET assets_revision = 99 WHERE id = "
            + ("?" if ledger.store and ledger.store.kind == "sqlite" else "%s"), (rid,))
        conn.exec_driver_sql("DELETE FROM executed_obs_units")
    env = settings_env(ledger.settings)
    done = subprocess.run([sys.executable, "-m", "api.cli", "check-projections"], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    body = orjson.loads(done.stdout)
    assert body["read_models"]["observation_results"]["different"] == 1
    assert body["read_models"]["observation_results"]["examples"] == [rid]
    assert body["read_models"]["executed_obs_units"]["missing"] == 1
