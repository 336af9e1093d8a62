"""The DownloadJob aggregate's rules (pure domain, no I/O)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import pytest

from domain.downloads import DownloadJob, JobStatus, download_file_id
from domain.errors import IllegalTransition, InvalidCommand
from domain.provenance import Provenance

NOW = datetime(2026, 11, 30, 4, 0, tzinfo=UTC)
P = Provenance("tester", "cmd", "corr")


def job(sizes: tuple[int | None, ...] = (100, 200)) -> DownloadJob:
    files: list[dict[str, Any]] = [{"filename": f"f{i}.fits", "url": f"http://x/{i}",
                                    "size": s} for i, s in enumerate(sizes)]
    return DownloadJob.request(uuid.uuid4(), files, "d", "chunked", 65536, True, NOW, P)


def test_request_needs_files_with_distinct_names() -> None:
    with pytest.raises(InvalidCommand):
        DownloadJob.request(uuid.uuid4(), [], "d", "chunked", 65536, True, NOW, P)
    with pytest.raises(InvalidCommand):
        DownloadJob.request(uuid.uuid4(), [{"filename": "a", "url": "u"}] * 2, "d", "chunked",
                            65536, True, NOW, P)


def test_a_job_runs_checkpoints_and_completes_with_its_last_file() -> None:
    j = job()
    assert j.status == JobStatus.REQUESTED and j.bytes_total == 300
    j.start_file(0, 100, '"e"', None, None, NOW, P)
    assert j.status == JobStatus.RUNNING
    j.checkpoint(0, 50, 1000.0, NOW, P)
    with pytest.raises(InvalidCommand):
        j.checkpoint(0, 101, None, NOW, P)  # beyond the file
    with pytest.raises(IllegalTransition):
        j.checkpoint(1, 10, None, NOW, P)  # not started
    assert j.bytes_done == 50
    j.complete_file(0, 100, "a" * 64, {"hdus": 1}, NOW, P)
    assert j.status == JobStatus.RUNNING and j.files_completed == 1
    j.start_file(1, 200, None, None, None, NOW, P)
    with pytest.raises(InvalidCommand):
        j.complete_file(1, 199, "b" * 64, None, NOW, P)  # not the size it started with
    j.complete_file(1, 200, "b" * 64, None, NOW, P)
    assert j.status == JobStatus.COMPLETED and j.bytes_done == 300
    events = [type(e).__qualname__ for e in j.collect_events()]
    assert events[-2:] == ["DownloadJob.FileCompleted", "DownloadJob.Completed"]
    for action in (lambda: j.pause(NOW, P), lambda: j.cancel(None, NOW, P),
                   lambda: j.resume(NOW, P)):
        with pytest.raises(IllegalTransition):
            action()


def test_failed_jobs_resume_and_retry_the_failed_file_from_its_checkpoint() -> None:
    j = job()
    j.start_file(0, 100, '"e"', None, None, NOW, P)
    j.checkpoint(0, 40, None, NOW, P)
    j.fail("HTTP 503 (after 3 retries)", 0, NOW, P)
    assert j.status == JobStatus.FAILED and j.files[0]["status"] == "failed"
    assert j.reason and "503" in j.reason
    j.resume(NOW, P)
    assert j.status == JobStatus.RUNNING and j.reason is None
    assert j.files[0]["status"] == "downloading" and j.files[0]["bytes_done"] == 40


def test_pause_records_checkpoints_but_cancel_refuses_them() -> None:
    j = job()
    j.start_file(0, 100, None, None, None, NOW, P)
    j.pause(NOW, P)
    with pytest.raises(IllegalTransition):
        j.pause(NOW, P)
    j.checkpoint(0, 30, None, NOW, P)  # what was on disk when it stopped
    j.complete_file(0, 100, "c" * 64, None, NOW, P)
    j.cancel("not needed", NOW, P)
    with pytest.raises(IllegalTransition):
        j.checkpoint(0, 30, None, NOW, P)


def test_resuming_a_job_paused_after_its_last_file_completes_it() -> None:
    j = job((10,))
    j.start_file(0, 10, None, None, None, NOW, P)
    j.pause(NOW, P)
    j.complete_file(0, 10, "d" * 64, None, NOW, P)
    assert j.status == JobStatus.PAUSED
    j.resume(NOW, P)
    assert j.status == JobStatus.COMPLETED


def test_restart_counts_and_resets_the_file() -> None:
    j = job()
    j.start_file(0, 100, '"1"', None, None, NOW, P)
    j.checkpoint(0, 60, None, NOW, P)
    j.start_file(0, 120, '"2"', None, "ETag changed", NOW, P)
    f = j.files[0]
    assert f["restarts"] == 1 and f["bytes_done"] == 0 and f["size"] == 120
    assert j.bytes_total == 320


def test_partials_purged_once_and_only_when_ended() -> None:
    j = job()
    with pytest.raises(IllegalTransition):
        j.purge_partials([], NOW, P)
    j.start_file(0, 100, None, None, None, NOW, P)
    j.checkpoint(0, 60, None, NOW, P)
    j.cancel(None, NOW, P)
    j.purge_partials(["d/f0.fits.part"], NOW, P)
    assert j.partials_purged and j.bytes_done == 0
    with pytest.raises(IllegalTransition):
        j.purge_partials([], NOW, P)


def test_file_ids_are_stable() -> None:
    jid = uuid.uuid4()
    assert download_file_id(jid, 0) == download_file_id(jid, 0) != download_file_id(jid, 1)
