"""The rows the smart queries answer, one definition per shape: what a view function makes of
a read-model row (``queries.service``), before the pending-command overlay
(``queries.overlay``) changes it. The API's pydantic views (``queries.models``) validate the
same keys (``tests/unit/test_query_rows.py`` holds the two together).

No ``from __future__ import annotations`` here: Python 3.11 then takes ``NotRequired`` keys
for required ones at run time."""

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NotRequired, TypedDict
from uuid import UUID

#: An entity's id: a UUID from the read models, its text from a pending command's payload.
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


def changeable(row: Mapping[str, Any]) -> dict[str, Any]:
    """A typed row as the plain dict the overlay changes (a copy: the overlay's commands add
    and change keys by name)."""
    return dict(row)
