"""The commands telescope automation sends, as pydantic models (also the OpenAPI schema).

A request model is what the client sends; the journaled command adds the ids the server
pre-generated (or the client chose), so the dispatcher needs nothing else to apply it.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from domain.provenance import utc
from domain.raw_data import raw_data_file_id
from domain.results import CopiesMode, copies_per_cell, leaf_cells

Name = Annotated[str, Field(min_length=1, max_length=255)]
Instrument = Annotated[str, Field(min_length=1, max_length=100, examples=["HARPS"])]
Metadata = Annotated[
    dict[str, Any],
    Field(default_factory=dict, description="Free JSON metadata.", examples=[{"airmass": 1.12}]),
]

CHECKSUM_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128, "crc32c": 8, "xxh64": 16}


def _now() -> datetime:
    return datetime.now(UTC)


_INT64 = 2**63


def _check_storable(value: Any, path: str) -> None:
    """Refuse what the stores cannot hold: NUL characters (PostgreSQL text and JSONB) and
    integers beyond 64 bits (BIGINT, orjson); such a command would stall the projector."""
    where = path or "body"
    if isinstance(value, str):
        if "\x00" in value:
            raise ValueError(f"{where}: NUL characters are not allowed")
    elif isinstance(value, bool):
        return
    elif isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise ValueError(f"{where}: integers must fit in 64 bits")
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and "\x00" in k:
                raise ValueError(f"{where}: NUL characters are not allowed in keys")
            _check_storable(v, f"{path}.{k}" if path else str(k))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_storable(v, f"{path}.{i}" if path else str(i))


def _utc_representable(value: datetime) -> datetime:
    try:
        utc(value)
    except OverflowError:
        raise ValueError("must be a time representable in UTC") from None
    return value


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc_representable)]


class CommandModel(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any, info: ValidationInfo) -> Any:
        # parts of a command were checked with the command, and a journaled command was
        # checked before the journal took it (the dispatcher passes JOURNALED)
        if cls not in _NESTED_ONLY and not (info.context and info.context.get("journaled")):
            _check_storable(data, "")
        return data


#: Validation context of a command read back from the journal (checked when accepted).
JOURNALED = {"journaled": True}


# -- executed obs units ----------------------------------------------------------------------
class StartExecutedObsUnitRequest(CommandModel):
    id: UUID | None = Field(
        None, description="Pre-generated execution id; the server generates one if absent."
    )
    obs_unit_id: Annotated[str, Field(min_length=1, max_length=100, examples=["OU-2026-0412"])]
    instrument: Instrument
    start_time: UtcDatetime = Field(
        default_factory=_now, description="When the execution started at the telescope (UTC)."
    )
    metadata: Metadata

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "obs_unit_id": "OU-2026-0412",
                    "instrument": "HARPS",
                    "start_time": "2026-11-21T23:14:05Z",
                    "metadata": {"airmass": 1.12, "seeing_arcsec": 0.8},
                }
            ]
        },
    )


class StartExecutedObsUnit(StartExecutedObsUnitRequest):
    id: UUID


class FinishExecutedObsUnitRequest(CommandModel):
    status: Literal["success", "failed", "aborted"] = Field(examples=["success"])
    end_time: UtcDatetime = Field(default_factory=_now)
    metadata: Metadata

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"status": "success", "end_time": "2026-11-22T00:02:40Z",
                 "metadata": {"exposures": 12}}
            ]
        },
    )


class FinishExecutedObsUnit(FinishExecutedObsUnitRequest):
    id: UUID


# -- raw data files --------------------------------------------------------------------------
class Checksum(CommandModel):
    algorithm: Literal["md5", "sha1", "sha256", "sha512", "crc32c", "xxh64"] = "sha256"
    value: Annotated[str, Field(pattern=r"^[0-9a-fA-F]+$", examples=["9f86d081884c7d65..."])]

    @model_validator(mode="after")
    def _length(self) -> Checksum:
        expected = CHECKSUM_LENGTHS[self.algorithm]
        if len(self.value) != expected:
            raise ValueError(f"a {self.algorithm} checksum has {expected} hex digits")
        self.value = self.value.lower()
        return self


class RawDataFileSpec(CommandModel):
    name: Name
    relative_path: Annotated[str, Field(min_length=1, max_length=1024)]
    size: int = Field(ge=0, description="Size in bytes.")
    checksum: Checksum
    instrument: Instrument
    executed_obs_unit_id: UUID | None = None
    file_type: Annotated[str, Field(min_length=1, max_length=50, examples=["raw_science"])]
    created_at: UtcDatetime = Field(
        default_factory=_now, description="When the instrument wrote the file."
    )

    @field_validator("relative_path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError("must be a relative path inside the instrument's data root")
        return v

    @property
    def file_id(self) -> UUID:
        return raw_data_file_id(self.instrument, self.name)


_NESTED_ONLY: tuple[type[CommandModel], ...] = (Checksum, RawDataFileSpec)

_FILE_EXAMPLE: dict[str, Any] = {
    "name": "HARPS.2026-11-21T23:15:00.123.fits",
    "relative_path": "2026-11-21/HARPS.2026-11-21T23:15:00.123.fits",
    "size": 16_793_280,
    "checksum": {"algorithm": "md5", "value": "0f343b0931126a20f133d67c2b018a3b"},
    "instrument": "HARPS",
    "file_type": "raw_science",
    "created_at": "2026-11-21T23:15:00Z",
}


class RegisterRawDataFileRequest(RawDataFileSpec):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_FILE_EXAMPLE]})


def _unique_names(files: list[RawDataFileSpec]) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, f in enumerate(files):
        key = (f.instrument, f.name)
        if key in seen:
            raise ValueError(
                f"files.{i}: {f.name} of {f.instrument} repeats files.{seen[key]}"
            )
        seen[key] = i


class BulkRegisterRawDataFilesRequest(CommandModel):
    files: list[RawDataFileSpec] = Field(min_length=1)

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"files": [_FILE_EXAMPLE]}]}
    )

    @model_validator(mode="after")
    def _names(self) -> BulkRegisterRawDataFilesRequest:
        _unique_names(self.files)
        return self


# -- raw data packages -----------------------------------------------------------------------
class CreateRawDataPackageRequest(CommandModel):
    id: UUID | None = Field(None, description="Pre-generated package id (server's if absent).")
    name: Name = Field(examples=["HARPS-2026-11-21-OU-2026-0412"])
    executed_obs_unit_id: UUID | None = None
    file_ids: list[UUID] = Field(
        default_factory=list, description="Already registered files to group."
    )
    files: list[RawDataFileSpec] = Field(
        default_factory=list,
        description="Files registered by this same command and grouped into the package.",
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "HARPS-2026-11-21-OU-2026-0412", "files": [_FILE_EXAMPLE]}]
        },
    )

    @model_validator(mode="after")
    def _check(self) -> CreateRawDataPackageRequest:
        _unique_names(self.files)
        if len(set(self.file_ids)) != len(self.file_ids):
            raise ValueError("file_ids repeats an id")
        new_ids = {f.file_id for f in self.files}
        if new_ids & set(self.file_ids):
            raise ValueError("a file is both in files and file_ids")
        return self


class CreateRawDataPackage(CreateRawDataPackageRequest):
    id: UUID


class AddFilesToPackageRequest(CommandModel):
    file_ids: list[UUID] = Field(min_length=1)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"file_ids": ["1c49d49d-34d9-5c36-be8c-62dcce3da68c"]}]},
    )


class AddFilesToPackage(AddFilesToPackageRequest):
    id: UUID


class FinalizeRawDataPackage(CommandModel):
    id: UUID


# -- staging ---------------------------------------------------------------------------------
class StageRequest(CommandModel):
    id: UUID | None = Field(None, description="Pre-generated staging request id.")
    package_ids: list[UUID] = Field(min_length=1, max_length=10_000)
    destination: Annotated[
        str, Field(min_length=1, max_length=1024, examples=["archive-transfer:/stage/night-1121"])
    ]

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "package_ids": ["3fb1d267-f9f6-4599-a97a-74fed41eaa02"],
            "destination": "archive-transfer:/stage/night-1121"}]},
    )

    @field_validator("package_ids")
    @classmethod
    def _unique(cls, v: list[UUID]) -> list[UUID]:
        if len(set(v)) != len(v):
            raise ValueError("package_ids repeats an id")
        return v


class Stage(StageRequest):
    id: UUID


class StagingProgressRequest(CommandModel):
    status: Literal["in_progress", "completed", "failed"] = "in_progress"
    bytes_transferred: int = Field(ge=0)
    files_transferred: int = Field(ge=0)
    message: Annotated[str, Field(max_length=2000)] | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "status": "in_progress", "bytes_transferred": 8_396_640, "files_transferred": 1,
            "message": "transferring HARPS.2026-11-21T23:15:00.123.fits"}]},
    )


class ReportStagingProgress(StagingProgressRequest):
    id: UUID


class CancelStaging(CommandModel):
    id: UUID
    reason: Annotated[str, Field(max_length=2000)] | None = None


# -- observation results ---------------------------------------------------------------------
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
        default_factory=list, max_length=100,
        description="all_eligible: one copy per instrument; otherwise the first, if any, is "
        "the result's instrument.")
    not_before: UtcDatetime | None = None
    spec_snapshot: dict[str, Any] | None = Field(
        None, description="The request spec as it was when materialized (stored as is).")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "observation_id": 7, "request_id": 42, "epochs": 3, "samples": 2,
            "copies_mode": "all_eligible", "eligible_instruments": ["HARPS", "ESPRESSO"],
            "not_before": "2026-11-22T00:00:00Z", "spec_snapshot": {"exptime": 600}}]},
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

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "instrument_id": "HARPS", "executed_obs_unit_id": "e433bda1-579b-4946-9f02-7a3e4a04efe2"}]})


class DispatchObservationResult(DispatchObservationResultRequest):
    id: UUID
    task_id: UUID


class TaskOutcomeRequest(CommandModel):
    outcome: Literal["succeeded", "partial", "failed", "canceled"]
    finished_at: UtcDatetime = Field(default_factory=_now)
    executed_obs_unit_id: UUID | None = None

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "outcome": "succeeded", "finished_at": "2026-11-22T03:10:00Z"}]})


class ReportTaskOutcome(TaskOutcomeRequest):
    id: UUID
    task_id: UUID


class CancelObservationResultRequest(CommandModel):
    reason: Annotated[str, Field(min_length=1, max_length=2000)]

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"reason": "request withdrawn by the PI"}]})


class CancelObservationResult(CancelObservationResultRequest):
    id: UUID


class ContributeAssetRequest(CommandModel):
    asset_id: Annotated[str, Field(min_length=1, max_length=255, description=(
        "What contributes (e.g. raw_data_file:<id>); counted once per result."))]

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "asset_id": "raw_data_file:1c49d49d-34d9-5c36-be8c-62dcce3da68c"}]})


class ContributeAsset(ContributeAssetRequest):
    id: UUID


class StartProcessingRunRequest(CommandModel):
    run_id: UUID | None = Field(None, description="Pre-generated processing run id.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"run_id": "0e5c1b1e-6f57-4d0c-9a53-3c3f4b7e2d11"}]})


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

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
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


def observed_at_of(payload: CommandModel) -> datetime | None:
    """When the command's change happened at the telescope, where the command says so."""
    fields = type(payload).model_fields
    for name in ("start_time", "end_time", "created_at"):
        value = payload.__dict__.get(name) if name in fields else None
        if isinstance(value, datetime):
            return utc(value)
    return None
