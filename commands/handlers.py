"""How each critical command changes the domain: one function per command type.

A handler loads what it needs through the unit of work, calls the aggregates (which enforce
the rules), and returns the ids of the entities it created or changed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from commands.models import (
    AddFilesToPackage,
    BulkRegisterRawDataFilesRequest,
    CancelObservationResult,
    CancelStaging,
    CommandModel,
    ContributeAsset,
    CreateRawDataPackage,
    DispatchObservationResult,
    EndProcessingRun,
    FinalizeRawDataPackage,
    FinishExecutedObsUnit,
    MaterializeObservationResultsRequest,
    RawDataFileSpec,
    RegisterRawDataFileRequest,
    ReportStagingProgress,
    ReportTaskOutcome,
    Stage,
    StartExecutedObsUnit,
    StartProcessingRun,
)
from commands.unit_of_work import UnitOfWork
from domain.obs_units import ExecutedObsUnit
from domain.provenance import Provenance
from domain.raw_data import RawDataFile, RawDataPackage
from domain.results import (
    CopiesMode,
    ObservationResult,
    RunEnd,
    TaskOutcome,
)
from domain.staging import StagingRequest
from infra.settings import Settings


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class Policy:
    """What handlers apply beyond the command: configured limits and delays, and the clock."""

    package_size_limit: int
    result_debounce: timedelta = timedelta(seconds=60)
    run_retry_limit: int = 3
    run_retry_base: timedelta = timedelta(seconds=60)
    clock: Callable[[], datetime] = utcnow

    @classmethod
    def from_settings(cls, settings: Settings,
                      clock: Callable[[], datetime] | None = None) -> Policy:
        return cls(package_size_limit=settings.package_size_limit_bytes,
                   result_debounce=timedelta(seconds=settings.result_debounce_s),
                   run_retry_limit=settings.processing_retry_limit,
                   run_retry_base=timedelta(seconds=settings.processing_retry_base_s),
                   clock=clock or utcnow)


Handler = Callable[[Any, UnitOfWork, Provenance, Policy], list[UUID]]


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One kind of critical command: its journaled model and its handler."""

    name: str
    model: type[CommandModel]
    handle: Handler
    subjects: Callable[[Any], list[str]]
    generated: tuple[str, ...] = ("id",)  # ids the server pre-generates when absent


