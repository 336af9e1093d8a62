"""Processing jobs: the commands (pydantic models), their handlers and ``CommandSpec``s.

Operators request ``ingest``, ``process`` and ``catalog`` jobs and cancel them; workers
(``workers/processing_worker.py``) claim a job (a lease), renew the lease, report steps and
progress, and end the job (succeed, fail, confirm a cancel) through the same journal →
dispatcher path, each command carrying the worker id and attempt that holds the lease.
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import ConfigDict, Field, model_validator

from commands.models import CommandModel, FreeJson, UtcDatetime, document_storable, with_examples
from commands.spec import CommandSpec, Policy, Target, changes
from commands.unit_of_work import UnitOfWork
from domain.errors import InvalidCommand
from domain.processing import (
    DEFAULT_MAX_ATTEMPTS,
    DataProduct,
    JobKind,
    ProcessingJob,
)
from domain.provenance import Provenance
from domain.raw_data import RawDataFile


class ProcessingCommand(StrEnum):
    """The command types of this feature, as the journal stores them."""

    PROCESSING_JOB_CANCEL = "processing_job.cancel"
    PROCESSING_JOB_CLAIM = "processing_job.claim"
    PROCESSING_JOB_COMPLETE_STEP = "processing_job.complete_step"
    PROCESSING_JOB_CONFIRM_CANCEL = "processing_job.confirm_cancel"
    PROCESSING_JOB_FAIL = "processing_job.fail"
    PROCESSING_JOB_PROGRESS = "processing_job.progress"
    PROCESSING_JOB_RENEW = "processing_job.renew"
    PROCESSING_JOB_REQUEST = "processing_job.request"
    PROCESSING_JOB_START_STEP = "processing_job.start_step"
    PROCESSING_JOB_SUCCEED = "processing_job.succeed"


#: what commands/registry.py checks: every one of these has a CommandSpec below
COMMAND_TYPES = ProcessingCommand

Reason = Annotated[str, Field(min_length=1, max_length=4000)]
WorkerId = Annotated[str, Field(min_length=1, max_length=200, examples=["host-1:4242:ab12"])]
AlgorithmName = Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$",
                                     examples=["ccd_stack"])]
VersionText = Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[A-Za-z0-9_.+-]+$",
                                   examples=["1.1.0"])]
StepName = Annotated[str, Field(min_length=1, max_length=200)]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
Parameters = Annotated[FreeJson, Field(
    default_factory=dict, description="The algorithm's parameters (its JSON schema: "
    "GET /ops/algorithms).", examples=[{"sigma": 3.0}])]


def _algorithm_variants(default: str) -> list[dict[str, Any]]:
    """One schema per registered algorithm version (its parameters), and one per algorithm
    for its latest version (no algorithm_version); the default algorithm's need no name."""
    from commands.algorithms import registered_algorithms

    variants: list[dict[str, Any]] = []
    latest: dict[str, dict[str, Any]] = {}
    for a in registered_algorithms():  # in version order: the last of a name is its latest
        params = a.Parameters.model_json_schema()
        document_storable(params)
        named = [] if a.name == default else ["algorithm"]
        variants.append({"properties": {"algorithm": {"const": a.name},
                                        "algorithm_version": {"const": a.version},
                                        "parameters": params},
                         "required": [*named, "algorithm_version"]})
        latest[a.name] = {"properties": {"algorithm": {"const": a.name},
                                         "algorithm_version": {"type": "null"},
                                         "parameters": params},
                          **({"required": named} if named else {})}
    return variants + list(latest.values())


def _inputs_schema(examples: list[dict[str, Any]], algorithms: bool = False,
                   window: bool = False) -> Any:
    """The JSON schema additions of a request naming inputs (and an algorithm; with
    ``window``, or selecting them by the time they were written)."""
    def extra(schema: dict[str, Any]) -> None:
        schema["examples"] = examples
        # file_ids and/or result_ids (or a bound of the time window)
        schema["anyOf"] = [{"properties": {name: {"minItems": 1}}, "required": [name]}
                           for name in ("file_ids", "result_ids")]
        if window:
            schema["anyOf"] += [{"required": [name]} for name in ("start_time", "end_time")]
        if algorithms:
            default = schema["properties"]["algorithm"]["default"]
            schema["oneOf"] = _algorithm_variants(default)
    return extra

_FILES: Any = Field(default_factory=list, max_length=1000,
               description="Raw data file ids (GET /raw_data_files).")
_RESULTS: Any = Field(default_factory=list, max_length=100,
                 description="Observation result ids: their assets (raw data files) are used.")


#: What a catalog job records on its products: free JSON.
CatalogMetadata = Annotated[FreeJson, Field(
    description="Recorded on every product catalogued (a key given "
    "again replaces its value); GET /products/{id} shows it.",
    examples=[{"release": "DR1", "pi": "A. Observer"}])]

