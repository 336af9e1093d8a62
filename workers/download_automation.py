"""The MAST downloader: runs download jobs and records every change through commands.

It looks at the downloads read model every ``download_poll_s`` (or when woken): a job that is
requested or running and has no task here gets one; a task whose job is no longer requested
or running (paused, cancelled) is stopped, leaving its partial files and last checkpoints.
A job's task first waits until the journal holds no unapplied command of the job, then reads
the job from the event store (the source of truth) and fetches its unfinished files, at most
``download_concurrent_files`` at a time across all jobs:

- a file in progress continues from its last checkpoint: the partial file is truncated to it
  (a partial shorter than its checkpoint starts the file again from 0, saying why);
- ``start_file``, ``checkpoint`` (after an fsync, every N chunks or seconds), then the checks
  (size, sha256, FITS with astropy) and ``complete_file``; a verified FITS file is registered
  as a raw data file (``raw_data_file.register``);
- a file that changed on the server starts again from 0 (``download_on_changed_file=restart``,
  once per run) or fails the job; any other failure of the file — the transfer, a redirect to
  a host that is not allowed, the file system (``OSError``: a name too long, a full disk, no
  permission) — fails the job with its reason;
- a completed file is never written over: a file that exists at the destination fails the
  job that would replace it (the partial is linked to its final name, never renamed over it),
  and two jobs never write one partial file at once.

A job whose task ends in an error of ours (the store unreachable, a bug) is started again
after a growing delay (up to ``MAX_JOB_BACKOFF_S``), never at once: no busy loop.

Every command has a deterministic idempotency key, so a downloader killed between sending a
command and seeing its effect repeats it harmlessly. Commands are only journaled here (the
journal is durable); the dispatcher applies them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import aiohttp

from commands.downloads import (
    PARTIAL_SUFFIX,
    DownloadCheckpoint,
    DownloadCommand,
    DownloadFail,
    DownloadFileComplete,
    DownloadFileStart,
    PurgeDownloadPartials,
)
from commands.models import Checksum, CommandModel
from commands.raw_data import RawDataCommand, RegisterRawDataFileRequest
from commands.service import CommandService, IdempotencyConflict
from domain.downloads import DownloadJob, FileStatus, JobStatus
from domain.errors import DomainRejection
from infra.event_store import EventStore
from infra.fits_check import FitsInvalid, is_fits_name, sha256_of, verify_fits
from infra.logs import command_context
from infra.mast_transfer import (
    FileChanged,
    RemoteInfo,
    TransferConfig,
    TransferError,
    fetch,
    partial_length,
)
from infra.metrics import Metrics
from infra.settings import Settings
from queries.downloads import DownloadQueries
from workers.download_destinations import job_dir

# api/mast.py and bootstrap/ledger.py import these two from here (another helper owns them)
from workers.download_destinations import job_dir as job_dir  # noqa: F811
from workers.download_destinations import same_files_precheck as same_files_precheck
from workers.download_progress import LiveProgress

log = logging.getLogger("obsledger.downloader")

ACTOR = "obsledger:downloader"
#: Instrument of registered files whose product names none: "MAST".
DEFAULT_INSTRUMENT = "MAST"


#: Commands after which a job's running task must stop at once, not at the next projection,
#: and the events that say it stopped.
STOPPING = (DownloadCommand.DOWNLOAD_JOB_PAUSE, DownloadCommand.DOWNLOAD_JOB_CANCEL)
STOPPED_TOPICS = (".Paused", ".Cancelled")


#: Longest wait before a job whose task failed unexpectedly is started again.
MAX_JOB_BACKOFF_S = 60.0


class _Stop(Exception):
    """The job must stop here (a command was refused: cancelled, …)."""


class FileFailed(Exception):
    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    pending = [t for t in tasks if not t.done()]
    for t in pending:
        t.cancel()
    await asyncio.gather(*pending, return_exceptions=True)


class Downloader:
    """The worker: a thread with its own asyncio loop (``start``/``stop``, or ``run_once``)."""

    name = "downloader"

    def __init__(self, store: EventStore, queries: DownloadQueries, commands: CommandService,
                 settings: Settings, metrics: Metrics | None = None) -> None:
        self.store = store
        self.queries = queries
        self.commands = commands
        self.settings = settings
        self.metrics = metrics
        self.last_error: str | None = None
        self.running = False
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.live: dict[tuple[str, int], int] = {}  # (job, file) → bytes written (not yet ckpt)
        self.progress = LiveProgress()  # bytes, speed, ETA of the jobs running here
        self.read_version: dict[str, int] = {}  # job → its events its running task has seen
        self.bytes_fetched = 0  # this process's, for tests and the bench
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._last_purge = 0.0
        self._semaphore: asyncio.Semaphore | None = None
        self.not_before: dict[str, tuple[float, int]] = {}  # job → (monotonic, failures)
        self.writing: set[Path] = set()  # final paths a task of this process is writing

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.run(self.main())

    def stop(self) -> None:
        self._stop.set()
        self.wake()
        if self._thread is not None:
            self._thread.join(timeout=15)

    def wait_idle(self, timeout: float = 3600.0) -> str:
        """Until the (started) downloader has no active job and no download command waits
        in the journal (``obsledger downloader --once``)."""
        deadline = time.monotonic() + timeout
        time.sleep(0.2)
        while time.monotonic() < deadline:
            busy = any(not t.done() for t in list(self.tasks.values()))
            waiting = any(e.status == "accepted" for e in self.commands.journal.unprojected(
                sys.maxsize, None, (DownloadCommand.DOWNLOAD_JOB_REQUEST,
                                    DownloadCommand.DOWNLOAD_JOB_RESUME,
                                    DownloadCommand.DOWNLOAD_JOB_COMPLETE_FILE,
                                    DownloadCommand.DOWNLOAD_JOB_FAIL)))
            if not busy and not waiting and self.running and not self.queries.active_jobs():
                break
            time.sleep(0.2)
        return f"downloader idle; {self.bytes_fetched} bytes fetched"

    def wake(self, _position: int | None = None) -> None:
        loop, ev = self._loop, self._wake
        if loop is not None and ev is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(ev.set)

    def config(self, chunk_size: int, mode: str) -> TransferConfig:
        s = self.settings
        return TransferConfig(
            chunk_size=chunk_size, mode=mode,
            checkpoint_bytes=chunk_size * s.download_checkpoint_chunks,
            checkpoint_s=s.download_checkpoint_s, retries=s.download_retries,
            backoff_base_s=s.download_backoff_base_s, backoff_max_s=s.download_backoff_max_s,
            read_timeout_s=s.download_read_timeout_s, allowed_origins=s.download_origins,
            connections=s.download_connections_per_file)

    async def main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._semaphore = asyncio.Semaphore(self.settings.download_concurrent_files)
        self.running = True
        connector = aiohttp.TCPConnector(limit=0, force_close=False)
        try:
            async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as s:
                self.session = s
                while not self._stop.is_set():
                    try:
                        await self.tick()
                        self.last_error = None
                    except Exception as e:  # the store or read models down: next tick
                        self.last_error = f"{type(e).__name__}: {e}"
                        log.warning("downloader: %s", self.last_error)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.settings.download_poll_s)
                    self._wake.clear()
                for task in self.tasks.values():
                    task.cancel()
                await asyncio.gather(*self.tasks.values(), return_exceptions=True)
        finally:
            self.running = False

    async def tick(self) -> None:
        """Start tasks for active jobs, stop those of jobs paused or cancelled, purge."""
        active = set(await asyncio.to_thread(self.queries.active_jobs))
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
            elif (job_id not in active or self._pending(job_id, STOPPING)
                  or await asyncio.to_thread(self._stopped_since_read, job_id)):
                # paused or cancelled, even if resumed since: a resumed job gets a new task
                # that reads the job again (its files may have changed on the server meanwhile)
                task.cancel()
        now = time.monotonic()
        for job_id in active:
            if job_id not in self.tasks and self.not_before.get(job_id, (0.0, 0))[0] <= now:
                self.tasks[job_id] = asyncio.create_task(self.run_job(UUID(job_id)),
                                                         name=f"download-{job_id}")
        if time.monotonic() - self._last_purge > 60:
            self._last_purge = time.monotonic()
            await self.purge_expired()

    def _stopped_since_read(self, job_id: str) -> bool:
        """Whether the job was paused or cancelled after its task read it (the read model
        shows only the latest status: a pause and a resume between two ticks leave no
        trace there). Each call reads only the events the previous one did not see."""
        seen = self.read_version.get(job_id)
        if seen is None:
            return False
        for version, topic in self.store.topics_since(UUID(job_id), seen):
            if topic.endswith(STOPPED_TOPICS):
                return True
            self.read_version[job_id] = version
        return False

    def _pending(self, job_id: str, types: tuple[str, ...] = ()) -> bool:
        entries = self.commands.journal.unprojected(sys.maxsize, f"download_job:{job_id}")
        return any(e.status == "accepted" and (not types or e.command_type in types)
                   for e in entries)

    async def until_applied(self, job_id: str, timeout: float = 60.0) -> None:
        """Wait until every journaled command of the job is applied (or rejected)."""
        deadline = time.monotonic() + timeout
        while self._pending(job_id):
            if time.monotonic() > deadline:
                raise _Stop(f"commands of download job {job_id} are not applied")
            await asyncio.sleep(0.05)

    async def wait_applied(self, timeout: float = 60.0) -> None:
        """Tests and the command line: until no download job is active here."""
        deadline = time.monotonic() + timeout
        while any(not t.done() for t in self.tasks.values()):
            if time.monotonic() > deadline:
                raise TimeoutError("downloads still running")
            await asyncio.sleep(0.05)

    # -- commands --------------------------------------------------------------------------
    async def send(self, command_type: str, request: CommandModel, key: str,
                   path: dict[str, Any] | None = None, correlation_id: str | None = None,
                   ) -> None:
        with command_context(key, correlation_id or key):
            try:
                await self.commands.submit(command_type, request, path=path, actor=ACTOR,
                                           correlation_id=correlation_id,
                                           idempotency_key=key)
            except IdempotencyConflict as e:  # sent before with other figures: that stands
                log.info("%s: %s", command_type, e)
            except DomainRejection as e:  # refused at once: the job cannot go on
                raise _Stop(f"{command_type} refused: {e}") from e

    # -- one job ---------------------------------------------------------------------------
    async def run_job(self, job_id: UUID) -> None:
        try:
            await self.until_applied(str(job_id))
            job = await asyncio.to_thread(self.store.get, job_id)
            if not isinstance(job, DownloadJob) or job.status not in (
                    JobStatus.REQUESTED, JobStatus.RUNNING):
                return
            self.read_version[str(job_id)] = job.version
            self.progress.begin(job)
            todo = [i for i, f in enumerate(job.files) if f["status"] != FileStatus.COMPLETE]
            tasks = [asyncio.create_task(self.run_file(job, i)) for i in todo]
            try:
                try:
                    for finished in asyncio.as_completed(tasks):
                        await finished
                finally:  # paused, cancelled, stopped or failed: no file goes on alone
                    await _cancel_all(tasks)
            except FileFailed as e:
                await _cancel_all(tasks)
                log.warning("download job %s failed: file %s: %s", job_id, e.index, e.reason)
                await self.send(DownloadCommand.DOWNLOAD_JOB_FAIL,
                                DownloadFail(id=job_id, reason=e.reason, index=e.index),
                                f"dl:{job_id}:{e.index}:fail:{job.version}")
        except _Stop as e:
            log.info("download job %s stopped: %s", job_id, e)
        except Exception as e:  # ours (store down, a bug): again later, not in a busy loop
            failures = self.not_before.get(str(job_id), (0.0, 0))[1] + 1
            delay = min(MAX_JOB_BACKOFF_S, 2.0 ** failures)
            self.not_before[str(job_id)] = (time.monotonic() + delay, failures)
            self.last_error = f"download job {job_id}: {type(e).__name__}: {e}"
            log.warning("%s; trying again in %.0f s", self.last_error, delay)
            return
        else:
            self.not_before.pop(str(job_id), None)
        finally:
            self.read_version.pop(str(job_id), None)
            self.progress.end(str(job_id))
        self.wake()

    async def run_file(self, job: DownloadJob, index: int) -> None:
        assert self._semaphore is not None
        async with self._semaphore:
            try:
                await self._run_file(job, index)
            except (OSError, ValueError) as e:  # the file system refused: the job fails
                name = job.files[index]["filename"]
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise FileFailed(index, f"{name}: {reason or type(e).__name__}") from e

    async def _run_file(self, job: DownloadJob, index: int) -> None:
        f = job.files[index]
        key = f"dl:{job.id}:{index}"
        try:
            directory = job_dir(self.settings, job.destination)
        except ValueError as e:
            raise FileFailed(index, str(e)) from e
        final = directory / f["filename"]
        if final in self.writing:
            raise FileFailed(index, f"{f['filename']}: another download job is writing "
                             f"{job.destination or '.'}/{f['filename']}")
        self.writing.add(final)
        try:
            await self._fetch_file(job, index, directory, final, key)
        finally:
            self.writing.discard(final)

    async def _fetch_file(self, job: DownloadJob, index: int, directory: Path, final: Path,
                          key: str) -> None:
        f = job.files[index]
        partial = directory / (f["filename"] + PARTIAL_SUFFIX)
        in_progress = f["status"] == FileStatus.DOWNLOADING
        restarts = int(f["restarts"])
        restart_reason: str | None = None
        offset, known = 0, None
        if in_progress:
            offset = int(f["bytes_done"])
            known = RemoteInfo(f.get("size"), f.get("etag"), f.get("last_modified"))
            if final.exists() and partial.exists() and os.path.samefile(final, partial):
                partial.unlink()  # linked, then stopped before the partial name went
            if final.exists() and not partial.exists():  # renamed, not yet completed
                await self._complete(job, index, final, key)
                return
            if partial_length(partial) < offset:
                restart_reason = (f"the partial file has {partial_length(partial)} bytes, "
                                  f"fewer than its checkpoint ({offset})")
                offset, known = 0, None
                restarts += 1
        if final.exists() and not (in_progress and partial.exists()):
            raise FileFailed(index, f"{f['filename']}: {job.destination or '.'}/"
                             f"{f['filename']} exists (another job's file?): never written over")
        changed_once = False
        # the archive's size, or the server's when started; a file started again from 0 is
        # whatever the server sends now (its size is recorded when it starts)
        expected_size = f.get("size") if restart_reason is None else None
        while True:
            reason = restart_reason

            async def started(info: RemoteInfo, reason: str | None = reason,
                              restarts: int = restarts, offset: int = offset) -> None:
                self.progress.moved(str(job.id), index, offset, info.size)
                await self.send(DownloadCommand.DOWNLOAD_JOB_START_FILE, DownloadFileStart(
                    id=job.id, index=index, size=info.size, etag=info.etag,
                    last_modified=info.last_modified, restart_reason=reason),
                    f"{key}:start:{restarts}")

            async def checkpoint(done: int, speed: float | None,
                                 restarts: int = restarts) -> None:
                await self.send(DownloadCommand.DOWNLOAD_JOB_CHECKPOINT, DownloadCheckpoint(
                    id=job.id, index=index, bytes_done=done, bytes_per_s=speed),
                    f"{key}:ckpt:{restarts}:{done}")

            start_pos = offset
            written = [offset]

            def progress(pos: int, written: list[int] = written) -> None:
                written[0] = pos
                self.live[(str(job.id), index)] = pos
                self.progress.moved(str(job.id), index, pos)

            digest = hashlib.sha256()
            try:
                size, _info = await fetch(
                    self.session, f["url"], partial, offset, known,
                    self.config(job.chunk_size, job.mode),
                    started=started, checkpoint=checkpoint, progress=progress, digest=digest)
                break
            except FileChanged as e:
                if self.settings.download_on_changed_file == "fail" or changed_once:
                    raise FileFailed(index, f"the file changed on the server: {e}") from e
                changed_once = True
                restarts += 1
                restart_reason = f"the file changed on the server: {e}"
                expected_size = None  # the new file's size is recorded when it starts
                log.info("%s: %s; starting it again", f["filename"], restart_reason)
                offset, known = 0, None
            except TransferError as e:
                raise FileFailed(index, f"{f['filename']}: {e}") from e
            finally:
                fetched = written[0] - start_pos
                self.bytes_fetched += max(fetched, 0)
                if self.metrics is not None and fetched > 0:
                    self.metrics.download_bytes.inc(fetched)
                self.live.pop((str(job.id), index), None)
                self.progress.stalled(str(job.id), index)
        if expected_size is not None and size != int(expected_size):
            raise FileFailed(index, f"{f['filename']}: {size} bytes received, "
                             f"{expected_size} expected")
        try:  # a link fails if the final name exists: a completed file is never replaced
            os.link(partial, final)
        except FileExistsError:
            raise FileFailed(index, f"{f['filename']}: {job.destination or '.'}/"
                             f"{f['filename']} appeared meanwhile: never written over") from None
        partial.unlink()
        await self._complete(job, index, final, key, digest.hexdigest())

    async def _complete(self, job: DownloadJob, index: int, final: Path, key: str,
                        sha: str | None = None) -> None:
        f = job.files[index]
        size = final.stat().st_size
        if sha is None:  # hashed while it was written, unless renamed by an earlier run
            sha = await asyncio.to_thread(sha256_of, final)
        fits: dict[str, Any] | None = None
        if is_fits_name(f["filename"]):
            try:
                fits = await asyncio.to_thread(verify_fits, final)
            except FitsInvalid as e:
                raise FileFailed(index, f"{f['filename']}: {e}") from e
        self.progress.moved(str(job.id), index, size, size)
        self.progress.stalled(str(job.id), index)
        await self.send(DownloadCommand.DOWNLOAD_JOB_COMPLETE_FILE, DownloadFileComplete(
            id=job.id, index=index, size=size, sha256=sha, fits=fits), f"{key}:complete")
        if job.register_files and fits is not None:
            await self._register(job, index, final, size, sha)

    async def _register(self, job: DownloadJob, index: int, final: Path, size: int,
                        sha: str) -> None:
        f = job.files[index]
        relative = final.resolve().relative_to(self.settings.download_dir.resolve()).as_posix()
        instrument = (f.get("instrument") or DEFAULT_INSTRUMENT)[:100]
        product = (f.get("product_type") or "product").lower()
        request = RegisterRawDataFileRequest(
            name=f["filename"], relative_path=relative, size=size,
            checksum=Checksum(algorithm="sha256", value=sha), instrument=instrument,
            file_type=f"mast_{product}"[:50])
        try:
            await self.send(RawDataCommand.RAW_DATA_FILE_REGISTER, request,
                            f"dl:{job.id}:{index}:register",
                            correlation_id=f"download_job:{job.id}")
        except _Stop as e:  # e.g. a file of that name is registered already
            log.info("%s not registered: %s", f["filename"], e)

    # -- retention -------------------------------------------------------------------------
    async def purge_expired(self, now: datetime | None = None) -> int:
        """Remove the partial files of cancelled or failed jobs older than the retention."""
        now = now or datetime.now(UTC)
        before = now - timedelta(days=self.settings.download_retention_days)
        purged = 0
        for job_id in await asyncio.to_thread(self.queries.purgeable_jobs, before):
            task = self.tasks.get(job_id)
            if task is not None and not task.done():  # the job ended: its task stops now
                await _cancel_all([task])
            job = await asyncio.to_thread(self.store.get, UUID(job_id))
            if not isinstance(job, DownloadJob) or job.partials_purged:
                continue
            removed = []
            try:
                directory = job_dir(self.settings, job.destination)
            except ValueError:
                continue
            for f in job.files:
                if f["status"] == FileStatus.COMPLETE:
                    continue
                partial = directory / (f["filename"] + PARTIAL_SUFFIX)
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
                    removed.append(str(partial.relative_to(self.settings.download_dir
                                                           .resolve())))
            try:
                await self.send(DownloadCommand.DOWNLOAD_JOB_PURGE_PARTIALS,
                                PurgeDownloadPartials(id=job.id, removed=removed),
                                f"dl:{job.id}:purge:{job.version}")
                purged += 1
            except _Stop as e:
                log.info("download job %s not purged: %s", job_id, e)
        return purged

    def report(self) -> dict[str, Any]:
        return {"running": self.running, "active_jobs": sum(
            1 for t in self.tasks.values() if not t.done()),
            "files_in_flight": len(self.live), "bytes_fetched": self.bytes_fetched,
            "last_error": self.last_error}
