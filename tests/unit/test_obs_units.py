"""Executed obs units through their handlers, the unit of work and the in-memory store."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest

from commands.obs_units import ObsUnitCommand
from commands.registry import COMMANDS
from commands.unit_of_work import UnitOfWork
from domain.errors import IllegalTransition, TargetNotFound
from domain.obs_units import ExecutedObsUnit
from infra.event_store import EventStore, IntegrityError
from tests.unit.runner import NIGHT, CommandRunner

START = ObsUnitCommand.EXECUTED_OBS_UNIT_START
FINISH = ObsUnitCommand.EXECUTED_OBS_UNIT_FINISH


def started(run: CommandRunner) -> ExecutedObsUnit:
    unit_id = uuid4()
    run(START, id=unit_id, obs_unit_id="OU-2026-0412", instrument="HARPS", start_time=NIGHT,
        metadata={"airmass": 1.2})
    return run.load(ExecutedObsUnit, unit_id)


def test_start_records_a_running_unit(run: CommandRunner) -> None:
    unit_id = uuid4()
    applied = run(START, id=unit_id, obs_unit_id="OU-2026-0412", instrument="HARPS",
                  start_time=NIGHT, metadata={"airmass": 1.2})
    assert applied.ids == [unit_id]
    assert applied.names == ["ExecutedObsUnit.Started"]
    assert applied.positions == [1]
    unit = run.load(ExecutedObsUnit, unit_id)
    assert (unit.status, unit.obs_unit_id, unit.instrument) == ("running", "OU-2026-0412",
                                                                "HARPS")
    assert unit.start_time == NIGHT and unit.metadata == {"airmass": 1.2}
    assert unit.started_by == "night-operator"


def test_finish_records_the_outcome_and_merges_metadata(run: CommandRunner) -> None:
    unit = started(run)
    applied = run(FINISH, id=unit.id, status="aborted", end_time=NIGHT + timedelta(hours=1),
                  metadata={"reason": "clouds"})
    assert applied.names == ["ExecutedObsUnit.Finished"]
    unit = run.load(ExecutedObsUnit, unit.id)
    assert unit.status == "aborted"
    assert unit.end_time == NIGHT + timedelta(hours=1)
    assert unit.metadata == {"airmass": 1.2, "reason": "clouds"}
    assert run.history(unit.id) == ["Started", "Finished"]


@pytest.mark.parametrize("second", ["success", "failed", "aborted"])
def test_a_finished_unit_cannot_finish_again(run: CommandRunner, second: str) -> None:
    unit = started(run)
    run(FINISH, id=unit.id, status="success", end_time=NIGHT + timedelta(hours=1))
    refusal = run.refused(FINISH, id=unit.id, status=second,
                          end_time=NIGHT + timedelta(hours=2))
    assert isinstance(refusal, IllegalTransition) and refusal.field == "status"
    assert run.load(ExecutedObsUnit, unit.id).status == "success"
    assert run.history(unit.id) == ["Started", "Finished"]


def test_finish_before_the_start_is_refused(run: CommandRunner) -> None:
    unit = started(run)
    refusal = run.refused(FINISH, id=unit.id, status="success",
                          end_time=NIGHT - timedelta(minutes=1))
    assert isinstance(refusal, IllegalTransition) and refusal.field == "end_time"
    assert run.load(ExecutedObsUnit, unit.id).status == "running"


def test_finishing_an_unknown_unit_names_it(run: CommandRunner) -> None:
    missing = uuid4()
    refusal = run.refused(FINISH, id=missing, status="success", end_time=NIGHT)
    assert isinstance(refusal, TargetNotFound)
    assert refusal.field == "id" and str(missing) in refusal.message


def test_a_second_start_with_the_same_id_collides_in_the_store(run: CommandRunner,
                                                               store: EventStore) -> None:
    """The unit of work only knows its batch; the store refuses a second first event (the
    dispatcher turns this into a conflict: tests/unit/test_dispatcher.py)."""
    unit = started(run)
    with pytest.raises(IntegrityError):
        run(START, id=unit.id, obs_unit_id="OU-2026-0413", instrument="ESPRESSO",
            start_time=NIGHT)
    assert store.max_position() == 1
    assert run.load(ExecutedObsUnit, unit.id).obs_unit_id == "OU-2026-0412"


def test_a_unit_of_work_sees_its_own_changes_before_saving(run: CommandRunner,
                                                           store: EventStore) -> None:
    """Start and finish in one batch: the finish finds the unit the start created."""
    uow = UnitOfWork(store)
    unit_id = uuid4()
    start, finish = COMMANDS[START], COMMANDS[FINISH]
    start.handle(start.model.model_validate(
        {"id": unit_id, "obs_unit_id": "OU-1", "instrument": "HARPS", "start_time": NIGHT}),
        uow, run.provenance(), run.policy)
    finish.handle(finish.model.model_validate(
        {"id": unit_id, "status": "success", "end_time": NIGHT + timedelta(hours=1)}),
        uow, run.provenance(), run.policy)
    events = uow.collect()
    assert [type(e).__qualname__ for e in events] == ["ExecutedObsUnit.Started",
                                                      "ExecutedObsUnit.Finished"]
    assert store.max_position() == 0  # nothing saved until the batch is
    store.save(*events)
    assert run.load(ExecutedObsUnit, unit_id).status == "success"
    assert uow.collect() == []
