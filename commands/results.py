"""Observation results: materialized from an observation request's spec, dispatched to
telescopes, fulfilled by task outcomes, and their data products built by processing runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import ConfigDict, Field, model_validator

from commands.models import (
    JSON_DEPTH_NOTE,
    Checksum,
    CommandModel,
    FreeJson,
    Instrument,
    Metadata,
    Name,
    UtcDatetime,
    utcnow,
    with_examples,
)
from commands.obs_units import check_executed_obs_unit
from commands.spec import (
    CommandSpec,
    OverlayChange,
    PendingRows,
    Policy,
    Row,
    Target,
    changes,
)
from commands.unit_of_work import UnitOfWork
from domain.provenance import Provenance
from domain.results import (
    OUTCOME_TARGET,
    CopiesMode,
    Fulfillment,
    ObservationResult,
    RunEnd,
    TaskOutcome,
    copies_per_cell,
    leaf_cells,
)
from infra.journal import JournalEntry


class ResultCommand(StrEnum):
    """The command types of this feature, as the journal stores them."""

    OBSERVATION_RESULT_CANCEL = "observation_result.cancel"
    OBSERVATION_RESULT_CONTRIBUTE_ASSET = "observation_result.contribute_asset"
    OBSERVATION_RESULT_DISPATCH = "observation_result.dispatch"
    OBSERVATION_RESULT_END_RUN = "observation_result.end_run"
    OBSERVATION_RESULT_MATERIALIZE = "observation_result.materialize"
    OBSERVATION_RESULT_REPORT_TASK = "observation_result.report_task"
    OBSERVATION_RESULT_START_RUN = "observation_result.start_run"


#: what commands/registry.py checks: every one of these has a CommandSpec below
COMMAND_TYPES = ResultCommand

RESULT = "observation_result"


# -- the commands ----------------------------------------------------------------------------
LeafIndex = Annotated[int, Field(ge=0, le=2**31 - 1)]


class MaterializeObservationResultsRequest(CommandModel):
    """A request spec: every (epoch, sample, copy) leaf cell becomes an observation result."""

    observation_id: LeafIndex
    request_id: LeafIndex
    epochs: int = Field(1, ge=1, le=100_000)
    samples: int = Field(1, ge=1, le=100_000)
    copies_mode: Literal["single", "all_eligible", "count"] = "single"
    copies: int = Field(1, ge=1, le=1000, description="Copies per cell with copies_mode=count.")
    eligible_instruments: list[Instrument] = Field(
        default_factory=list, max_length=100, json_schema_extra={"uniqueItems": True},
        description="all_eligible: one copy per instrument; otherwise the first, if any, is "
        "the result's instrument.")
    not_before: UtcDatetime | None = None
    spec_snapshot: FreeJson | None = Field(
        None, description=f"The request spec as it was when materialized (stored as is). "
        f"{JSON_DEPTH_NOTE}")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "observation_id": 7, "request_id": 42, "epochs": 3, "samples": 2,
            "copies_mode": "all_eligible", "eligible_instruments": ["HARPS", "ESPRESSO"],
            "not_before": "2026-11-22T00:00:00Z", "spec_snapshot": {"exptime": 600}}],
            "description": "A request spec: every (epoch, sample, copy) leaf cell becomes an "
            "observation result; at most 100,000 cells (epochs x samples x copies) per "
            "command (422: JSON Schema cannot multiply).",
            # copies only with copies_mode=count; all_eligible needs eligible_instruments
            "oneOf": [
                {"properties": {"copies_mode": {"const": "single"}, "copies": {"const": 1}}},
                {"properties": {"copies_mode": {"const": "all_eligible"},
                                "copies": {"const": 1},
                                "eligible_instruments": {"minItems": 1}},
                 "required": ["copies_mode", "eligible_instruments"]},
                {"properties": {"copies_mode": {"const": "count"}},
                 "required": ["copies_mode"]}]},
    )

    @model_validator(mode="after")
    def _copies(self) -> MaterializeObservationResultsRequest:
        if self.copies_mode == "all_eligible" and not self.eligible_instruments:
            raise ValueError("copies_mode all_eligible needs eligible_instruments")
        if len(set(self.eligible_instruments)) != len(self.eligible_instruments):
            raise ValueError("eligible_instruments repeats an instrument")
        if self.copies_mode != "count" and "copies" in self.model_fields_set \
                and self.copies != 1:
            raise ValueError("copies is only meaningful with copies_mode=count")
        if self.cell_count() > MAX_RESULTS_PER_COMMAND:
            raise ValueError(f"the spec has {self.cell_count()} leaf cells; at most "
                             f"{MAX_RESULTS_PER_COMMAND} per command")
        return self

    def cells(self) -> Iterator[tuple[UUID, int, int, int, str | None]]:
        """(result id, epoch, sample, copy, instrument) of every leaf cell."""
        return leaf_cells(self.observation_id, self.request_id, self.epochs, self.samples,
                          self.copies_per_cell())

    def copies_per_cell(self) -> list[str | None]:
        return copies_per_cell(CopiesMode(self.copies_mode), self.copies,
                               self.eligible_instruments)

    def cell_count(self) -> int:
        return self.epochs * self.samples * len(self.copies_per_cell())


MAX_RESULTS_PER_COMMAND = 100_000


class DispatchObservationResultRequest(CommandModel):
    task_id: UUID | None = Field(None, description="Pre-generated task id.")
    instrument_id: Instrument | None = None
    executed_obs_unit_id: UUID | None = Field(
        None, description="The executed obs unit carrying out the task, if known.")

    model_config = with_examples({
        "instrument_id": "HARPS", "executed_obs_unit_id": "e433bda1-579b-4946-9f02-7a3e4a04efe2"})


class DispatchObservationResult(DispatchObservationResultRequest):
    id: UUID
    task_id: UUID


class TaskOutcomeRequest(CommandModel):
    outcome: Literal["succeeded", "partial", "failed", "canceled"]
    finished_at: UtcDatetime = Field(default_factory=utcnow)
    executed_obs_unit_id: UUID | None = None

    model_config = with_examples({"outcome": "succeeded", "finished_at": "2026-11-22T03:10:00Z"})


class ReportTaskOutcome(TaskOutcomeRequest):
    id: UUID
    task_id: UUID


class CancelObservationResultRequest(CommandModel):
    reason: Annotated[str, Field(min_length=1, max_length=2000)]

    model_config = with_examples({"reason": "request withdrawn by the PI"})


class CancelObservationResult(CancelObservationResultRequest):
    id: UUID


class ContributeAssetRequest(CommandModel):
    asset_id: Annotated[str, Field(min_length=1, max_length=255, description=(
        "What contributes (e.g. raw_data_file:<id>); counted once per result."))]

    model_config = with_examples(
        {"asset_id": "raw_data_file:1c49d49d-34d9-5c36-be8c-62dcce3da68c"})


class ContributeAsset(ContributeAssetRequest):
    id: UUID


class StartProcessingRunRequest(CommandModel):
    run_id: UUID | None = Field(None, description="Pre-generated processing run id.")

    model_config = with_examples({"run_id": "0e5c1b1e-6f57-4d0c-9a53-3c3f4b7e2d11"})


class StartProcessingRun(StartProcessingRunRequest):
    id: UUID
    run_id: UUID


class ProductOutput(CommandModel):
    """One data product a run produced."""

    name: Name
    kind: Annotated[str, Field(min_length=1, max_length=50, examples=["combined_image"])]
    uri: Annotated[str, Field(max_length=2048)] | None = None
    size: int | None = Field(None, ge=0)
    checksum: Checksum | None = None
    metadata: Metadata


class EndProcessingRunRequest(CommandModel):
    end: Literal["completed", "failed", "blocked", "skipped"]
    outputs: list[ProductOutput] = Field(default_factory=list, max_length=10_000)
    error: Annotated[str, Field(max_length=4000)] | None = None

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        # a completed run has no error; another has no outputs
        "oneOf": [{"properties": {"end": {"const": "completed"}, "error": {"type": "null"}}},
                  {"properties": {"end": {"enum": ["failed", "blocked", "skipped"]},
                                  "outputs": {"maxItems": 0}}}],
        "examples": [
            {"end": "completed", "outputs": [{
                "name": "OR-7-42-0-1-0_combined.fits", "kind": "combined_image",
                "uri": "products/7/42/combined.fits", "size": 16793280,
                "checksum": {"algorithm": "sha256", "value": "ab" * 32}}]},
            {"end": "failed", "error": "no master bias among the inputs"}]})

    @model_validator(mode="after")
    def _consistent(self) -> EndProcessingRunRequest:
        if self.end == "completed" and self.error is not None:
            raise ValueError("a completed run has no error")
        if self.end != "completed" and self.outputs:
            raise ValueError(f"a {self.end} run has no outputs")
        return self


class EndProcessingRun(EndProcessingRunRequest):
    id: UUID
    run_id: UUID


# -- handlers --------------------------------------------------------------------------------
def materialize_observation_results(
    cmd: MaterializeObservationResultsRequest, uow: UnitOfWork, prov: Provenance,
    policy: Policy,
) -> list[UUID]:
    """Every leaf cell of the spec; cells that exist already are left alone (idempotent)."""
    cells = list(cmd.cells())
    absent = set(uow.absent([rid for rid, *_ in cells]))
    created = []
    for rid, epoch, sample, copy, instrument in cells:
        if rid in absent:
            result = ObservationResult.materialize(
                cmd.observation_id, cmd.request_id, epoch, sample, copy, instrument,
                CopiesMode(cmd.copies_mode), cmd.not_before, cmd.spec_snapshot, prov)
            uow.add(result, "observation result")
            created.append(rid)
    return created


#: the handler of a command to an existing result, from what it does to the result
_changes_result = changes(ObservationResult, "observation result")


def dispatch_observation_result(
    cmd: DispatchObservationResult, uow: UnitOfWork, prov: Provenance, policy: Policy
) -> list[UUID]:
    check_executed_obs_unit(uow, cmd.executed_obs_unit_id)
    result = uow.for_update(ObservationResult, cmd.id, "observation result", "id")
    result.dispatch(cmd.task_id, cmd.instrument_id, cmd.executed_obs_unit_id, policy.clock(),
                    prov)
    return [result.id]


@_changes_result
def report_task_outcome(result: ObservationResult, cmd: ReportTaskOutcome, prov: Provenance,
                        _: Policy) -> None:
    result.report_task(cmd.task_id, TaskOutcome(cmd.outcome), cmd.finished_at,
                       cmd.executed_obs_unit_id, prov)


@_changes_result
def cancel_observation_result(result: ObservationResult, cmd: CancelObservationResult,
                              prov: Provenance, policy: Policy) -> None:
    result.cancel(cmd.reason, policy.clock(), prov)


@_changes_result
def contribute_asset(result: ObservationResult, cmd: ContributeAsset, prov: Provenance,
                     policy: Policy) -> None:
    result.contribute_asset(cmd.asset_id, policy.clock(), policy.result_debounce, prov)


@_changes_result
def start_processing_run(result: ObservationResult, cmd: StartProcessingRun, prov: Provenance,
                         policy: Policy) -> None:
    result.start_run(cmd.run_id, policy.clock(), prov)


@_changes_result
def end_processing_run(result: ObservationResult, cmd: EndProcessingRun, prov: Provenance,
                       policy: Policy) -> None:
    result.end_run(cmd.run_id, RunEnd(cmd.end),
                   [o.model_dump(mode="json") for o in cmd.outputs], cmd.error,
                   policy.clock(), policy.run_retry_limit, policy.run_retry_base, prov)


# -- how a pending command shows in smart queries (marked pending; the applied command may
# differ where the outcome depends on state only the dispatcher sees) -------------------------
def _materialized(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    copies = copies_per_cell(CopiesMode(p["copies_mode"]), p["copies"],
                             p.get("eligible_instruments") or [])
    for rid, epoch, sample, copy, instrument in leaf_cells(
            p["observation_id"], p["request_id"], p["epochs"], p["samples"], copies):
        o.create(RESULT, str(rid), {
            "id": str(rid), "short_id": None, "observation_id": p["observation_id"],
            "request_id": p["request_id"], "epoch_index": epoch, "sample_index": sample,
            "copy_index": copy, "instrument_id": instrument, "copies_mode": p["copies_mode"],
            "not_before": p.get("not_before"), "spec_snapshot": p.get("spec_snapshot"),
            "fulfillment_status": "pending_dispatch", "fulfilled_on": None, "task_count": 0,
            "data_product_status": "PENDING", "assets_revision": 0,
            "dirty_from_revision": None, "dirty": False, "next_eligible_run_at": None,
            "last_built_revision": None, "current_processing_run_id": None,
            "failed_runs": 0}, e)


def _result_patch(change: Callable[[Row, dict[str, Any]], None]) -> OverlayChange:
    def overlay(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
        o.patch(RESULT, p["id"], e, lambda r: change(r, p))
    return overlay


def _dispatched(r: Row, p: dict[str, Any]) -> None:
    if r["fulfillment_status"] in ("pending_dispatch", "partially_fulfilled"):
        r.update(fulfillment_status="dispatched", task_count=r["task_count"] + 1)


def _task_ended(r: Row, p: dict[str, Any]) -> None:
    if r["fulfillment_status"] == "dispatched":
        target = OUTCOME_TARGET[TaskOutcome(p["outcome"])]
        r.update(fulfillment_status=target.value, fulfilled_on=p["finished_at"]
                 if target is Fulfillment.FULFILLED else None)


def _canceled(r: Row, p: dict[str, Any]) -> None:
    if r["fulfillment_status"] not in ("fulfilled", "canceled"):
        r["fulfillment_status"] = "canceled"


def _asset(r: Row, p: dict[str, Any]) -> None:
    r["assets_revision"] += 1  # unless the asset was counted already: known once applied
    r["dirty_from_revision"] = r["dirty_from_revision"] or r["assets_revision"]
    r["dirty"] = True
    if r["data_product_status"] != "BUILDING":
        r["data_product_status"] = "STALE" if r["last_built_revision"] is not None \
            else "PENDING"


def _run_started(r: Row, p: dict[str, Any]) -> None:
    if r["current_processing_run_id"] is None:
        r.update(data_product_status="BUILDING", current_processing_run_id=p["run_id"])


def _run_ended(r: Row, p: dict[str, Any]) -> None:
    if r["current_processing_run_id"] == p["run_id"]:
        status = {"completed": "READY", "failed": "FAILED", "blocked": "BLOCKED",
                  "skipped": "SKIPPED"}[p["end"]]
        r.update(data_product_status=status, current_processing_run_id=None)


def _subjects(cmd: Any) -> list[str]:
    return [f"observation_result:{cmd.id}"]


_EXISTING = Target(RESULT, "observation result", one_pending=False)

SPECS = [
    CommandSpec(
        ResultCommand.OBSERVATION_RESULT_MATERIALIZE, MaterializeObservationResultsRequest,
        materialize_observation_results,
        lambda c: [f"observation_request:{c.observation_id}/{c.request_id}",
                   *(f"observation_result:{rid}" for rid, *_ in c.cells())],
        generated=(), creates=RESULT,
        ids=lambda c: {"observation_result_ids": [str(rid) for rid, *_ in c.cells()]},
        overlay=_materialized, shows=(RESULT,)),
    CommandSpec(ResultCommand.OBSERVATION_RESULT_DISPATCH, DispatchObservationResult,
                dispatch_observation_result, _subjects, generated=("task_id",),
                target=_EXISTING,
                ids=lambda c: {"observation_result_id": str(c.id), "task_id": str(c.task_id)},
                overlay=_result_patch(_dispatched), shows=(RESULT,)),
    CommandSpec(ResultCommand.OBSERVATION_RESULT_REPORT_TASK, ReportTaskOutcome,
                report_task_outcome, _subjects, target=_EXISTING,
                overlay=_result_patch(_task_ended), shows=(RESULT,)),
    CommandSpec(ResultCommand.OBSERVATION_RESULT_CANCEL, CancelObservationResult,
                cancel_observation_result, _subjects, target=_EXISTING,
                overlay=_result_patch(_canceled), shows=(RESULT,)),
    CommandSpec(ResultCommand.OBSERVATION_RESULT_CONTRIBUTE_ASSET, ContributeAsset,
                contribute_asset, _subjects, target=_EXISTING,
                overlay=_result_patch(_asset), shows=(RESULT,)),
    CommandSpec(ResultCommand.OBSERVATION_RESULT_START_RUN, StartProcessingRun,
                start_processing_run, _subjects, generated=("run_id",), target=_EXISTING,
                ids=lambda c: {"observation_result_id": str(c.id), "run_id": str(c.run_id)},
                overlay=_result_patch(_run_started), shows=(RESULT,)),
    CommandSpec(ResultCommand.OBSERVATION_RESULT_END_RUN, EndProcessingRun, end_processing_run,
                _subjects, target=_EXISTING,
                overlay=_result_patch(_run_ended), shows=(RESULT,)),
]