# -- what operators send (HTTP bodies) --------------------------------------------------------
class _Inputs(CommandModel):
    file_ids: list[UUID] = _FILES
    result_ids: list[UUID] = _RESULTS

    @model_validator(mode="after")
    def _some(self) -> _Inputs:
        if not self.file_ids and not self.result_ids:
            raise ValueError("give file_ids and/or result_ids")
        return self


class PlanRequest(_Inputs):
    """What a processing job would do, without running anything."""

    algorithm: AlgorithmName = "ccd_stack"
    algorithm_version: VersionText | None = Field(None, description="Latest when absent.")
    parameters: Parameters
    start_time: UtcDatetime | None = Field(None, description=(
        "With end_time, or alone: the raw data files written (created_at) from this time on "
        "are inputs too (the processing seed's time window)."))
    end_time: UtcDatetime | None = Field(None, description=(
        "The raw data files written before this time (after start_time)."))

    model_config = ConfigDict(extra="forbid", json_schema_extra=_inputs_schema([
        {"file_ids": ["1c49d49d-34d9-5c36-be8c-62dcce3da68c"], "algorithm": "ccd_stack",
         "parameters": {"sigma": 3.0}},
        {"start_time": "2026-11-21T20:00:00Z", "end_time": "2026-11-22T06:00:00Z",
         "parameters": {"sigma": 3.0}}], algorithms=True, window=True))

    @model_validator(mode="after")
    def _some(self) -> PlanRequest:  # replaces _Inputs': a time window selects inputs too
        if not (self.file_ids or self.result_ids or self.start_time or self.end_time):
            raise ValueError("give file_ids, result_ids and/or start_time/end_time")
        if self.start_time and self.end_time and self.end_time <= self.start_time:
            raise ValueError("end_time must be after start_time")
        return self


class IngestRequest(_Inputs):
    """Validate raw FITS inputs and record their header facts."""

    id: UUID | None = Field(None, description="Pre-generated job id (the server's if absent).")

    model_config = ConfigDict(extra="forbid", json_schema_extra=_inputs_schema([
        {"file_ids": ["1c49d49d-34d9-5c36-be8c-62dcce3da68c"]}]))


class ProcessRequest(_Inputs):
    """Build data products from raw data files with an algorithm."""

    id: UUID | None = Field(None, description="Pre-generated job id (the server's if absent).")
    algorithm: AlgorithmName = "ccd_stack"
    algorithm_version: VersionText | None = Field(None, description="Latest when absent.")
    parameters: Parameters
    catalog: bool = Field(False, description="Catalog the products as soon as they are built.")
    publish: bool = Field(False, description="With catalog: publish them.")
    archive: bool = Field(False, description="With catalog: archive them.")

    model_config = ConfigDict(extra="forbid", json_schema_extra=_inputs_schema([
        {"file_ids": ["1c49d49d-34d9-5c36-be8c-62dcce3da68c"], "algorithm": "ccd_stack",
         "parameters": {"sigma": 3.0}, "catalog": True, "publish": True}], algorithms=True))


class CatalogRequest(CommandModel):
    """Register built products in the catalog."""

    id: UUID | None = Field(None, description="Pre-generated job id (the server's if absent).")
    product_ids: list[UUID] = Field(min_length=1, max_length=1000)
    publish: bool = False
    archive: bool = False
    metadata: CatalogMetadata = Field(default_factory=dict)

    model_config = with_examples(
        {"product_ids": ["5b1d6c3e-2a0f-5e8b-9c47-1d2e3f405162"], "publish": True,
         "metadata": {"release": "DR1", "pi": "A. Observer"}})


class CancelJobRequest(CommandModel):
    reason: Annotated[str, Field(max_length=2000)] | None = None


# -- the journaled commands -------------------------------------------------------------------
class RequestProcessingJob(CommandModel):
    id: UUID | None = None  # pre-generated before journaling
    kind: Literal["ingest", "process", "catalog"]
    file_ids: list[UUID] = Field(default_factory=list, max_length=10_000)
    product_ids: list[UUID] = Field(default_factory=list, max_length=10_000)
    algorithm: AlgorithmName | None = None
    algorithm_version: VersionText | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    result_id: UUID | None = None
    run_id: UUID | None = None
    catalog: bool = False
    publish: bool = False
    archive: bool = False
    max_attempts: int = Field(DEFAULT_MAX_ATTEMPTS, ge=1, le=100)
    metadata: CatalogMetadata = Field(default_factory=dict)


class ClaimProcessingJob(CommandModel):
    id: UUID
    worker: WorkerId
    lease_s: float = Field(gt=0, le=86_400)


class _Held(CommandModel):
    id: UUID
    worker: WorkerId
    attempt: int = Field(ge=1)