def start_executed_obs_unit(
    cmd: StartExecutedObsUnit, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    unit = ExecutedObsUnit.start(
        cmd.id, cmd.obs_unit_id, cmd.instrument, cmd.start_time, cmd.metadata, prov
    )
    uow.add(unit, "executed obs unit")
    return [unit.id]


def finish_executed_obs_unit(
    cmd: FinishExecutedObsUnit, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    unit = uow.for_update(ExecutedObsUnit, cmd.id, "executed obs unit", "id")
    unit.finish(cmd.status, cmd.end_time, cmd.metadata, prov)
    return [unit.id]


def _register_files(
    specs: list[RawDataFileSpec],
    uow: UnitOfWork,
    prov: Provenance,
    package_id: UUID | None = None,
) -> list[UUID]:
    ids = []
    for i, spec in enumerate(specs):
        if spec.executed_obs_unit_id is not None:
            uow.get(ExecutedObsUnit, spec.executed_obs_unit_id, "executed obs unit",
                    f"files.{i}.executed_obs_unit_id")
        registered = RawDataFile.registration(
            name=spec.name,
            instrument=spec.instrument,
            relative_path=spec.relative_path,
            size=spec.size,
            checksum_algorithm=spec.checksum.algorithm,
            checksum_value=spec.checksum.value,
            executed_obs_unit_id=spec.executed_obs_unit_id,
            file_type=spec.file_type,
            created_at=spec.created_at,
            package_id=package_id,
            provenance=prov,
        )
        ids.append(uow.add_created(registered, f"raw data file {spec.name} of"))
    return ids


def register_raw_data_file(
    cmd: RegisterRawDataFileRequest, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    return _register_files([cmd], uow, prov)


def register_raw_data_files(
    cmd: BulkRegisterRawDataFilesRequest, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    return _register_files(cmd.files, uow, prov)


def create_raw_data_package(
    cmd: CreateRawDataPackage, uow: UnitOfWork, prov: Provenance, limits: Policy
) -> list[UUID]:
    if cmd.executed_obs_unit_id is not None:
        uow.get(ExecutedObsUnit, cmd.executed_obs_unit_id, "executed obs unit",
                "executed_obs_unit_id")
    existing = [
        uow.for_update(RawDataFile, fid, "raw data file", f"file_ids.{i}")
        for i, fid in enumerate(cmd.file_ids)
    ]
    new = [uow.get(RawDataFile, fid, "raw data file")
           for fid in _register_files(cmd.files, uow, prov, package_id=cmd.id)]
    package = RawDataPackage.create(
        package_id=cmd.id,
        name=cmd.name,
        executed_obs_unit_id=cmd.executed_obs_unit_id,
        files=existing + new,
        size_limit=limits.package_size_limit,
        provenance=prov,
    )
    uow.add(package, "raw data package")
    return [package.id, *(f.id for f in existing + new)]


def add_files_to_package(
    cmd: AddFilesToPackage, uow: UnitOfWork, prov: Provenance, limits: Policy
) -> list[UUID]:
    package = uow.for_update(RawDataPackage, cmd.id, "raw data package", "id")
    files = [
        uow.for_update(RawDataFile, fid, "raw data file", f"file_ids.{i}")
        for i, fid in enumerate(cmd.file_ids)
    ]
    package.add_files(files, limits.package_size_limit, prov)
    return [package.id, *(f.id for f in files)]


def finalize_raw_data_package(
    cmd: FinalizeRawDataPackage, uow: UnitOfWork, prov: Provenance, limits: Policy
) -> list[UUID]:
    package = uow.for_update(RawDataPackage, cmd.id, "raw data package", "id")
    package.finalize(limits.package_size_limit, prov)
    return [package.id]


def stage(cmd: Stage, uow: UnitOfWork, prov: Provenance, _: Policy) -> list[UUID]:
    packages = [
        uow.get(RawDataPackage, pid, "raw data package", f"package_ids.{i}")
        for i, pid in enumerate(cmd.package_ids)
    ]
    request = StagingRequest.request(
        staging_id=cmd.id, packages=packages, destination=cmd.destination, provenance=prov
    )
    uow.add(request, "staging request")
    return [request.id]


def report_staging_progress(
    cmd: ReportStagingProgress, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    request = uow.for_update(StagingRequest, cmd.id, "staging request", "id")
    request.report_progress(
        cmd.status, cmd.bytes_transferred, cmd.files_transferred, cmd.message, prov
    )
    return [request.id]


def cancel_staging(cmd: CancelStaging, uow: UnitOfWork, prov: Provenance, _: Policy) -> list[UUID]:
    request = uow.for_update(StagingRequest, cmd.id, "staging request", "id")
    request.cancel(cmd.reason, prov)
    return [request.id]


# -- observation results ---------------------------------------------------------------------
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


def _result(uow: UnitOfWork, result_id: UUID) -> ObservationResult:
    return uow.for_update(ObservationResult, result_id, "observation result", "id")


def dispatch_observation_result(
    cmd: DispatchObservationResult, uow: UnitOfWork, prov: Provenance, policy: Policy
) -> list[UUID]:
    if cmd.executed_obs_unit_id is not None:
        uow.get(ExecutedObsUnit, cmd.executed_obs_unit_id, "executed obs unit",
                "executed_obs_unit_id")
    result = _result(uow, cmd.id)
    result.dispatch(cmd.task_id, cmd.instrument_id, cmd.executed_obs_unit_id, policy.clock(),
                    prov)
    return [result.id]


def report_task_outcome(
    cmd: ReportTaskOutcome, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    result = _result(uow, cmd.id)
    result.report_task(cmd.task_id, TaskOutcome(cmd.outcome), cmd.finished_at,
                       cmd.executed_obs_unit_id, prov)
    return [result.id]


def cancel_observation_result(
    cmd: CancelObservationResult, uow: UnitOfWork, prov: Provenance, policy: Policy
) -> list[UUID]:
    result = _result(uow, cmd.id)
    result.cancel(cmd.reason, policy.clock(), prov)
    return [result.id]


def contribute_asset(
    cmd: ContributeAsset, uow: UnitOfWork, prov: Provenance, policy: Policy
) -> list[UUID]:
    result = _result(uow, cmd.id)
    result.contribute_asset(cmd.asset_id, policy.clock(), policy.result_debounce, prov)
    return [result.id]


def start_processing_run(
    cmd: StartProcessingRun, uow: UnitOfWork, prov: Provenance, policy: Policy
) -> list[UUID]:
    result = _result(uow, cmd.id)
    result.start_run(cmd.run_id, policy.clock(), prov)
    return [result.id]


def end_processing_run(
    cmd: EndProcessingRun, uow: UnitOfWork, prov: Provenance, policy: Policy
) -> list[UUID]:
    result = _result(uow, cmd.id)
    result.end_run(cmd.run_id, RunEnd(cmd.end),
                   [o.model_dump(mode="json") for o in cmd.outputs], cmd.error,
                   policy.clock(), policy.run_retry_limit, policy.run_retry_base, prov)
    return [result.id]


# -- subjects: how the journal indexes a pending command for smart queries -----------------
def _files_subjects(specs: list[RawDataFileSpec]) -> list[str]:
    out = []
    for f in specs:
        out.append(f"raw_data_file:{f.file_id}")
        if f.executed_obs_unit_id:
            out.append(f"executed_obs_unit:{f.executed_obs_unit_id}")
    return out


def _result_subjects(cmd: Any) -> list[str]:
    return [f"observation_result:{cmd.id}"]


def _package_subjects(cmd: CreateRawDataPackage) -> list[str]:
    out = [f"raw_data_package:{cmd.id}", *_files_subjects(cmd.files)]
    out += [f"raw_data_file:{fid}" for fid in cmd.file_ids]
    return out


COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec
    for spec in [
        CommandSpec(
            "executed_obs_unit.start", StartExecutedObsUnit, start_executed_obs_unit,
            lambda c: [f"executed_obs_unit:{c.id}", f"obs_unit:{c.obs_unit_id}"],
        ),
        CommandSpec(
            "executed_obs_unit.finish", FinishExecutedObsUnit, finish_executed_obs_unit,
            lambda c: [f"executed_obs_unit:{c.id}"],
        ),
        CommandSpec(
            "raw_data_file.register", RegisterRawDataFileRequest, register_raw_data_file,
            lambda c: _files_subjects([c]),
        ),
        CommandSpec(
            "raw_data_file.register_bulk", BulkRegisterRawDataFilesRequest,
            register_raw_data_files, lambda c: _files_subjects(c.files),
        ),
        CommandSpec(
            "raw_data_package.create", CreateRawDataPackage, create_raw_data_package,
            _package_subjects,
        ),
        CommandSpec(
            "raw_data_package.add_files", AddFilesToPackage, add_files_to_package,
            lambda c: [f"raw_data_package:{c.id}", *(f"raw_data_file:{f}" for f in c.file_ids)],
        ),
        CommandSpec(
            "raw_data_package.finalize", FinalizeRawDataPackage, finalize_raw_data_package,
            lambda c: [f"raw_data_package:{c.id}"],
        ),
        CommandSpec("staging.stage", Stage, stage, lambda c: [f"staging:{c.id}"]),
        CommandSpec(
            "staging.report_progress", ReportStagingProgress, report_staging_progress,
            lambda c: [f"staging:{c.id}"],
        ),
        CommandSpec("staging.cancel", CancelStaging, cancel_staging,
                    lambda c: [f"staging:{c.id}"]),
        CommandSpec(
            "observation_result.materialize", MaterializeObservationResultsRequest,
            materialize_observation_results,
            lambda c: [f"observation_request:{c.observation_id}/{c.request_id}",
                       *(f"observation_result:{rid}" for rid, *_ in c.cells())],
            generated=()),
        CommandSpec("observation_result.dispatch", DispatchObservationResult,
                    dispatch_observation_result, _result_subjects, generated=("task_id",)),
        CommandSpec("observation_result.report_task", ReportTaskOutcome, report_task_outcome,
                    _result_subjects),
        CommandSpec("observation_result.cancel", CancelObservationResult,
                    cancel_observation_result, _result_subjects),
        CommandSpec("observation_result.contribute_asset", ContributeAsset, contribute_asset,
                    _result_subjects),
        CommandSpec("observation_result.start_run", StartProcessingRun, start_processing_run,
                    _result_subjects, generated=("run_id",)),
        CommandSpec("observation_result.end_run", EndProcessingRun, end_processing_run,
                    _result_subjects),
    ]
}


# -- MAST download jobs: commands/downloads.py adds them to COMMANDS when imported -----------
import commands.downloads  # noqa: E402  (after CommandSpec, Policy and COMMANDS)
import commands.processing  # noqa: E402, F401  (processing jobs, the same way)
