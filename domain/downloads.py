"""Download jobs: files fetched from the MAST archive, tracked as an event-sourced aggregate.

A job holds an ordered list of files. The downloader (a worker, not a person) reports each
file's start, periodic checkpoints (bytes durably on disk), and its completion (size and
checksum); people pause, resume and cancel. The job's status moves along
``JOB_TRANSITIONS``; a file moves pending → downloading → complete (or failed, which fails the
job; resuming the job retries the file from its last checkpoint).

Time is passed in (``now``): the domain reads no clock.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import IllegalTransition, InvalidCommand
from domain.provenance import Provenance, utc, with_provenance
from domain.transitions import require_transition, transition_table


def download_file_id(job_id: UUID, index: int) -> UUID:
    """The id of file ``index`` of a job (its row in the downloads read model)."""
    return uuid5(job_id, f"file/{index}")


class JobStatus(StrEnum):
    REQUESTED = "requested"  # waiting for the downloader
    RUNNING = "running"
    PAUSED = "paused"
    FAILED = "failed"  # resumable
    COMPLETED = "completed"
    CANCELLED = "cancelled"


class FileStatus(StrEnum):
    PENDING = "pending"
    DOWNLOADING = "downloading"
    COMPLETE = "complete"
    FAILED = "failed"


#: Which status a job may move to from each status (completed and cancelled are final).
JOB_TRANSITIONS = transition_table(JobStatus, {
    JobStatus.REQUESTED: {JobStatus.RUNNING, JobStatus.PAUSED, JobStatus.FAILED,
                          JobStatus.CANCELLED},
    JobStatus.RUNNING: {JobStatus.PAUSED, JobStatus.FAILED, JobStatus.COMPLETED,
                        JobStatus.CANCELLED},
    JobStatus.PAUSED: {JobStatus.RUNNING, JobStatus.CANCELLED},
    JobStatus.FAILED: {JobStatus.RUNNING, JobStatus.CANCELLED},
})

#: Statuses in which the downloader may still record what is on disk.
_RECORDING = frozenset({JobStatus.REQUESTED, JobStatus.RUNNING, JobStatus.PAUSED})


class DownloadJob(Aggregate):
    """One download job: its files, where they go, and how far each one got."""

    @event("Requested")
    @with_provenance
    def __init__(
        self,
        id: UUID,
        files: list[dict[str, Any]],
        destination: str,
        mode: str,
        chunk_size: int,
        register_files: bool,
        requested_at: datetime,
        **provenance: Any,
    ) -> None:
        self.destination = destination
        self.mode = mode
        self.chunk_size = chunk_size
        self.register_files = register_files
        self.status = JobStatus.REQUESTED.value
        self.reason: str | None = None
        self.partials_purged = False
        self.files: list[dict[str, Any]] = [
            {**f, "status": FileStatus.PENDING.value, "bytes_done": 0, "etag": None,
             "last_modified": None, "sha256": None, "restarts": 0}
            for f in files]

    @classmethod
    def request(cls, job_id: UUID, files: list[dict[str, Any]], destination: str, mode: str,
                chunk_size: int, register_files: bool, now: datetime,
                provenance: Provenance) -> DownloadJob:
        if not files:
            raise InvalidCommand("a download job needs at least one file", field="files")
        names = [f["filename"] for f in files]
        if len(set(names)) != len(names):
            raise InvalidCommand("two files of the job have the same filename", field="files")
        return cls(id=job_id, files=files, destination=destination, mode=mode,
                   chunk_size=chunk_size, register_files=register_files,
                   requested_at=utc(now), **provenance.event_fields())

    # -- reading ---------------------------------------------------------------------------
    @property
    def bytes_done(self) -> int:
        return sum(int(f["bytes_done"]) for f in self.files)

    @property
    def bytes_total(self) -> int | None:
        """The sum of the files' sizes, once every size is known."""
        sizes = [f.get("size") for f in self.files]
        return None if None in sizes else sum(int(x) for x in sizes if x is not None)

    @property
    def files_completed(self) -> int:
        return sum(1 for f in self.files if f["status"] == FileStatus.COMPLETE)

    def _totals(self, index: int, bytes_done: int, size: int | None) -> dict[str, Any]:
        """The job's figures once file ``index`` has ``bytes_done`` bytes of ``size``."""
        sizes = [size if i == index else f.get("size") for i, f in enumerate(self.files)]
        return {"job_bytes_done": self.bytes_done - int(self.files[index]["bytes_done"])
                + bytes_done,
                "job_bytes_total": None if None in sizes else sum(
                    int(x) for x in sizes if x is not None)}

    def file(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self.files):
            raise InvalidCommand(f"download job {self.id} has no file {index}", field="index")
        return self.files[index]

    def _move(self, target: JobStatus) -> None:
        require_transition(JOB_TRANSITIONS, JobStatus(self.status), target,
                           f"download job {self.id}")

    def _recording(self) -> None:
        if JobStatus(self.status) not in _RECORDING:
            raise IllegalTransition(f"download job {self.id} is {self.status}", field="status")

    def _downloading(self, index: int) -> dict[str, Any]:
        """File ``index``, which the downloader may report on only while it downloads it."""
        self._recording()
        f = self.file(index)
        if f["status"] != FileStatus.DOWNLOADING:
            raise IllegalTransition(f"file {index} of download job {self.id} is "
                                    f"{f['status']}", field="index")
        return f

    # -- the downloader's reports ----------------------------------------------------------
    def start_file(self, index: int, size: int | None, etag: str | None,
                   last_modified: str | None, restart_reason: str | None, now: datetime,
                   provenance: Provenance) -> None:
        """The downloader begins a file (again from 0 with ``restart_reason``, e.g. it
        changed on the server)."""
        self._recording()
        f = self.file(index)
        if f["status"] == FileStatus.COMPLETE:
            raise IllegalTransition(f"file {index} of download job {self.id} is complete",
                                    field="index")
        self._file_started(index=index, size=size, etag=etag, last_modified=last_modified,
                           restart_reason=restart_reason, started_at=utc(now),
                           **self._totals(index, 0, size if size is not None else f.get("size")),
                           job_status=(JobStatus.RUNNING.value
                                       if self.status == JobStatus.REQUESTED else self.status),
                           **provenance.event_fields())

    @event("FileStarted")
    @with_provenance
    def _file_started(self, index: int, size: int | None, etag: str | None,
                      last_modified: str | None, restart_reason: str | None, started_at: datetime,
                      job_bytes_done: int, job_bytes_total: int | None, job_status: str,
                      **provenance: Any) -> None:
        f = self.files[index]
        f.update(status=FileStatus.DOWNLOADING.value, bytes_done=0, etag=etag,
                 last_modified=last_modified)
        if size is not None:
            f["size"] = size
        if restart_reason is not None:
            f["restarts"] += 1
        self.status = job_status

    def checkpoint(self, index: int, bytes_done: int, bytes_per_s: float | None,
                   now: datetime, provenance: Provenance) -> None:
        """``bytes_done`` bytes of the file are durably on disk (fsynced)."""
        f = self._downloading(index)
        if bytes_done < 0 or (f.get("size") is not None and bytes_done > f["size"]):
            raise InvalidCommand(f"checkpoint {bytes_done} is outside file {index}",
                                 field="bytes_done")
        self._checkpointed(index=index, bytes_done=bytes_done, bytes_per_s=bytes_per_s,
                           at=utc(now),
                           job_bytes_done=self._totals(index, bytes_done, None)["job_bytes_done"],
                           **provenance.event_fields())

    @event("Checkpointed")
    @with_provenance
    def _checkpointed(self, index: int, bytes_done: int, bytes_per_s: float | None, at: datetime,
                      job_bytes_done: int, **provenance: Any) -> None:
        self.files[index]["bytes_done"] = bytes_done

    def complete_file(self, index: int, size: int, sha256: str, fits: dict[str, Any] | None,
                      now: datetime, provenance: Provenance) -> None:
        """The file is whole, verified and in place; the last one completes the job."""
        f = self._downloading(index)
        if f.get("size") is not None and size != f["size"]:
            raise InvalidCommand(f"file {index} has {size} bytes, {f['size']} expected",
                                 field="size")
        self._file_completed(index=index, size=size, sha256=sha256, fits=fits,
                             completed_at=utc(now), **self._totals(index, size, size),
                             files_completed=self.files_completed + 1,
                             **provenance.event_fields())
        if self.status == JobStatus.RUNNING and all(
                x["status"] == FileStatus.COMPLETE for x in self.files):
            self._completed(completed_at=utc(now), **provenance.event_fields())

    @event("FileCompleted")
    @with_provenance
    def _file_completed(self, index: int, size: int, sha256: str, fits: dict[str, Any] | None,
                        completed_at: datetime, job_bytes_done: int, job_bytes_total: int | None,
                        files_completed: int, **provenance: Any) -> None:
        self.files[index].update(status=FileStatus.COMPLETE.value, bytes_done=size, size=size,
                                 sha256=sha256)

    @event("Completed")
    @with_provenance
    def _completed(self, completed_at: datetime, **provenance: Any) -> None:
        self.status = JobStatus.COMPLETED.value

    def fail(self, reason: str, index: int | None, now: datetime,
             provenance: Provenance) -> None:
        """The job stops with a reason (a file that could not be fetched or verified)."""
        if index is not None:
            self.file(index)
        self._move(JobStatus.FAILED)
        self._failed(reason=reason, index=index, failed_at=utc(now),
                     **provenance.event_fields())

    @event("Failed")
    @with_provenance
    def _failed(self, reason: str, index: int | None, failed_at: datetime,
                **provenance: Any) -> None:
        self.status = JobStatus.FAILED.value
        self.reason = reason
        if index is not None:
            self.files[index]["status"] = FileStatus.FAILED.value

    # -- people's commands -----------------------------------------------------------------
    def pause(self, now: datetime, provenance: Provenance) -> None:
        self._move(JobStatus.PAUSED)
        self._paused(paused_at=utc(now), **provenance.event_fields())

    @event("Paused")
    @with_provenance
    def _paused(self, paused_at: datetime, **provenance: Any) -> None:
        self.status = JobStatus.PAUSED.value

    def resume(self, now: datetime, provenance: Provenance) -> None:
        """Paused or failed → running: the downloader continues from the last checkpoints
        (a failed file is retried)."""
        self._move(JobStatus.RUNNING)
        self._resumed(resumed_at=utc(now), **provenance.event_fields())
        if all(f["status"] == FileStatus.COMPLETE for f in self.files):  # paused at the end
            self._completed(completed_at=utc(now), **provenance.event_fields())

    @event("Resumed")
    @with_provenance
    def _resumed(self, resumed_at: datetime, **provenance: Any) -> None:
        self.status = JobStatus.RUNNING.value
        self.reason = None
        for f in self.files:
            if f["status"] == FileStatus.FAILED:
                f["status"] = (FileStatus.DOWNLOADING.value if f["etag"] or f["bytes_done"]
                               else FileStatus.PENDING.value)

    def cancel(self, reason: str | None, now: datetime, provenance: Provenance) -> None:
        self._move(JobStatus.CANCELLED)
        self._cancelled(reason=reason, cancelled_at=utc(now), **provenance.event_fields())

    @event("Cancelled")
    @with_provenance
    def _cancelled(self, reason: str | None, cancelled_at: datetime, **provenance: Any) -> None:
        self.status = JobStatus.CANCELLED.value
        self.reason = reason

    def purge_partials(self, removed: list[str], now: datetime,
                       provenance: Provenance) -> None:
        """The partial files of a cancelled or failed job were removed (retention)."""
        if self.status not in (JobStatus.CANCELLED, JobStatus.FAILED):
            raise IllegalTransition(f"download job {self.id} is {self.status}; only "
                                    "cancelled or failed jobs are purged", field="status")
        if self.partials_purged:
            raise IllegalTransition(f"download job {self.id} was purged already",
                                    field="status")
        self._partials_purged(removed=removed, purged_at=utc(now),
                              job_bytes_done=sum(int(f["bytes_done"]) for f in self.files
                                                 if f["status"] == FileStatus.COMPLETE),
                              **provenance.event_fields())

    @event("PartialsPurged")
    @with_provenance
    def _partials_purged(self, removed: list[str], purged_at: datetime, job_bytes_done: int,
                         **provenance: Any) -> None:
        self.partials_purged = True
        for f in self.files:
            if f["status"] != FileStatus.COMPLETE:
                f["bytes_done"] = 0