class RenewProcessingLease(_Held):
    lease_s: float = Field(gt=0, le=86_400)


class ProcessingStep(_Held):
    name: StepName


class ProcessingProgress(_Held):
    fraction: float = Field(ge=0.0, le=1.0)


class ProductInputUse(CommandModel):
    """How a process job used one of its inputs for a product."""

    file_id: UUID
    role: Annotated[str, Field(min_length=1, max_length=30, pattern=r"^[a-z][a-z0-9_]*$",
                               examples=["bias", "science"])]
    classified_from: Annotated[str, Field(max_length=255, examples=["IMAGETYP 'ZERO'"])] | None \
        = None


class ProductOutputFile(CommandModel):
    """A product a process job built and uploaded."""

    kind: Annotated[str, Field(min_length=1, max_length=50)]
    name: Annotated[str, Field(min_length=1, max_length=255)]
    area: Annotated[str, Field(min_length=1, max_length=30)]
    key: Annotated[str, Field(min_length=1, max_length=1024)]
    uri: Annotated[str, Field(max_length=2048)] | None = None
    size: int = Field(ge=0)
    sha256: Sha256
    media_type: Annotated[str, Field(min_length=1, max_length=100)]
    metrics: dict[str, Any] = Field(default_factory=dict)
    inputs: list[ProductInputUse] = Field(default_factory=list, max_length=1000, description=(
        "The role the algorithm gave each input (bias, dark, flat, science) and what said so."))


class IngestedFile(CommandModel):
    """What an ingest job found in a raw data file."""

    file_id: UUID
    name: Annotated[str, Field(max_length=255)]
    metadata: dict[str, Any] = Field(default_factory=dict)


class SucceedProcessingJob(_Held):
    products: list[ProductOutputFile] = Field(default_factory=list, max_length=1000)
    files: list[IngestedFile] = Field(default_factory=list, max_length=10_000)
    catalogued: list[UUID] = Field(default_factory=list, max_length=10_000)
    software: dict[str, str] = Field(default_factory=dict)


class FailProcessingJob(_Held):
    reason: Reason
    retryable: bool = False


class CancelProcessingJob(CancelJobRequest):
    id: UUID


class ConfirmProcessingCancel(_Held):
    pass


# -- handlers ---------------------------------------------------------------------------------
#: the handler of a command to an existing job, from what it does to the job
_changes_job = changes(ProcessingJob, "processing job")


def input_of(f: RawDataFile) -> dict[str, Any]:
    """A raw data file as a job records its input (what lineage traces back to)."""
    return {"file_id": str(f.id), "name": f.name, "instrument": f.instrument,
            "relative_path": f.relative_path, "size": f.size,
            "checksum_algorithm": f.checksum_algorithm, "checksum_value": f.checksum_value,
            "file_type": f.file_type,
            "executed_obs_unit_id": None if f.executed_obs_unit_id is None
            else str(f.executed_obs_unit_id),
            "metadata": dict(getattr(f, "fits_metadata", {}) or {})}


def request_job(cmd: RequestProcessingJob, uow: UnitOfWork, prov: Provenance,
                policy: Policy) -> list[UUID]:
    assert cmd.id is not None
    files = [uow.get(RawDataFile, fid, "raw data file", f"file_ids.{i}")
             for i, fid in enumerate(cmd.file_ids)]
    for i, pid in enumerate(cmd.product_ids):
        uow.get(DataProduct, pid, "data product", f"product_ids.{i}")
    job = ProcessingJob.request(
        cmd.id, JobKind(cmd.kind), [input_of(f) for f in files], cmd.product_ids,
        cmd.algorithm, cmd.algorithm_version, cmd.parameters, cmd.result_id, cmd.run_id,
        cmd.catalog, cmd.publish, cmd.archive, cmd.max_attempts, policy.clock(), prov,
        metadata=cmd.metadata)
    uow.add(job, "processing job")
    return [job.id]


@_changes_job
def claim(job: ProcessingJob, cmd: ClaimProcessingJob, prov: Provenance, policy: Policy) -> None:
    job.claim(cmd.worker, timedelta(seconds=cmd.lease_s), policy.clock(), prov)


@_changes_job
def renew(job: ProcessingJob, cmd: RenewProcessingLease, prov: Provenance, policy: Policy) -> None:
    job.renew(cmd.worker, cmd.attempt, timedelta(seconds=cmd.lease_s), policy.clock(), prov)


@_changes_job
def start_step(job: ProcessingJob, cmd: ProcessingStep, prov: Provenance, policy: Policy) -> None:
    job.start_step(cmd.worker, cmd.attempt, cmd.name, policy.clock(), prov)


@_changes_job
def complete_step(job: ProcessingJob, cmd: ProcessingStep, prov: Provenance,
                  policy: Policy) -> None:
    job.complete_step(cmd.worker, cmd.attempt, cmd.name, policy.clock(), prov)


