"""The rows the smart queries answer, one definition per shape: what a view function makes of
a read-model row (``queries.service``), before the pending-command overlay
(``queries.overlay``) changes it. The API's pydantic views (``queries.models``; those of jobs,
downloads and products in ``api.ops`` and ``api.mast``) validate the same keys
(``tests/unit/test_query_rows.py`` holds the two together).

No ``from __future__ import annotations`` here: Python 3.11 then takes ``NotRequired`` keys
for required ones at run time."""

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NotRequired, TypedDict, cast
from uuid import UUID

#: An entity's id: a UUID from the read models, its text from a pending command's payload.
#: (The rows of jobs, products and results hold their ids as text, ``str``, as their read
#: models' columns and their pending commands' payloads do.)
EntityId = UUID | str


class PendingRow(TypedDict):
    """What every row says of the commands not yet in the read models."""

    pending: bool
    last_position: int | None
    #: set by the overlay (``mark_pending``) when a pending command changes the row
    command_status: NotRequired[str | None]
    pending_command_ids: NotRequired[list[str]]
    #: set when the read models do not answer (the journal's row alone)
    read_models: NotRequired[str]


class ExecutedObsUnitRow(PendingRow):
    id: EntityId
    obs_unit_id: str
    instrument: str
    status: str
    start_time: datetime
    end_time: datetime | None
    metadata: dict[str, Any]
    started_by: str | None
    finished_by: str | None


class Checksum(TypedDict):
    algorithm: str
    value: str


class RawDataFileRow(PendingRow):
    id: EntityId
    name: str
    instrument: str
    relative_path: str
    size: int
    checksum: Checksum
    executed_obs_unit_id: EntityId | None
    package_id: EntityId | None
    file_type: str
    created_at: datetime
    registered_at: datetime | None


class RawDataPackageRow(PendingRow):
    id: EntityId
    name: str
    executed_obs_unit_id: EntityId | None
    status: str
    total_size: int | None
    file_count: int
    finalized_at: datetime | None
    registered_at: datetime | None
    #: one package's answer holds its files (not the list's rows)
    files: NotRequired[list[RawDataFileRow]]


class StagingRequestRow(PendingRow):
    id: EntityId
    package_ids: list[EntityId]
    destination: str
    status: str
    bytes_total: int | None
    files_total: int | None
    bytes_transferred: int
    files_transferred: int
    message: str | None
    registered_at: datetime | None
    updated_at: datetime | None
    #: once its size is known (``with_progress``)
    progress_percent: NotRequired[float]


# -- MAST download jobs (``queries.downloads``) -------------------------------------------------
class DownloadFileRow(TypedDict):
    id: str
    index: int
    filename: str
    url: str
    data_uri: str | None
    obs_id: str | None
    obsid: str | None
    product_type: str | None
    instrument: str | None
    status: str
    size: int | None
    bytes_done: int
    percent: float | None
    bytes_per_s: float | None
    eta_s: float | None
    #: set when the figures are the downloader's in-memory ones (``with_live``)
    live: NotRequired[bool]
    etag: str | None
    last_modified: str | None
    sha256: str | None
    fits: dict[str, Any] | None
    restarts: int
    started_at: datetime | None
    checkpoint_at: datetime | None
    completed_at: datetime | None


class DownloadJobRow(PendingRow):
    id: str
    status: str
    destination: str
    mode: str
    chunk_size: int
    register_files: bool
    file_count: int
    files_completed: int
    bytes_total: int | None
    bytes_done: int
    percent: float | None
    bytes_per_s: float | None
    eta_s: float | None
    #: set when the figures are the downloader's in-memory ones (``with_live``)
    live: NotRequired[bool]
    reason: str | None
    partials_purged: bool
    requested_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime | None
    #: set by the job's smart query and lists (``queries.jobs``)
    files: NotRequired[list[DownloadFileRow]]
    read_model_position: NotRequired[int | None]


