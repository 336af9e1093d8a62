"""MAST download jobs through their handlers, the unit of work and the in-memory store: the
downloader's reports (start, checkpoint, complete, fail) and people's pause, resume, cancel."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

import pytest

from commands.downloads import DownloadCommand
from domain.downloads import DownloadJob
from domain.errors import IllegalTransition, InvalidCommand, TargetNotFound
from tests.unit.runner import CommandRunner

C = DownloadCommand
SHA = "a" * 64


def files(*sizes: int | None) -> list[dict[str, Any]]:
    return [{"url": f"https://mast.stsci.edu/api/v0.1/Download/file?uri=mast:HST/{i}.fits",
             "filename": f"u9o4050{i}m_c3m.fits", "size": s} for i, s in enumerate(sizes)]


def requested(run: CommandRunner, *sizes: int | None) -> UUID:
    job_id = uuid4()
    run(C.DOWNLOAD_JOB_REQUEST, id=job_id, files=files(*sizes), destination="hst/u9o40504m")
    return job_id


def test_request_records_the_files_and_their_destination(run: CommandRunner) -> None:
    job_id = uuid4()
    applied = run(C.DOWNLOAD_JOB_REQUEST, id=job_id, files=files(1000, None),
                  destination="hst/u9o40504m", chunk_size=64 * 1024)
    assert applied.ids == [job_id] and applied.names == ["DownloadJob.Requested"]
    job = run.load(DownloadJob, job_id)
    assert (job.status, job.destination, job.chunk_size) == ("requested", "hst/u9o40504m",
                                                             64 * 1024)
    assert [f["status"] for f in job.files] == ["pending", "pending"]
    assert job.bytes_total is None  # one size unknown


def test_every_file_completed_completes_the_job(run: CommandRunner) -> None:
    job_id = requested(run, 1000, 500)
    assert run(C.DOWNLOAD_JOB_START_FILE, id=job_id, index=0, etag='"e1"').names == [
        "DownloadJob.FileStarted"]
    assert run.load(DownloadJob, job_id).status == "running"
    run(C.DOWNLOAD_JOB_CHECKPOINT, id=job_id, index=0, bytes_done=400, bytes_per_s=1e6)
    assert run.load(DownloadJob, job_id).bytes_done == 400
    run(C.DOWNLOAD_JOB_COMPLETE_FILE, id=job_id, index=0, size=1000, sha256=SHA)
    run(C.DOWNLOAD_JOB_START_FILE, id=job_id, index=1)
    applied = run(C.DOWNLOAD_JOB_COMPLETE_FILE, id=job_id, index=1, size=500, sha256=SHA)
    assert applied.names == ["DownloadJob.FileCompleted", "DownloadJob.Completed"]
    job = run.load(DownloadJob, job_id)
    assert (job.status, job.files_completed, job.bytes_done) == ("completed", 2, 1500)
    assert isinstance(run.refused(C.DOWNLOAD_JOB_CANCEL, id=job_id), IllegalTransition)


def test_reports_outside_the_file_are_refused(run: CommandRunner) -> None:
    job_id = requested(run, 1000)
    refusal = run.refused(C.DOWNLOAD_JOB_CHECKPOINT, id=job_id, index=0, bytes_done=10)
    assert isinstance(refusal, IllegalTransition)  # not started
    run(C.DOWNLOAD_JOB_START_FILE, id=job_id, index=0)
    refusal = run.refused(C.DOWNLOAD_JOB_CHECKPOINT, id=job_id, index=0, bytes_done=1001)
    assert isinstance(refusal, InvalidCommand) and refusal.field == "bytes_done"
    refusal = run.refused(C.DOWNLOAD_JOB_COMPLETE_FILE, id=job_id, index=0, size=999,
                          sha256=SHA)
    assert isinstance(refusal, InvalidCommand) and refusal.field == "size"
    refusal = run.refused(C.DOWNLOAD_JOB_START_FILE, id=job_id, index=3)
    assert isinstance(refusal, InvalidCommand) and refusal.field == "index"


def test_pause_and_resume(run: CommandRunner) -> None:
    job_id = requested(run, 1000)
    run(C.DOWNLOAD_JOB_START_FILE, id=job_id, index=0)
    assert run(C.DOWNLOAD_JOB_PAUSE, id=job_id).names == ["DownloadJob.Paused"]
    assert isinstance(run.refused(C.DOWNLOAD_JOB_PAUSE, id=job_id), IllegalTransition)
    run(C.DOWNLOAD_JOB_CHECKPOINT, id=job_id, index=0, bytes_done=100)  # on disk when paused
    assert run(C.DOWNLOAD_JOB_RESUME, id=job_id).names == ["DownloadJob.Resumed"]
    job = run.load(DownloadJob, job_id)
    assert (job.status, job.bytes_done) == ("running", 100)


def test_a_failed_job_resumes_its_failed_file(run: CommandRunner) -> None:
    job_id = requested(run, 1000)
    run(C.DOWNLOAD_JOB_START_FILE, id=job_id, index=0)
    run(C.DOWNLOAD_JOB_CHECKPOINT, id=job_id, index=0, bytes_done=100)
    run(C.DOWNLOAD_JOB_FAIL, id=job_id, index=0, reason="checksum mismatch")
    job = run.load(DownloadJob, job_id)
    assert (job.status, job.reason, job.files[0]["status"]) == (
        "failed", "checksum mismatch", "failed")
    run(C.DOWNLOAD_JOB_RESUME, id=job_id)
    job = run.load(DownloadJob, job_id)
    assert (job.status, job.reason, job.files[0]["status"]) == ("running", None,
                                                                "downloading")


@pytest.mark.parametrize("started", [False, True])
def test_cancel_then_purge_partials_once(run: CommandRunner, started: bool) -> None:
    job_id = requested(run, 1000)
    if started:
        run(C.DOWNLOAD_JOB_START_FILE, id=job_id, index=0)
        run(C.DOWNLOAD_JOB_CHECKPOINT, id=job_id, index=0, bytes_done=300)
    assert isinstance(run.refused(C.DOWNLOAD_JOB_PURGE_PARTIALS, id=job_id),
                      IllegalTransition)  # still going
    run(C.DOWNLOAD_JOB_CANCEL, id=job_id, reason="wrong target")
    assert isinstance(run.refused(C.DOWNLOAD_JOB_RESUME, id=job_id), IllegalTransition)
    applied = run(C.DOWNLOAD_JOB_PURGE_PARTIALS, id=job_id,
                  removed=["hst/u9o40504m/u9o40500m_c3m.fits.part"])
    assert applied.names == ["DownloadJob.PartialsPurged"]
    job = run.load(DownloadJob, job_id)
    assert (job.status, job.reason, job.partials_purged, job.bytes_done) == (
        "cancelled", "wrong target", True, 0)
    assert isinstance(run.refused(C.DOWNLOAD_JOB_PURGE_PARTIALS, id=job_id),
                      IllegalTransition)


def test_commands_for_an_unknown_job(run: CommandRunner) -> None:
    refusal = run.refused(C.DOWNLOAD_JOB_PAUSE, id=uuid4())
    assert isinstance(refusal, TargetNotFound) and refusal.field == "id"
