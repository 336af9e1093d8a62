"""Staging requests through their handlers, the unit of work and the in-memory store."""

from __future__ import annotations

from uuid import UUID, uuid4

import pytest

from commands.raw_data import RawDataCommand
from commands.staging import StagingCommand
from domain.errors import IllegalTransition, InvalidCommand, TargetNotFound
from domain.staging import StagingRequest
from tests.unit.runner import CommandRunner, file_fields

STAGE = StagingCommand.STAGING_STAGE
PROGRESS = StagingCommand.STAGING_REPORT_PROGRESS
CANCEL = StagingCommand.STAGING_CANCEL


def package(run: CommandRunner, *sizes: int, finalize: bool = True) -> UUID:
    package_id = uuid4()
    run(RawDataCommand.RAW_DATA_PACKAGE_CREATE, id=package_id, name=f"P-{package_id}",
        files=[file_fields(f"{package_id}-{i}.fits", s) for i, s in enumerate(sizes)])
    if finalize:
        run(RawDataCommand.RAW_DATA_PACKAGE_FINALIZE, id=package_id)
    return package_id


def staged(run: CommandRunner) -> StagingRequest:
    staging_id = uuid4()
    run(STAGE, id=staging_id, package_ids=[package(run, 100, 200), package(run, 300)],
        destination="archive-transfer:/stage/night-1121")
    return run.load(StagingRequest, staging_id)


def test_stage_complete_packages_totals_them(run: CommandRunner) -> None:
    packages = [package(run, 100, 200), package(run, 300)]
    staging_id = uuid4()
    applied = run(STAGE, id=staging_id, package_ids=packages,
                  destination="archive-transfer:/stage/night-1121")
    assert applied.ids == [staging_id]
    assert applied.names == ["StagingRequest.Requested"]
    request = run.load(StagingRequest, staging_id)
    assert request.package_ids == packages
    assert (request.status, request.bytes_total, request.files_total) == ("pending", 600, 3)
    assert (request.bytes_transferred, request.files_transferred) == (0, 0)


def test_only_complete_packages_are_staged(run: CommandRunner) -> None:
    building = package(run, 100, finalize=False)
    refusal = run.refused(STAGE, id=uuid4(), package_ids=[package(run, 5), building],
                          destination="d")
    assert isinstance(refusal, IllegalTransition) and refusal.field == "package_ids"
    refusal = run.refused(STAGE, id=uuid4(), package_ids=[uuid4()], destination="d")
    assert isinstance(refusal, TargetNotFound) and refusal.field == "package_ids.0"


def test_progress_then_completion(run: CommandRunner) -> None:
    request = staged(run)
    applied = run(PROGRESS, id=request.id, status="in_progress", bytes_transferred=300,
                  files_transferred=2, message="2 of 3 files")
    assert applied.names == ["StagingRequest.ProgressReported"]
    assert run.load(StagingRequest, request.id).status == "in_progress"
    run(PROGRESS, id=request.id, status="completed", bytes_transferred=600,
        files_transferred=3)
    request = run.load(StagingRequest, request.id)
    assert (request.status, request.bytes_transferred, request.files_transferred) == (
        "completed", 600, 3)
    assert run.history(request.id) == ["Requested", "ProgressReported", "ProgressReported"]


@pytest.mark.parametrize(("transferred", "files"), [(50, 0), (700, 3), (600, 4)])
def test_progress_never_goes_back_nor_beyond_the_request(
        run: CommandRunner, transferred: int, files: int) -> None:
    request = staged(run)
    run(PROGRESS, id=request.id, bytes_transferred=100, files_transferred=1)
    refusal = run.refused(PROGRESS, id=request.id, bytes_transferred=transferred,
                          files_transferred=files)
    assert isinstance(refusal, InvalidCommand) and refusal.field == "bytes_transferred"
    assert run.load(StagingRequest, request.id).bytes_transferred == 100


def test_cancel_records_where_it_was_cancelled_from(run: CommandRunner) -> None:
    request = staged(run)
    run(PROGRESS, id=request.id, bytes_transferred=100, files_transferred=1)
    applied = run(CANCEL, id=request.id, reason="destination full")
    assert applied.names == ["StagingRequest.Cancelled"]
    request = run.load(StagingRequest, request.id)
    assert (request.status, request.message, request.cancelled_from) == (
        "cancelled", "destination full", "in_progress")


@pytest.mark.parametrize("end", ["completed", "failed"])
def test_an_ended_request_moves_no_more(run: CommandRunner, end: str) -> None:
    request = staged(run)
    run(PROGRESS, id=request.id, status=end, bytes_transferred=600, files_transferred=3)
    assert isinstance(run.refused(CANCEL, id=request.id), IllegalTransition)
    assert isinstance(run.refused(PROGRESS, id=request.id, status="in_progress",
                                  bytes_transferred=600, files_transferred=3),
                      IllegalTransition)
    assert run.load(StagingRequest, request.id).status == end


def test_a_failed_request_is_retried_from_zero(run: CommandRunner) -> None:
    request = staged(run)
    run(PROGRESS, id=request.id, status="in_progress", bytes_transferred=300,
        files_transferred=2)
    run(PROGRESS, id=request.id, status="failed", bytes_transferred=300,
        files_transferred=2, message="destination disk full")
    applied = run(StagingCommand.STAGING_RETRY, id=request.id, reason="disk replaced")
    assert applied.names == ["StagingRequest.Retried"]
    retried = run.load(StagingRequest, request.id)
    assert (retried.status, retried.bytes_transferred, retried.files_transferred) == (
        "pending", 0, 0)
    assert (retried.message, retried.retries) == ("disk replaced", 1)
    # the agent starts over, and may fail and be retried again
    run(PROGRESS, id=request.id, status="failed", bytes_transferred=100,
        files_transferred=1)
    run(StagingCommand.STAGING_RETRY, id=request.id)
    assert run.load(StagingRequest, request.id).retries == 2


@pytest.mark.parametrize("status", ["pending", "in_progress", "completed", "cancelled"])
def test_only_a_failed_request_is_retried(run: CommandRunner, status: str) -> None:
    request = staged(run)
    if status == "cancelled":
        run(CANCEL, id=request.id)
    elif status != "pending":
        run(PROGRESS, id=request.id, status=status, bytes_transferred=600 * (
            status == "completed"), files_transferred=3 * (status == "completed"))
    refusal = run.refused(StagingCommand.STAGING_RETRY, id=request.id)
    assert isinstance(refusal, IllegalTransition) and refusal.field == "status"
    assert run.load(StagingRequest, request.id).status == status