# -- processing jobs and data products (``queries.processing``) --------------------------------
class JobInputRow(TypedDict):
    file_id: str
    name: str
    instrument: str
    relative_path: str
    size: int
    checksum: Checksum
    file_type: str
    executed_obs_unit_id: str | None


class StepRow(TypedDict):
    name: str
    attempt: int
    status: str
    started_at: datetime | None
    completed_at: datetime | None
    duration_s: float | None


class LeaseRow(TypedDict):
    worker: str
    attempt: int
    expires_at: datetime | None


class ProcessingJobRow(PendingRow):
    id: str
    kind: str
    status: str
    algorithm: str | None
    algorithm_version: str | None
    parameters: dict[str, Any]
    inputs: list[JobInputRow]
    product_ids: list[str]
    input_count: int
    input_bytes: int
    result_id: str | None
    run_id: str | None
    catalog: bool
    publish: bool
    archive: bool
    attempts: int
    max_attempts: int
    lease: LeaseRow | None
    cancel_requested: bool
    progress: float
    current_step: str | None
    steps: list[StepRow]
    outputs: list[dict[str, Any]]
    software: dict[str, str]
    reason: str | None
    requested_by: str
    completed_by: str | None
    requested_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    duration_s: float | None
    updated_at: datetime | None
    #: set by the job's smart query (``queries.jobs``)
    read_model_position: NotRequired[int | None]


class ProductInputRow(JobInputRow):
    role: str | None
    classified_from: str | None


class DataProductRow(TypedDict):
    id: str
    job_id: str
    kind: str
    name: str
    status: str
    published: bool
    archived: bool
    media_type: str
    size: int
    checksum: Checksum
    area: str
    key: str
    uri: str | None
    metrics: dict[str, Any]
    algorithm: str
    algorithm_version: str
    parameters: dict[str, Any]
    software: dict[str, str]
    result_id: str | None
    run_id: str | None
    built_at: datetime | None
    catalogued_at: datetime | None
    metadata: dict[str, Any]
    last_position: int | None
    #: one product's answer holds its inputs (not the list's rows)
    inputs: NotRequired[list[ProductInputRow]]


class PresignedDownloadRow(TypedDict):
    """Where to download a product (``queries.data_products``)."""

    url: str | None
    expires_in_s: int
    media_type: str
    size: int
    checksum: Checksum


# -- observation results (``queries.service``) -------------------------------------------------
class ResultTaskRow(TypedDict):
    id: str
    attempt: int | None
    status: str
    instrument_id: str | None
    executed_obs_unit_id: str | None
    dispatched_at: datetime | None
    finished_at: datetime | None
    pending: bool


class ProcessingRunRow(TypedDict):
    id: str
    revision: int | None
    status: str
    started_at: datetime | None
    finished_at: datetime | None
    outputs: list[dict[str, Any]]
    error: str | None
    pending: bool


class ObservationResultRow(PendingRow):
    id: str
    short_id: int | None
    observation_id: int
    request_id: int
    epoch_index: int
    sample_index: int
    copy_index: int
    instrument_id: str | None
    copies_mode: str
    not_before: datetime | None
    spec_snapshot: dict[str, Any] | None
    fulfillment_status: str
    fulfilled_on: datetime | None
    task_count: int
    data_product_status: str
    assets_revision: int
    dirty: bool
    dirty_from_revision: int | None
    next_eligible_run_at: datetime | None
    last_built_revision: int | None
    current_processing_run_id: str | None
    failed_runs: int
    #: one result's answer holds its tasks and runs (``ObservationResultDetail``)
    tasks: NotRequired[list[ResultTaskRow]]
    runs: NotRequired[list[ProcessingRunRow]]
    #: in the scheduler's list (``DueResultView``): whether it builds now
    due: NotRequired[bool]


class ResultCountsRow(TypedDict):
    read_model_position: int
    total: int
    dirty: int
    fulfillment_status: dict[str, int]
    data_product_status: dict[str, int]
    pending_commands: int


def changeable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A typed row as the plain dict the overlay and the job reads change by key name. The
    same dict, not a copy: every view function makes a new one per row."""
    return cast("dict[str, Any]", row)
