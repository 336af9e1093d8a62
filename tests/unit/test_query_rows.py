"""The query rows (``queries.rows``) and the API's views (``queries.models``, ``api.ops``,
``api.mast``) describe the same shapes: a key one has and the other lacks is a field the API
drops or never fills."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from uuid import uuid4

import pytest
from pydantic import BaseModel

from api.mast import DownloadFileView, DownloadJobView
from api.ops import (
    DownloadView,
    JobInputView,
    JobView,
    LeaseView,
    ProductInputView,
    ProductView,
    StepView,
)
from queries import downloads, processing
from queries.data_products import ProductDownload
from queries.models import (
    ChecksumView,
    DueResultView,
    ExecutedObsUnitView,
    ObservationResultDetail,
    ObservationResultView,
    ProcessingRunView,
    RawDataFileView,
    RawDataPackageView,
    ResultCounts,
    ResultTaskView,
    StagingRequestView,
)
from queries.rows import (
    Checksum,
    DataProductRow,
    DownloadFileRow,
    DownloadJobRow,
    ExecutedObsUnitRow,
    JobInputRow,
    LeaseRow,
    ObservationResultRow,
    PresignedDownloadRow,
    ProcessingJobRow,
    ProcessingRunRow,
    ProductInputRow,
    RawDataFileRow,
    RawDataPackageRow,
    ResultCountsRow,
    ResultTaskRow,
    StagingRequestRow,
    StepRow,
)
from queries.service import (
    file_view,
    package_view,
    result_view,
    run_view,
    staging_view,
    task_view,
    unit_view,
)

SHAPES: list[tuple[Any, type[BaseModel]]] = [
    (ExecutedObsUnitRow, ExecutedObsUnitView), (RawDataFileRow, RawDataFileView),
    (RawDataPackageRow, RawDataPackageView), (StagingRequestRow, StagingRequestView),
    (Checksum, ChecksumView), (DownloadFileRow, DownloadFileView),
    (DownloadJobRow, DownloadJobView), (JobInputRow, JobInputView), (StepRow, StepView),
    (LeaseRow, LeaseView), (ProcessingJobRow, JobView), (ProductInputRow, ProductInputView),
    (DataProductRow, ProductView), (PresignedDownloadRow, DownloadView),
    (ResultTaskRow, ResultTaskView), (ProcessingRunRow, ProcessingRunView),
    (ResultCountsRow, ResultCounts)]


def keys(row: Any) -> set[str]:
    return set(row.__required_keys__) | set(row.__optional_keys__)


@pytest.mark.parametrize(("row", "view"), SHAPES, ids=lambda x: x.__name__)
def test_row_has_the_fields_of_its_api_view(row: Any, view: type[BaseModel]) -> None:
    assert keys(row) == set(view.model_fields)


def test_result_row_has_the_fields_of_one_result_and_of_a_due_one() -> None:
    """One row shape for a result in a list, with its tasks and runs, and in the due list."""
    assert keys(ObservationResultRow) == set(ObservationResultDetail.model_fields) | set(
        DueResultView.model_fields)


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


#: Rows of the jobs', products' and results' read models (the columns their views read).
CHECKSUM = {"checksum_algorithm": "md5", "checksum_value": "0f34"}
INPUT = {"file_id": str(uuid4()), "name": "f.fits", "instrument": "HARPS",
         "relative_path": "2026-11-21/f.fits", "size": 10, **CHECKSUM,
         "file_type": "raw_science", "executed_obs_unit_id": None}
DOWNLOAD_FILE = {
    "id": str(uuid4()), "file_index": 0, "filename": "u9o40504m_c3m.fits",
    "url": "https://mast.example/u9o40504m_c3m.fits", "data_uri": None, "obs_id": None,
    "obsid": None, "product_type": None, "instrument": None, "status": "downloading",
    "size": 200, "bytes_done": 100, "bytes_per_s": 50.0, "etag": None, "last_modified": None,
    "sha256": None, "fits": None, "restarts": 0, "started_at": NOW, "checkpoint_at": NOW,
    "completed_at": None}
DOWNLOAD_JOB = {
    "id": str(uuid4()), "status": "running", "destination": "hst", "mode": "chunked",
    "chunk_size": 1024, "register_files": True, "file_count": 1, "files_completed": 0,
    "bytes_total": 200, "bytes_done": 100, "reason": None, "partials_purged": False,
    "requested_at": NOW, "finished_at": None, "updated_at": NOW, "last_position": 7}
STEP = {"name": "combine", "attempt": 1, "status": "completed", "started_at": NOW,
        "completed_at": NOW, "duration_s": 0.8}
PROCESSING_JOB = {
    "id": str(uuid4()), "kind": "process", "status": "running", "algorithm": "ccd_stack",
    "algorithm_version": "1.1.0", "parameters": {}, "inputs": [INPUT], "product_ids": [],
    "input_count": 1, "input_bytes": 10, "result_id": None, "run_id": None, "catalog": True,
    "publish": False, "archive": False, "attempts": 1, "max_attempts": 3,
    "lease_worker": "host-1", "lease_expires_at": NOW, "cancel_requested": False,
    "progress": 0.5, "current_step": "combine", "outputs": [], "software": {},
    "reason": None, "requested_by": "alice", "completed_by": None, "requested_at": NOW,
    "started_at": NOW, "finished_at": None, "updated_at": NOW, "last_position": 7}
PRODUCT = {
    "id": str(uuid4()), "job_id": str(uuid4()), "kind": "combined_image",
    "name": "combined_image.fits", "status": "built", "published": False, "archived": False,
    "media_type": "application/fits", "size": 10, "sha256": "ab" * 32, "area": "products",
    "key": "j/combined_image.fits", "uri": None, "metrics": {}, "algorithm": "ccd_stack",
    "algorithm_version": "1.1.0", "parameters": {}, "software": {}, "result_id": None,
    "run_id": None, "built_at": NOW, "catalogued_at": None, "metadata": {},
    "last_position": 7}
RESULT = {
    "id": str(uuid4()), "observation_id": 7, "request_id": 42, "epoch_index": 0,
    "sample_index": 1, "copy_index": 0, "instrument_id": "HARPS", "copies_mode": "single",
    "not_before": None, "spec_snapshot": None, "fulfillment_status": "fulfilled",
    "fulfilled_on": NOW, "task_count": 1, "data_product_status": "READY",
    "assets_revision": 12, "dirty_from_revision": 12, "next_eligible_run_at": NOW,
    "last_built_revision": 11, "current_processing_run_id": None, "failed_runs": 0,
    "last_position": 5123, "created_position": 1834}
TASK = {"id": str(uuid4()), "attempt": 1, "status": "open", "instrument_id": "HARPS",
        "executed_obs_unit_id": None, "dispatched_at": NOW, "finished_at": None}
RUN = {"id": str(uuid4()), "revision": 12, "status": "running", "started_at": NOW,
       "finished_at": None, "outputs": [], "error": None}


def within_the_row(made: Any, row: Any) -> bool:
    """What a view function makes has the row's required keys, and none it lacks."""
    return set(row.__required_keys__) <= set(made) <= keys(row)