@_changes_job
def progress(job: ProcessingJob, cmd: ProcessingProgress, prov: Provenance,
             policy: Policy) -> None:
    job.report_progress(cmd.worker, cmd.attempt, cmd.fraction, policy.clock(), prov)


def succeed(cmd: SucceedProcessingJob, uow: UnitOfWork, prov: Provenance,
            policy: Policy) -> list[UUID]:
    """The job succeeded: a process job's products are built (and catalogued when asked),
    an ingest job's header facts recorded on the raw data files, a catalog job's products
    catalogued."""
    job = uow.for_update(ProcessingJob, cmd.id, "processing job", "id")
    now = policy.clock()
    kind = JobKind(job.kind)
    known = {i["file_id"] for i in job.inputs}
    if kind is JobKind.PROCESS:
        for i, p in enumerate(cmd.products):
            for j, use in enumerate(p.inputs):
                if str(use.file_id) not in known:
                    raise InvalidCommand(f"raw data file {use.file_id} is not an input of the "
                                         "job", field=f"products.{i}.inputs.{j}.file_id")
        outputs = [p.model_dump(mode="json") for p in cmd.products]
    elif kind is JobKind.INGEST:
        for i, f in enumerate(cmd.files):
            if str(f.file_id) not in known:
                raise InvalidCommand(f"raw data file {f.file_id} is not an input of the job",
                                     field=f"files.{i}.file_id")
        outputs = [f.model_dump(mode="json") for f in cmd.files]
    else:
        outputs = [{"product_id": str(p)} for p in cmd.catalogued]
    job.succeed(cmd.worker, cmd.attempt, outputs, cmd.software, now, prov)
    touched = [job.id]
    if kind is JobKind.PROCESS:
        for output in outputs:
            product = DataProduct.build(job, output, now, prov)
            uow.add(product, "data product")
            if job.catalog:
                product.catalog(job.id, job.publish, job.archive, now, prov)
            touched.append(product.id)
    elif kind is JobKind.INGEST:
        for f in cmd.files:
            raw = uow.for_update(RawDataFile, f.file_id, "raw data file", "files")
            raw.record_ingest(job.id, f.metadata, prov)
            touched.append(raw.id)
    else:
        for i, pid in enumerate(job.product_ids):
            product = uow.for_update(DataProduct, UUID(pid), "data product",
                                     f"product_ids.{i}")
            product.catalog(job.id, job.publish, job.archive, now, prov,
                            job.metadata)
            touched.append(product.id)
    return touched


@_changes_job
def fail(job: ProcessingJob, cmd: FailProcessingJob, prov: Provenance, policy: Policy) -> None:
    job.fail(cmd.worker, cmd.attempt, cmd.reason, cmd.retryable, policy.clock(), prov)


@_changes_job
def cancel(job: ProcessingJob, cmd: CancelProcessingJob, prov: Provenance, policy: Policy) -> None:
    job.request_cancel(cmd.reason, policy.clock(), prov)


@_changes_job
def confirm_cancel(job: ProcessingJob, cmd: ConfirmProcessingCancel, prov: Provenance,
                   policy: Policy) -> None:
    job.confirm_cancel(cmd.worker, cmd.attempt, policy.clock(), prov)


def _subjects(cmd: Any) -> list[str]:
    return [f"processing_job:{cmd.id}"]


def _request_subjects(cmd: RequestProcessingJob) -> list[str]:
    out = [f"processing_job:{cmd.id}"]
    if cmd.result_id is not None:
        out.append(f"observation_result_jobs:{cmd.result_id}")
    return out


JOB = "processing_job"

SPECS = [
    CommandSpec(ProcessingCommand.PROCESSING_JOB_REQUEST, RequestProcessingJob, request_job,
                _request_subjects, creates=JOB),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_CLAIM, ClaimProcessingJob, claim, _subjects,
                generated=()),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_RENEW, RenewProcessingLease, renew, _subjects,
                generated=()),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_START_STEP, ProcessingStep, start_step, _subjects,
                generated=()),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_COMPLETE_STEP, ProcessingStep, complete_step,
                _subjects, generated=()),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_PROGRESS, ProcessingProgress, progress, _subjects,
                generated=()),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_SUCCEED, SucceedProcessingJob, succeed, _subjects,
                generated=()),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_FAIL, FailProcessingJob, fail, _subjects,
                generated=()),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_CANCEL, CancelProcessingJob, cancel, _subjects,
                generated=(), target=Target(JOB, "processing job",
                                            frozenset({"succeeded", "failed", "cancelled"}))),
    CommandSpec(ProcessingCommand.PROCESSING_JOB_CONFIRM_CANCEL, ConfirmProcessingCancel,
                confirm_cancel, _subjects, generated=()),
]
