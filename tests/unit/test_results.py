"""Observation results through their handlers, the unit of work and the in-memory store:
materializing a request's cells, dispatch and task outcomes, assets and processing runs (the
handlers apply the policy's clock, debounce and retry settings)."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID, uuid4

from commands.results import ResultCommand
from domain.errors import IllegalTransition, InvalidCommand, TargetNotFound
from domain.results import ObservationResult, observation_result_id
from infra.event_store import EventStore
from tests.unit.runner import CommandRunner

MATERIALIZE = ResultCommand.OBSERVATION_RESULT_MATERIALIZE
DISPATCH = ResultCommand.OBSERVATION_RESULT_DISPATCH
REPORT = ResultCommand.OBSERVATION_RESULT_REPORT_TASK
CANCEL = ResultCommand.OBSERVATION_RESULT_CANCEL
ASSET = ResultCommand.OBSERVATION_RESULT_CONTRIBUTE_ASSET
START_RUN = ResultCommand.OBSERVATION_RESULT_START_RUN
END_RUN = ResultCommand.OBSERVATION_RESULT_END_RUN


def one_result(run: CommandRunner) -> UUID:
    (rid,) = run(MATERIALIZE, observation_id=7, request_id=42).ids
    return rid


def test_materialize_creates_every_leaf_cell(run: CommandRunner) -> None:
    applied = run(MATERIALIZE, observation_id=7, request_id=42, epochs=2, samples=1,
                  copies_mode="all_eligible", eligible_instruments=["HARPS", "ESPRESSO"],
                  spec_snapshot={"exptime": 600})
    expected = [observation_result_id(7, 42, e, 0, c) for e in range(2) for c in range(2)]
    assert applied.ids == expected
    assert applied.names == ["ObservationResult.Materialized"] * 4
    last = run.load(ObservationResult, expected[-1])
    assert (last.epoch_index, last.copy_index, last.instrument_id) == (1, 1, "ESPRESSO")
    assert (last.fulfillment_status, last.data_product_status) == ("pending_dispatch",
                                                                   "PENDING")
    assert last.spec_snapshot == {"exptime": 600}


def test_materialize_again_adds_only_the_missing_cells(run: CommandRunner,
                                                       store: EventStore) -> None:
    first = run(MATERIALIZE, observation_id=7, request_id=42, epochs=2).ids
    head = store.max_position()
    again = run(MATERIALIZE, observation_id=7, request_id=42, epochs=2)
    assert again.ids == [] and again.events == [] and store.max_position() == head
    more = run(MATERIALIZE, observation_id=7, request_id=42, epochs=3)
    assert more.ids == [observation_result_id(7, 42, 2, 0, 0)]
    assert store.existing([*first, *more.ids]) == {*first, *more.ids}


def test_dispatch_then_a_partial_then_a_successful_task(run: CommandRunner) -> None:
    rid = one_result(run)
    first, second = uuid4(), uuid4()
    assert run(DISPATCH, id=rid, task_id=first, instrument_id="HARPS").names == [
        "ObservationResult.Dispatched"]
    refusal = run.refused(DISPATCH, id=rid, task_id=uuid4())
    assert isinstance(refusal, IllegalTransition)  # one open task at a time
    run(REPORT, id=rid, task_id=first, outcome="partial")
    assert run.load(ObservationResult, rid).fulfillment_status == "partially_fulfilled"
    run(DISPATCH, id=rid, task_id=second)
    applied = run(REPORT, id=rid, task_id=second, outcome="succeeded")
    assert applied.names == ["ObservationResult.TaskEnded"]
    result = run.load(ObservationResult, rid)
    assert result.fulfillment_status == "fulfilled" and result.fulfilled_on is not None
    assert [t["attempt"] for t in result.tasks.values()] == [1, 2]
    assert result.tasks[str(first)]["dispatched_at"] == run.policy.clock()
    assert isinstance(run.refused(CANCEL, id=rid, reason="late"), IllegalTransition)


def test_dispatch_waits_for_not_before(run: CommandRunner) -> None:
    now = run.policy.clock()
    (rid,) = run(MATERIALIZE, observation_id=1, request_id=1,
                 not_before=now + timedelta(hours=1)).ids
    refusal = run.refused(DISPATCH, id=rid, task_id=uuid4())
    assert isinstance(refusal, InvalidCommand) and refusal.field == "not_before"


def test_dispatch_names_an_unknown_executed_obs_unit(run: CommandRunner) -> None:
    rid = one_result(run)
    refusal = run.refused(DISPATCH, id=rid, task_id=uuid4(), executed_obs_unit_id=uuid4())
    assert isinstance(refusal, TargetNotFound) and refusal.field == "executed_obs_unit_id"


def test_cancel_closes_the_open_task(run: CommandRunner) -> None:
    rid = one_result(run)
    task = uuid4()
    run(DISPATCH, id=rid, task_id=task)
    assert run(CANCEL, id=rid, reason="weather").names == ["ObservationResult.Canceled"]
    result = run.load(ObservationResult, rid)
    assert result.fulfillment_status == "canceled"
    assert result.tasks[str(task)]["outcome"] == "canceled"


def test_an_asset_makes_the_result_due_after_the_debounce(run: CommandRunner) -> None:
    rid = one_result(run)
    now = run.policy.clock()
    assert run(ASSET, id=rid, asset_id="raw:1").names == ["ObservationResult.AssetContributed"]
    result = run.load(ObservationResult, rid)
    assert result.assets_revision == 1 and result.dirty
    assert result.next_eligible_run_at == now + run.policy.result_debounce
    assert not result.due(now) and result.due(now + run.policy.result_debounce)
    assert run(ASSET, id=rid, asset_id="raw:1").events == []  # counted once


def test_a_run_builds_the_revision_it_started_from(run: CommandRunner) -> None:
    rid = one_result(run)
    run(ASSET, id=rid, asset_id="raw:1")
    run_id = uuid4()
    assert run(START_RUN, id=rid, run_id=run_id).names == ["ObservationResult.RunStarted"]
    assert isinstance(run.refused(START_RUN, id=rid, run_id=uuid4()), IllegalTransition)
    run(ASSET, id=rid, asset_id="raw:2")  # arrives during the build
    run(END_RUN, id=rid, run_id=run_id, end="completed",
        outputs=[{"name": "stack.fits", "kind": "combined_image"}])
    result = run.load(ObservationResult, rid)
    assert (result.data_product_status, result.last_built_revision) == ("STALE", 1)
    assert result.dirty_from_revision == 2 and result.current_processing_run_id is None
    assert result.runs[str(run_id)]["outputs"][0]["name"] == "stack.fits"

    second = uuid4()
    run(START_RUN, id=rid, run_id=second)
    run(END_RUN, id=rid, run_id=second, end="completed")
    result = run.load(ObservationResult, rid)
    assert (result.data_product_status, result.last_built_revision, result.dirty) == (
        "READY", 2, False)
    assert run.history(rid) == ["Materialized", "AssetContributed", "RunStarted",
                                "AssetContributed", "RunEnded", "RunStarted", "RunEnded"]


def test_failed_runs_back_off_then_stop_at_the_retry_limit(run: CommandRunner) -> None:
    """The policy's retry base doubles per failure; beyond its limit (2 here) no retry."""
    rid = one_result(run)
    run(ASSET, id=rid, asset_id="raw:1")
    waits = []
    for _ in range(3):
        run_id = uuid4()
        run(START_RUN, id=rid, run_id=run_id)
        run(END_RUN, id=rid, run_id=run_id, end="failed", error="no flat field")
        result = run.load(ObservationResult, rid)
        waits.append(None if result.next_eligible_run_at is None
                     else result.next_eligible_run_at - run.policy.clock())
    assert waits == [timedelta(seconds=60), timedelta(seconds=120), None]
    assert (result.data_product_status, result.failed_runs) == ("FAILED", 3)


def test_ending_a_run_that_is_not_in_progress(run: CommandRunner) -> None:
    rid = one_result(run)
    run(ASSET, id=rid, asset_id="raw:1")
    run_id = uuid4()
    run(START_RUN, id=rid, run_id=run_id)
    refusal = run.refused(END_RUN, id=rid, run_id=uuid4(), end="completed")
    assert isinstance(refusal, IllegalTransition) and refusal.field == "run_id"
    run(END_RUN, id=rid, run_id=run_id, end="blocked", error="no flat field")
    refusal = run.refused(END_RUN, id=rid, run_id=run_id, end="completed")
    assert isinstance(refusal, IllegalTransition)  # ended already
    result = run.load(ObservationResult, rid)
    assert (result.data_product_status, result.next_eligible_run_at) == ("BLOCKED", None)
