"""The query rows (``queries.rows``) and the API's views (``queries.models``) describe the
same shapes: a key one has and the other lacks is a field the API drops or never fills."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from pydantic import BaseModel

from queries.models import (
    ExecutedObsUnitView,
    RawDataFileView,
    RawDataPackageView,
    StagingRequestView,
)
from queries.rows import ExecutedObsUnitRow, RawDataFileRow, RawDataPackageRow, StagingRequestRow
from queries.service import file_view, package_view, staging_view, unit_view

SHAPES: list[tuple[Any, type[BaseModel]]] = [
    (ExecutedObsUnitRow, ExecutedObsUnitView), (RawDataFileRow, RawDataFileView),
    (RawDataPackageRow, RawDataPackageView), (StagingRequestRow, StagingRequestView)]


@pytest.mark.parametrize(("row", "view"), SHAPES, ids=lambda x: x.__name__)
def test_row_has_the_fields_of_its_api_view(row: Any, view: type[BaseModel]) -> None:
    assert set(row.__required_keys__) | set(
        row.__optional_keys__) == set(view.model_fields)


NOW = datetime(2026, 11, 21, 23, 15, tzinfo=UTC)
PROJECTED: dict[str, Any] = {
    "id": uuid4(), "obs_unit_id": "ou-1", "instrument": "HARPS", "status": "success",
    "start_time": NOW, "end_time": NOW, "metadata": {"a": 1}, "finish_metadata": None,
    "started_by": "night", "finished_by": "night", "last_position": 7, "name": "f.fits",
    "relative_path": "2026-11-21/f.fits", "size": 10, "checksum_algorithm": "md5",
    "checksum_value": "0f34", "executed_obs_unit_id": uuid4(), "package_id": None,
    "file_type": "raw_science", "created_at": NOW, "recorded_at": NOW, "total_size": 10,
    "file_count": 1, "finalized_at": None, "package_ids": [uuid4()], "destination": "disk",
    "bytes_total": 10, "files_total": 1, "bytes_transferred": 5, "files_transferred": 0,
    "message": None, "updated_at": NOW}


@pytest.mark.parametrize(("view", "row"), [
    (unit_view, ExecutedObsUnitRow), (file_view, RawDataFileRow),
    (package_view, RawDataPackageRow), (staging_view, StagingRequestRow)],
    ids=lambda x: x.__name__)
def test_view_of_a_projected_row_has_the_required_keys(view: Any, row: Any) -> None:
    keys = set(view(PROJECTED))
    assert keys == set(row.__required_keys__)
    assert view(PROJECTED)["pending"] is False
