"""The processing worker: claims processing jobs, runs them, records everything by commands.

It polls the ``processing_jobs`` read model every ``processing_poll_s`` (or when woken) for
jobs it may claim — requested ones, and running ones whose lease expired (their worker was
killed or hangs) — and claims one through ``processing_job.claim``. The dispatcher applies
claims in journal order and the domain refuses a claim while another lease is live, so of
two workers racing for a job exactly one wins. The winner:

- keeps its lease alive from a separate thread (``processing_job.renew`` every third of
  ``processing_lease_s``); a renewal refused means the lease was lost: the job stops;
- fetches the inputs: a raw data file resolves in the object store's RAW area by its relative
  path, else at ``raw_data_dir / relative_path`` (then uploaded to the RAW area), and its
  recorded checksum is verified;
- runs the job in a work directory below ``<data_dir>/work`` with a ``CommandReporter``:
  steps (``start_step`` / ``complete_step``), progress (throttled to one command per
  ``processing_progress_interval_s``) and ``cancelled()`` (a cancel requested, or the lease
  lost), checked by the algorithm between steps and chunks;
- uploads a process job's products to the PRODUCTS area and records ``succeed`` with each
  product's kind, key, size, sha256, media type and metrics; an ingest job records the FITS
  facts of each file; a catalog job checks every product's object (size, sha256) first;
- on a cancel, removes what it uploaded and records ``confirm_cancel``: a cancelled job's
  outputs never become products.

Every command has a deterministic idempotency key (job, attempt, step/sequence), so a repeat
after a crash is answered from the journal's record. A worker killed mid-job leaves the job
``running`` until its lease expires; then any worker claims it again (the attempt counted).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from pydantic import BaseModel

from commands.algorithms import AlgorithmInput, ProductFile, algorithm, input_records
from commands.models import CommandModel
from commands.processing import (
    ClaimProcessingJob,
    ConfirmProcessingCancel,
    FailProcessingJob,
    IngestedFile,
    ProcessingCommand,
    ProcessingProgress,
    ProcessingStep,
    ProductInputUse,
    ProductOutputFile,
    RenewProcessingLease,
    SucceedProcessingJob,
)
from commands.service import CommandService, IdempotencyConflict
from domain.errors import DomainRejection
from domain.processing import DataProduct, JobKind, ProcessingJob
from domain.reduction import ReductionCancelled
from infra.event_store import EventStore
from infra.fits_products import FitsRejected, ProductProvenance, ingest_fits, software_versions
from infra.journal import APPLIED, JournalEntry
from infra.logs import command_context
from infra.object_store import Area, ObjectStore, ObjectStoreUnavailable
from infra.settings import Settings
from infra.worker import PollingWorker
from queries.processing import ProcessingQueries

log = logging.getLogger("obsledger.processing")

ACTOR = "obsledger:worker"
#: How long the worker waits for a claim or an end of job to be applied.
OUTCOME_TIMEOUT_S = 60.0
HASHES = {"md5", "sha1", "sha256", "sha512"}


def new_worker_id() -> str:
    """host:pid:random — unique per worker start, so a restarted worker is a new holder."""
    return f"{socket.gethostname()[:100]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobStopped(Exception):
    """The job stops here: cancelled, or the lease was lost."""


class JobFailed(Exception):
    """The job fails with ``reason`` (``retryable``: another attempt may succeed)."""

    def __init__(self, reason: str, retryable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


def checksum_of(path: Path, algorithm_name: str) -> str:
    h = hashlib.new(algorithm_name)
    with open(path, "rb") as f:
        while data := f.read(4 * 1024 * 1024):
            h.update(data)
    return h.hexdigest()


class _Run:
    """One attempt at one job: the lease, the reports, the commands' keys."""

    def __init__(self, worker: ProcessingWorker, job: ProcessingJob) -> None:
        self.worker = worker
        self.job = job
        self.job_id: UUID = job.id
        self.attempt = job.attempts
        self.prefix = f"pj:{job.id}:{self.attempt}"
        self.lost = threading.Event()
        self.stop_renewing = threading.Event()
        self._progress_n = 0
        self._last_progress = 0.0
        self._steps = 0
        self._checked = 0.0
        self._cancelled = False
        self.renewals = 0

    def held(self, **fields: Any) -> dict[str, Any]:
        return {"id": self.job_id, "worker": self.worker.worker_id, "attempt": self.attempt,
                **fields}

    # -- the StepReporter protocol ---------------------------------------------------------
    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        self._steps += 1
        n = self._steps
        self.worker.send(ProcessingCommand.PROCESSING_JOB_START_STEP,
                         ProcessingStep(**self.held(name=name)),
                         f"{self.prefix}:step:{n}:start")
        yield
        self.worker.send(ProcessingCommand.PROCESSING_JOB_COMPLETE_STEP,
                         ProcessingStep(**self.held(name=name)), f"{self.prefix}:step:{n}:end")

    def progress(self, fraction: float) -> None:
        fraction = min(max(float(fraction), 0.0), 1.0)
        now = time.monotonic()
        if now - self._last_progress < self.worker.settings.processing_progress_interval_s \
                and fraction < 1.0:
            return
        self._last_progress = now
        self._progress_n += 1
        self.worker.send(ProcessingCommand.PROCESSING_JOB_PROGRESS,
                         ProcessingProgress(**self.held(fraction=round(fraction, 4))),
                         f"{self.prefix}:progress:{self._progress_n}")

    def cancelled(self) -> bool:
        """A cancel asked (read model or journal, looked up at most every 0.2 s), the lease
        lost (the renewing thread says) or the worker stopping."""
        if self._cancelled or self.lost.is_set() or self.worker.stopping:
            return True
        now = time.monotonic()
        if now - self._checked >= 0.2:
            self._checked = now
            self._cancelled = self.worker.queries.cancel_asked(str(self.job_id))
        return self._cancelled

    def cancel_requested(self) -> bool:
        """Whether the job has a cancel requested (the event store says; a cancel still
        waiting in the journal is waited for, up to 30 s)."""
        deadline = time.monotonic() + 30
        subject = f"processing_job:{self.job_id}"
        while True:
            job = self.worker.store.get(self.job_id)
            if isinstance(job, ProcessingJob) and job.cancel_requested:
                return True
            waiting = any(e.status == "accepted" for e in self.worker.commands.journal
                          .unprojected(2**62, subject, (ProcessingCommand.PROCESSING_JOB_CANCEL,)))
            if not waiting or time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    # -- the lease -------------------------------------------------------------------------
    def keep_lease(self) -> None:
        """Renew every third of the lease until stopped; a refusal means it was lost."""
        lease_s = self.worker.settings.processing_lease_s
        while not self.stop_renewing.wait(lease_s / 3):
            self.renewals += 1
            try:
                entry = self.worker.send(
                    ProcessingCommand.PROCESSING_JOB_RENEW,
                    RenewProcessingLease(**self.held(lease_s=lease_s)),
                    f"{self.prefix}:renew:{self.renewals}")
                outcome = self.worker.outcome(entry, lease_s / 3)
            except Exception as e:  # the journal or store is failing: the lease may lapse
                log.warning("processing job %s: lease not renewed: %s", self.job_id, e)
                continue
            if outcome is not None and outcome.status == "rejected":
                log.warning("processing job %s: lease lost: %s", self.job_id, outcome.reason)
                self.lost.set()
                return