@pytest.mark.parametrize(("view", "projected", "row", "model"), [
    (downloads.file_view, DOWNLOAD_FILE, DownloadFileRow, DownloadFileView),
    (processing.step_view, STEP, StepRow, StepView),
    (processing.job_view, PROCESSING_JOB, ProcessingJobRow, JobView),
    (processing.product_view, PRODUCT, DataProductRow, ProductView),
    (result_view, RESULT, ObservationResultRow, ObservationResultView),
    (task_view, TASK, ResultTaskRow, ResultTaskView),
    (run_view, RUN, ProcessingRunRow, ProcessingRunView)],
    ids=["download_file", "step", "processing_job", "product", "result", "task", "run"])
def test_view_of_a_read_model_row_is_its_typed_row_and_valid_for_the_api(
        view: Any, projected: dict[str, Any], row: Any, model: type[BaseModel]) -> None:
    made = view(projected)
    assert within_the_row(made, row)
    assert model.model_validate(made).model_fields_set == set(made)


def test_processing_job_view_holds_typed_inputs_and_lease() -> None:
    job = processing.job_view(PROCESSING_JOB)
    assert within_the_row(job["inputs"][0], JobInputRow)
    assert job["lease"] is not None and within_the_row(job["lease"], LeaseRow)
    assert job["lease"]["worker"] == "host-1"


def test_download_job_view_with_its_files_is_valid_for_the_api() -> None:
    job = downloads.job_view(DOWNLOAD_JOB)
    job["files"] = [downloads.file_view(DOWNLOAD_FILE)]
    assert within_the_row(job, DownloadJobRow)
    shown = DownloadJobView.model_validate(job)
    assert shown.files[0].percent == 50.0 and shown.pending is False


def test_due_result_is_valid_for_the_api() -> None:
    due = result_view(RESULT)
    due["due"] = True
    assert within_the_row(due, ObservationResultRow)
    shown = DueResultView.model_validate(due)
    assert shown.short_id == 1834 and shown.dirty is True


def test_presigned_download_is_valid_for_the_api() -> None:
    product = processing.product_view(PRODUCT)
    answer = ProductDownload(product, url="https://minio.example/p").presigned()
    assert within_the_row(answer, PresignedDownloadRow)
    assert DownloadView.model_validate(answer).checksum.value == "ab" * 32
