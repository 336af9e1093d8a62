"""Executed obs units: a telescope's run of one obs unit, started and finished."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import Field

from commands.models import CommandModel, Instrument, Metadata, UtcDatetime, utcnow, with_examples
from commands.spec import CommandSpec, PendingRows, Policy, Row, Target, changes
from commands.unit_of_work import UnitOfWork
from domain.obs_units import ExecutedObsUnit
from domain.provenance import Provenance
from infra.journal import JournalEntry


class ObsUnitCommand(StrEnum):
    """The command types of this feature, as the journal stores them."""

    EXECUTED_OBS_UNIT_FINISH = "executed_obs_unit.finish"
    EXECUTED_OBS_UNIT_START = "executed_obs_unit.start"


#: what commands/registry.py checks: every one of these has a CommandSpec below
COMMAND_TYPES = ObsUnitCommand

UNIT = "executed_obs_unit"


# -- the commands ----------------------------------------------------------------------------
class StartExecutedObsUnitRequest(CommandModel):
    id: UUID | None = Field(
        None, description="Pre-generated execution id; the server generates one if absent."
    )
    obs_unit_id: Annotated[str, Field(min_length=1, max_length=100, examples=["OU-2026-0412"])]
    instrument: Instrument
    start_time: UtcDatetime = Field(
        default_factory=utcnow, description="When the execution started at the telescope (UTC)."
    )
    metadata: Metadata

    model_config = with_examples({
        "obs_unit_id": "OU-2026-0412",
        "instrument": "HARPS",
        "start_time": "2026-11-21T23:14:05Z",
        "metadata": {"airmass": 1.12, "seeing_arcsec": 0.8},
    })


class StartExecutedObsUnit(StartExecutedObsUnitRequest):
    id: UUID


class FinishExecutedObsUnitRequest(CommandModel):
    status: Literal["success", "failed", "aborted"] = Field(examples=["success"])
    end_time: UtcDatetime = Field(default_factory=utcnow)
    metadata: Metadata

    model_config = with_examples(
        {"status": "success", "end_time": "2026-11-22T00:02:40Z", "metadata": {"exposures": 12}})


class FinishExecutedObsUnit(FinishExecutedObsUnitRequest):
    id: UUID


# -- handlers --------------------------------------------------------------------------------
def check_executed_obs_unit(uow: UnitOfWork, unit_id: UUID | None,
                            field: str = "executed_obs_unit_id") -> None:
    """The executed obs unit a command names, if it names one, exists (else the command is
    refused naming ``field``)."""
    if unit_id is not None:
        uow.get(ExecutedObsUnit, unit_id, "executed obs unit", field)


def start_executed_obs_unit(
    cmd: StartExecutedObsUnit, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    unit = ExecutedObsUnit.start(
        cmd.id, cmd.obs_unit_id, cmd.instrument, cmd.start_time, cmd.metadata, prov
    )
    uow.add(unit, "executed obs unit")
    return [unit.id]


@changes(ExecutedObsUnit, "executed obs unit")
def finish_executed_obs_unit(unit: ExecutedObsUnit, cmd: FinishExecutedObsUnit,
                             prov: Provenance, _: Policy) -> None:
    unit.finish(cmd.status, cmd.end_time, cmd.metadata, prov)


# -- how a pending command shows in smart queries --------------------------------------------
def _started(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    o.create(UNIT, p["id"], {
        "id": p["id"], "obs_unit_id": p["obs_unit_id"], "instrument": p["instrument"],
        "status": "running", "start_time": p["start_time"], "end_time": None,
        "metadata": p.get("metadata", {}), "started_by": e.actor, "finished_by": None}, e)


def _finished(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    def change(r: Row) -> None:
        if r["status"] == "running":
            r.update(status=p["status"], end_time=p["end_time"], finished_by=e.actor,
                     metadata={**r.get("metadata", {}), **p.get("metadata", {})})
    o.patch(UNIT, p["id"], e, change)


SPECS = [
    CommandSpec(
        ObsUnitCommand.EXECUTED_OBS_UNIT_START, StartExecutedObsUnit, start_executed_obs_unit,
        lambda c: [f"executed_obs_unit:{c.id}", f"obs_unit:{c.obs_unit_id}"],
        creates=UNIT, overlay=_started, shows=(UNIT,),
    ),
    CommandSpec(
        ObsUnitCommand.EXECUTED_OBS_UNIT_FINISH, FinishExecutedObsUnit, finish_executed_obs_unit,
        lambda c: [f"executed_obs_unit:{c.id}"],
        target=Target(UNIT, "executed obs unit", frozenset({"success", "failed", "aborted"})),
        overlay=_finished, shows=(UNIT,),
    ),
]
