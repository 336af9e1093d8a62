"""What the query API returns. Every row says whether it still waits on pending commands."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

ReadModelsState = Literal["available", "unavailable"]
READ_MODELS_DESCRIPTION = (
    "`unavailable` while the read-model database does not answer: the answer then comes from "
    "this server's journal alone — entities created or changed by commands it accepted that "
    "are not yet in the read models as it last saw them, every row `pending: true` (the "
    "`X-Read-Models: unavailable` header says the same). See docs/OPERATIONS.md, \"During an "
    "outage\".")


class PendingInfo(BaseModel):
    pending: bool = Field(
        False,
        description="True when commands accepted for this entity are not yet in the read model;"
        " the row then shows the expected state after them.",
    )
    command_status: str | None = Field(
        None, description="Status of the newest pending command (accepted or applied)."
    )
    pending_command_ids: list[str] = Field(default_factory=list)
    last_position: int | None = Field(
        None, description="Log position of the last event reflected in the row."
    )
    read_models: ReadModelsState = Field("available", description=READ_MODELS_DESCRIPTION)


class ExecutedObsUnitView(PendingInfo):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "e433bda1-579b-4946-9f02-7a3e4a04efe2", "obs_unit_id": "OU-2026-0412",
        "instrument": "HARPS", "status": "success", "start_time": "2026-11-21T23:14:05Z",
        "end_time": "2026-11-22T00:02:40Z", "metadata": {"airmass": 1.12},
        "started_by": "harps-night-script", "finished_by": "harps-night-script",
        "pending": False, "command_status": None, "pending_command_ids": [],
        "last_position": 3}]})

    id: UUID
    obs_unit_id: str
    instrument: str
    status: str
    start_time: datetime
    end_time: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)
    started_by: str | None = None
    finished_by: str | None = None


class ChecksumView(BaseModel):
    algorithm: str
    value: str


class RawDataFileView(PendingInfo):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "1c49d49d-34d9-5c36-be8c-62dcce3da68c",
        "name": "HARPS.2026-11-21T23:15:00.123.fits",
        "instrument": "HARPS", "relative_path": "2026-11-21/HARPS.2026-11-21T23:15:00.123.fits",
        "size": 16793280, "checksum": {"algorithm": "md5",
                                       "value": "0f343b0931126a20f133d67c2b018a3b"},
        "executed_obs_unit_id": "e433bda1-579b-4946-9f02-7a3e4a04efe2", "package_id": None,
        "file_type": "raw_science", "created_at": "2026-11-21T23:15:00Z", "pending": True,
        "command_status": "accepted", "pending_command_ids": ["night-1121-files-7"],
        "last_position": None}]})

    id: UUID
    name: str
    instrument: str
    relative_path: str
    size: int
    checksum: ChecksumView
    executed_obs_unit_id: UUID | None = None
    package_id: UUID | None = None
    file_type: str
    created_at: datetime
    registered_at: datetime | None = Field(
        None, description="When its registration was recorded (null while pending).")


class RawDataPackageView(PendingInfo):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "3fb1d267-f9f6-4599-a97a-74fed41eaa02", "name": "HARPS-2026-11-21-OU-2026-0412",
        "executed_obs_unit_id": "e433bda1-579b-4946-9f02-7a3e4a04efe2", "status": "complete",
        "total_size": 16793280, "file_count": 1, "finalized_at": "2026-11-22T00:05:00Z",
        "files": [], "pending": False, "last_position": 9}]})

    id: UUID
    name: str
    executed_obs_unit_id: UUID | None = None
    status: str
    total_size: int | None = Field(None, description="Bytes; null while not yet known.")
    file_count: int
    finalized_at: datetime | None = None
    registered_at: datetime | None = Field(
        None, description="When it was created (recorded; null while pending).")
    files: list[RawDataFileView] = Field(
        default_factory=list, description="Its files (empty in lists: see "
        "`GET /raw_data_files?package_id=`).")


class StagingRequestView(PendingInfo):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "55488374-f976-4228-8b11-474234aebd9a",
        "package_ids": ["3fb1d267-f9f6-4599-a97a-74fed41eaa02"],
        "destination": "archive-transfer:/stage/night-1121", "status": "in_progress",
        "bytes_total": 16793280, "files_total": 1, "bytes_transferred": 8396640,
        "files_transferred": 0, "progress_percent": 50.0, "message": None, "pending": False,
        "last_position": 13}]})

    id: UUID
    package_ids: list[UUID]
    destination: str
    status: str
    bytes_total: int | None = None
    files_total: int | None = None
    bytes_transferred: int = 0
    files_transferred: int = 0
    progress_percent: float | None = None
    message: str | None = None
    registered_at: datetime | None = Field(
        None, description="When it was requested (recorded; null while pending).")
    updated_at: datetime | None = Field(None, description="Its last change (recorded).")


class Page(BaseModel):
    total: int | None = Field(description="Rows in the read model matching the filters "
                              "(null while the read models are unavailable).")
    limit: int
    offset: int = Field(description="Rows skipped (the `Link` header has the neighbouring "
                        "pages).")
    pending_count: int = Field(0, description="Pending entities merged into this page.")
    read_model_position: int | None = Field(
        description="The read models' log position the rows reflect; while they are "
        "unavailable, the last one this server saw (null if none).")
    read_models: ReadModelsState = Field("available", description=READ_MODELS_DESCRIPTION)


class ExecutedObsUnitPage(Page):
    items: list[ExecutedObsUnitView]


class RawDataFilePage(Page):
    items: list[RawDataFileView]


class RawDataPackagePage(Page):
    items: list[RawDataPackageView]


class StagingRequestPage(Page):
    items: list[StagingRequestView]


class Counts(BaseModel):
    """What dashboards count: rows of one read model (within the filters), from one
    snapshot of the read models."""

    read_model_position: int | None = Field(description="The read models' log position the "
                                            "counts reflect.")
    total: int
    pending_commands: int = Field(description="Commands for this read model accepted but "
                                  "not yet in it (not in the counts).")


class StatusCounts(Counts):
    status: dict[str, int] = Field(description="Rows by status.")


class SizedStatusCounts(StatusCounts):
    bytes: int = Field(description="Their bytes (sizes not known yet count 0).")


class ExecutedObsUnitCounts(StatusCounts):
    instrument: dict[str, int] = Field(description="Rows by instrument.")


class RawDataFileCounts(Counts):
    instrument: dict[str, int]
    file_type: dict[str, int]
    bytes: int = Field(description="Their total size.")
    packaged: int = Field(description="Those in a raw data package.")


class ProcessingJobCounts(StatusCounts):
    kind: dict[str, int] = Field(description="Rows by kind (ingest, process, catalog).")


class DataProductCounts(SizedStatusCounts):
    kind: dict[str, int] = Field(description="Rows by kind (combined_image, "
                                 "source_catalog...).")


class ExecutionsOfObsUnit(BaseModel):
    obs_unit_id: str
    read_model_position: int | None
    read_models: ReadModelsState = Field("available", description=READ_MODELS_DESCRIPTION)
    executions: list[ExecutedObsUnitView]


class CommandStatusView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "command_id": "night-1121-ou-0412-finish", "command_type": "executed_obs_unit.finish",
        "status": "rejected", "position": None,
        "reason": "executed obs unit e433bda1-579b-4946-9f02-7a3e4a04efe2 is success; it cannot "
        "become failed", "reason_code": "conflict", "reason_field": "status",
        "received_at": "2026-11-22T00:02:41Z", "finished_at": "2026-11-22T00:02:41Z",
        "actor": "harps-night-script", "correlation_id": "c0ffee00-0000-4000-8000-000000000001",
        "attempts": 1,
        "ids": {"executed_obs_unit_id": "e433bda1-579b-4946-9f02-7a3e4a04efe2"}}]})

    command_id: str
    command_type: str
    status: str = Field(description="accepted, applied or rejected")
    position: int | None = Field(None, description="Log position once applied.")
    reason: str | None = None
    reason_code: str | None = None
    reason_field: str | None = None
    received_at: datetime
    finished_at: datetime | None = None
    actor: str
    correlation_id: str
    attempts: int
    ids: dict[str, Any] = Field(default_factory=dict)


# -- observation results ---------------------------------------------------------------------
class ResultTaskView(BaseModel):
    id: UUID
    attempt: int | None = Field(None, description="1, 2, … (None while pending)")
    status: str = Field(description="open, or the outcome: succeeded, partial, failed, "
                        "canceled")
    instrument_id: str | None = None
    executed_obs_unit_id: UUID | None = None
    dispatched_at: datetime | None = None
    finished_at: datetime | None = None
    pending: bool = False


class ProcessingRunView(BaseModel):
    id: UUID
    revision: int | None = Field(None, description="The assets_revision the run builds")
    status: str = Field(description="running, completed, failed, blocked or skipped")
    started_at: datetime | None = None
    finished_at: datetime | None = None
    outputs: list[dict[str, Any]] = Field(default_factory=list,
                                          description="The data products it produced")
    error: str | None = None
    pending: bool = False


class ObservationResultView(PendingInfo):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "2b6a1f0e-53c1-5a7e-8f0c-3f1b2c7d9e10", "short_id": 1834, "observation_id": 7,
        "request_id": 42,
        "epoch_index": 0, "sample_index": 1, "copy_index": 0, "instrument_id": "HARPS",
        "copies_mode": "single", "not_before": None, "spec_snapshot": {"exptime": 600},
        "fulfillment_status": "fulfilled", "fulfilled_on": "2026-11-22T03:10:00Z",
        "task_count": 1, "data_product_status": "READY", "assets_revision": 12,
        "dirty": False, "dirty_from_revision": None, "next_eligible_run_at": None,
        "last_built_revision": 12, "current_processing_run_id": None, "failed_runs": 0,
        "pending": False, "last_position": 5123}]})

    id: UUID
    short_id: int | None = Field(
        None, description="A short integer id: the log position of the result's "
        "materialization (stable across rebuilds; None while pending)")
    observation_id: int
    request_id: int
    epoch_index: int
    sample_index: int
    copy_index: int
    instrument_id: str | None = None
    copies_mode: str
    not_before: datetime | None = None
    spec_snapshot: dict[str, Any] | None = None
    fulfillment_status: str
    fulfilled_on: datetime | None = None
    task_count: int
    data_product_status: str
    assets_revision: int
    dirty: bool
    dirty_from_revision: int | None = None
    next_eligible_run_at: datetime | None = None
    last_built_revision: int | None = None
    current_processing_run_id: UUID | None = None
    failed_runs: int = 0


class ObservationResultDetail(ObservationResultView):
    tasks: list[ResultTaskView] = Field(default_factory=list)
    runs: list[ProcessingRunView] = Field(default_factory=list)


class ObservationResultPage(Page):
    items: list[ObservationResultView]


class DueResultView(ObservationResultView):
    due: bool = Field(description="Whether the debounce has passed (the scheduler starts a "
                      "run now); otherwise next_eligible_run_at says when")


class DueResults(BaseModel):
    now: datetime
    items: list[DueResultView]


class ResultCounts(BaseModel):
    read_model_position: int
    total: int
    dirty: int
    fulfillment_status: dict[str, int]
    data_product_status: dict[str, int]
    pending_commands: int = Field(description="Results commands accepted but not yet in the "
                                  "read models (not in the counts)")