class ProcessingWorker(PollingWorker):
    """Runs processing jobs one at a time (start several processes for more)."""

    name = "processing-worker"

    def __init__(self, store: EventStore, queries: ProcessingQueries,
                 commands: CommandService, settings: Settings, objects: ObjectStore,
                 worker_id: str | None = None) -> None:
        super().__init__(settings.processing_poll_s)
        self.store = store
        self.queries = queries
        self.commands = commands
        self.settings = settings
        self.objects = objects
        self.worker_id = worker_id or new_worker_id()
        self.current: str | None = None
        self.jobs_done = 0
        self.running = False
        self._claims = 0

    # -- commands --------------------------------------------------------------------------
    def send(self, command_type: str, request: CommandModel, key: str) -> JournalEntry | None:
        """Journal a command (idempotent by ``key``); None if refused at once."""
        async def submit() -> JournalEntry:
            sub = await self.commands.submit(command_type, request, actor=ACTOR,
                                             correlation_id=None, idempotency_key=key)
            return sub.entry

        with command_context(key, key):
            try:
                return asyncio.run(submit())
            except IdempotencyConflict as e:  # sent before with other figures: that stands
                log.info("%s: %s", command_type, e)
                return self.commands.journal.get(key)
            except DomainRejection as e:
                log.info("%s refused: %s", command_type, e)
                return None

    def outcome(self, entry: JournalEntry | None,
                timeout: float = OUTCOME_TIMEOUT_S) -> JournalEntry | None:
        if entry is None:
            return None
        return asyncio.run(self.commands.journal.wait_outcome(entry.command_id, timeout))

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    # -- polling ---------------------------------------------------------------------------
    def _run(self) -> None:
        self.running = True
        try:
            self.sweep_work_dirs()
        except Exception as e:  # the store is down: the next start sweeps
            log.warning("work directories not swept: %s", e)
        try:
            super()._run()
        finally:
            self.running = False

    def sweep_work_dirs(self) -> list[Path]:
        """Remove the work directories killed workers left: of jobs that ended, and of
        attempts no live lease holds (a live one may be another worker's on this host)."""
        root = self.settings.processing_work_dir
        removed: list[Path] = []
        if not root.is_dir():
            return removed
        now = datetime.now(UTC)
        for job_dir in root.iterdir():
            try:
                job = self.store.get(UUID(job_dir.name))
            except ValueError:
                continue
            for attempt_dir in job_dir.iterdir() if job_dir.is_dir() else ():
                live = (isinstance(job, ProcessingJob) and job.lease_live(now)
                        and attempt_dir.name == str(job.attempts))
                if not live:
                    shutil.rmtree(attempt_dir, ignore_errors=True)
                    removed.append(attempt_dir)
            with contextlib.suppress(OSError):
                job_dir.rmdir()  # empty now
        return removed

    def once(self) -> int:
        """Claim and run one job; return 1 if one ran (look again at once), else 0."""
        for job_id in self.queries.claimable(datetime.now(UTC)):
            if self._stop.is_set():
                return 0
            job = self.claim(UUID(job_id))
            if job is not None:
                self.run_job(job)
                return 1
        return 0

    def claim(self, job_id: UUID) -> ProcessingJob | None:
        """The job if this worker now holds it (None: another worker won, or it ended)."""
        job = self.store.get(job_id)
        if not isinstance(job, ProcessingJob) or job.final:
            return None
        # a new key per try: a claim refused while a lease was live must not be answered
        # from the journal's record once that lease has expired (the job's version is the
        # same: a dead worker records nothing)
        self._claims += 1
        entry = self.send(ProcessingCommand.PROCESSING_JOB_CLAIM, ClaimProcessingJob(
            id=job_id, worker=self.worker_id, lease_s=self.settings.processing_lease_s),
            f"pj:{job_id}:claim:{self.worker_id}:{job.version}:{self._claims}")
        done = self.outcome(entry)
        if done is None or done.status != APPLIED:
            return None
        job = self.store.get(job_id)
        if isinstance(job, ProcessingJob) and job.held_by(self.worker_id, job.attempts):
            return job
        return None  # the claim found the job cancelled or out of attempts

    def run_job(self, job: ProcessingJob) -> None:
        run = _Run(self, job)
        self.current = str(job.id)
        keeper = threading.Thread(target=run.keep_lease, name=f"lease-{job.id}", daemon=True)
        keeper.start()
        workdir = self.settings.processing_work_dir / str(job.id) / str(run.attempt)
        uploaded: list[str] = []
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            log.info("processing job %s (%s), attempt %s", job.id, job.kind, run.attempt)
            request = self._execute(run, workdir, uploaded)
            if run.cancelled():
                raise JobStopped("cancel requested")
            entry = self.send(ProcessingCommand.PROCESSING_JOB_SUCCEED, request,
                              f"{run.prefix}:succeed")
            done = self.outcome(entry)
            if done is None or done.status != APPLIED:
                raise JobStopped(done.reason if done is not None and done.reason
                                 else "success not recorded")
            self.jobs_done += 1
        except (JobStopped, ReductionCancelled) as e:
            self._discard(uploaded)
            if run.lost.is_set():
                log.warning("processing job %s: lease lost, stopped", job.id)
            elif run.cancel_requested():
                log.info("processing job %s stopped: %s", job.id, e)
                self.send(ProcessingCommand.PROCESSING_JOB_CONFIRM_CANCEL,
                          ConfirmProcessingCancel(**run.held()), f"{run.prefix}:cancelled")
            else:  # this worker is stopping: another one takes the job at once
                self._fail(run, "the worker stopped", True)
        except JobFailed as e:
            self._discard(uploaded)
            self._fail(run, e.reason, e.retryable)
        except (ObjectStoreUnavailable, OSError) as e:
            self._discard(uploaded)
            self._fail(run, f"{type(e).__name__}: {e}", True)
        except Exception as e:  # the algorithm failed: another attempt would fail the same
            log.exception("processing job %s failed", job.id)
            self._discard(uploaded)
            self._fail(run, f"{type(e).__name__}: {e}", False)
        finally:
            run.stop_renewing.set()
            keeper.join(timeout=10)
            self._remove_work(workdir, run.attempt)
            self.current = None

    @staticmethod
    def _remove_work(workdir: Path, attempt: int) -> None:
        """This attempt's directory, and those of earlier (dead) attempts of the job."""
        shutil.rmtree(workdir, ignore_errors=True)
        job_dir = workdir.parent
        for sibling in job_dir.iterdir() if job_dir.is_dir() else ():
            if sibling.name.isdigit() and int(sibling.name) < attempt:
                shutil.rmtree(sibling, ignore_errors=True)
        with contextlib.suppress(OSError):
            job_dir.rmdir()

    def _fail(self, run: _Run, reason: str, retryable: bool) -> None:
        if run.lost.is_set():
            return
        if run.cancel_requested():  # a cancel requested meanwhile: cancelled, not failed
            self.send(ProcessingCommand.PROCESSING_JOB_CONFIRM_CANCEL,
                      ConfirmProcessingCancel(**run.held()),
                      f"{run.prefix}:cancelled")
            return
        log.warning("processing job %s failed: %s", run.job_id, reason)
        self.send(ProcessingCommand.PROCESSING_JOB_FAIL, FailProcessingJob(
            **run.held(reason=reason[:4000], retryable=retryable)), f"{run.prefix}:fail")

    def _discard(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.objects.delete(Area.PRODUCTS, key)
            except Exception as e:
                log.warning("could not remove %s of a stopped job: %s", key, e)

    # -- the kinds of jobs -----------------------------------------------------------------
    def _execute(self, run: _Run, workdir: Path, uploaded: list[str]) -> SucceedProcessingJob:
        kind = JobKind(run.job.kind)
        if kind is JobKind.INGEST:
            return self._ingest(run, workdir)
        if kind is JobKind.PROCESS:
            return self._process(run, workdir, uploaded)
        return self._catalog(run)

    def fetch_input(self, inp: dict[str, Any], workdir: Path, verify: bool = True) -> Path:
        """A local path holding the raw data file's bytes (see the module's docstring)."""
        key = inp["relative_path"]
        name = inp["name"]
        if self.objects.exists(Area.RAW, key):
            path = self.objects.local_path(Area.RAW, key) or self.objects.fetch_to(
                Area.RAW, key, workdir / "inputs" / f"{inp['file_id']}-{name}")
        else:
            root = self.settings.raw_data_dir.resolve()
            path = (root / key).resolve()
            if root not in path.parents or not path.is_file():
                raise JobFailed(f"raw data file {name}: {key} is neither in the object "
                                f"store's raw area nor below {root}")
            self.objects.put_file(Area.RAW, key, path)
        algo, value = inp["checksum_algorithm"], inp["checksum_value"]
        if verify and algo in HASHES and checksum_of(path, algo) != value.lower():
            raise JobFailed(f"raw data file {name}: its {algo} checksum differs from the "
                            f"recorded {value}")
        return path

    def _ingest(self, run: _Run, workdir: Path) -> SucceedProcessingJob:
        files = []
        inputs = run.job.inputs
        for n, inp in enumerate(inputs):
            if run.cancelled():
                raise JobStopped("cancel requested")
            with run.step(f"ingest {inp['name']}"):
                path = self.fetch_input(inp, workdir, verify=False)
                try:
                    report = ingest_fits(path, (inp["checksum_algorithm"],
                                                inp["checksum_value"]))
                except FitsRejected as e:
                    raise JobFailed(f"raw data file {inp['name']}: {e}") from e
            files.append(IngestedFile(file_id=UUID(inp["file_id"]), name=inp["name"],
                                      metadata=dict(report.metadata)))
            run.progress((n + 1) / len(inputs))
        return SucceedProcessingJob(**run.held(files=files, software=software_versions()))

    def _process(self, run: _Run, workdir: Path, uploaded: list[str]) -> SucceedProcessingJob:
        job = run.job
        try:
            algo = algorithm(job.algorithm or "", job.algorithm_version)
            params: BaseModel = algo.parameters(job.parameters)
        except DomainRejection as e:
            raise JobFailed(f"algorithm {job.algorithm} {job.algorithm_version}: {e}") from e
        inputs = []
        with run.step("fetch inputs"):
            for inp in job.inputs:
                if run.cancelled():
                    raise JobStopped("cancel requested")
                path = self.fetch_input(inp, workdir)
                inputs.append(AlgorithmInput(
                    file_id=UUID(inp["file_id"]), name=inp["name"], path=path,
                    size=int(inp["size"]),
                    checksum=(inp["checksum_algorithm"], inp["checksum_value"]),
                    file_type=inp.get("file_type"), metadata=dict(inp.get("metadata") or {})))
        software = software_versions()
        provenance = ProductProvenance(
            algorithm=algo.name, algorithm_version=algo.version,
            parameters=params.model_dump(mode="json"),
            inputs=input_records(inputs),
            software=software, job_id=str(job.id),
            run_id=None if job.run_id is None else str(job.run_id))
        out = workdir / "products"
        out.mkdir(parents=True, exist_ok=True)
        try:
            files: list[ProductFile] = algo.run(inputs, params, out, run, provenance)
        except DomainRejection as e:  # the inputs do not fit the algorithm
            raise JobFailed(e.message) from e
        if run.cancelled():
            raise JobStopped("cancel requested")
        products = []
        with run.step("upload products"):
            for f in files:
                key = f"{job.id}/{f.path.name}"
                stored = self.objects.put_file(Area.PRODUCTS, key, f.path, f.media_type)
                uploaded.append(key)
                products.append(ProductOutputFile(
                    kind=f.kind, name=f.path.name, area=Area.PRODUCTS.value, key=key,
                    uri=stored.uri, size=stored.size, sha256=stored.sha256,
                    media_type=f.media_type, metrics=dict(f.metrics),
                    inputs=[ProductInputUse(file_id=UUID(i.file_id), role=i.role,
                                            classified_from=(i.classified_from or "")[:255]
                                            or None)
                            for i in f.inputs if i.role]))
        run.progress(1.0)
        return SucceedProcessingJob(**run.held(products=products, software=software))

    def _catalog(self, run: _Run) -> SucceedProcessingJob:
        checked = []
        with run.step("check products"):
            for pid in run.job.product_ids:
                product = self.store.get(UUID(pid))
                if not isinstance(product, DataProduct):
                    raise JobFailed(f"data product {pid} not found")
                stored = self.objects.stat(Area(product.area), product.key)
                if stored is None:
                    raise JobFailed(f"data product {pid}: {product.key} is missing from the "
                                    "object store")
                if stored.size != product.size or stored.sha256 != product.sha256:
                    raise JobFailed(f"data product {pid}: {product.key} differs from what "
                                    "was built (size or sha256)")
                checked.append(UUID(pid))
        run.progress(1.0)
        return SucceedProcessingJob(**run.held(catalogued=checked,
                                               software=software_versions()))

    # -- operations ------------------------------------------------------------------------
    def wait_idle(self, timeout: float = 3600.0) -> str:
        """Until no job is claimable or running here (``obsledger worker --once``)."""
        deadline = time.monotonic() + timeout
        time.sleep(0.2)
        while time.monotonic() < deadline:
            waiting = any(e.status == "accepted" for e in self.commands.journal.unprojected(
                2**62, None, (ProcessingCommand.PROCESSING_JOB_REQUEST,)))
            if self.current is None and not waiting and not self.queries.active_count():
                break
            time.sleep(0.2)
        return f"processing worker idle; {self.jobs_done} jobs done"

    def report(self) -> dict[str, Any]:
        return {"running": self.running, "worker_id": self.worker_id,
                "current_job": self.current, "jobs_done": self.jobs_done,
                "last_error": self.last_error}
