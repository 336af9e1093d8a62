"""Processing jobs and the data products they build, as event-sourced aggregates.

A ``ProcessingJob`` is work a worker process does: ``ingest`` (validate raw FITS inputs and
record their header facts), ``process`` (run an algorithm over raw data files and build data
products) or ``catalog`` (make built products queryable, published or archived). Its status
moves along ``JOB_TRANSITIONS``::

    requested ──claim──▶ running ──succeed──▶ succeeded
        ▲                  │ ├──fail (final, or attempts used up)──▶ failed
        └─lease expired────┘ └──cancel requested … cancelled──────▶ cancelled
          / retryable failure

A worker holds a job through a **lease** (worker id, attempt, ``expires_at``) that it renews
while it runs. Another worker may claim the job only once the lease has expired: the claim
records ``LeaseExpired`` and then a new ``LeaseAcquired`` (the attempt counted), so a killed
worker's job is taken over, never stuck in ``running``. A job whose attempts are used up fails
with the reason. Reports (steps, progress, success, failure) are accepted only from the lease
holder's attempt: a worker that lost its lease cannot overwrite its successor's work.

Cancel is cooperative: ``request_cancel`` of a requested job cancels it at once; of a running
job it records ``CancelRequested``, which the worker sees between steps or chunks and confirms
with ``confirm_cancel``. A job with a cancel requested cannot succeed, so the outputs of a
cancelled job never become data products.

A ``DataProduct`` is one output of a succeeded process job (its object in the store, size,
sha256, metrics, and the lineage facts: inputs with checksums, algorithm and version,
parameters, software versions). It is ``built`` until a catalog (a catalog job, or a process
job requested with ``catalog``) makes it ``catalogued``, ``published`` or ``archived``.

Time is passed in (``now``): the domain reads no clock.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.errors import IllegalTransition, InvalidCommand
from domain.provenance import Provenance, utc, with_provenance
from domain.transitions import require_transition, transition_table

#: Namespace of the process job a results scheduler's processing run creates.
RUN_JOB_NAMESPACE = UUID("5d0b6a2e-3c41-4f7a-9e2b-7a1c0e9f4b31")
DEFAULT_MAX_ATTEMPTS = 3


def job_id_of_run(run_id: UUID) -> UUID:
    """The id of the process job that builds a processing run's products (idempotent)."""
    return uuid5(RUN_JOB_NAMESPACE, str(run_id))


def data_product_id(job_id: UUID, kind: str) -> UUID:
    """The id of the product of ``kind`` a job built (one per kind and job)."""
    return uuid5(job_id, f"product/{kind}")


class JobKind(StrEnum):
    INGEST = "ingest"
    PROCESS = "process"
    CATALOG = "catalog"


class JobStatus(StrEnum):
    REQUESTED = "requested"  # waiting for a worker (again, after an expired lease)
    RUNNING = "running"  # a worker holds the lease
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

#: Which status a job may move to from each status (the final ones have no exit).
JOB_TRANSITIONS = transition_table(JobStatus, {
    JobStatus.REQUESTED: {JobStatus.RUNNING, JobStatus.FAILED, JobStatus.CANCELLED},
    JobStatus.RUNNING: {JobStatus.REQUESTED, JobStatus.SUCCEEDED, JobStatus.FAILED,
                        JobStatus.CANCELLED},
})


class ProcessingJob(Aggregate):
    """One job: what it works on, who holds it (the lease), its steps, progress, outputs."""

    class Requested(Aggregate.Created):
        """Version 2 added ``metadata``: what a catalog job records on its products
        (``docs/EVENT_SCHEMA.md``). Jobs requested before could not carry any: ``{}``."""

        class_version = 2

        kind: str
        inputs: list[dict[str, Any]]
        product_ids: list[str]
        algorithm: str | None
        algorithm_version: str | None
        parameters: dict[str, Any]
        result_id: UUID | None
        run_id: UUID | None
        catalog: bool
        publish: bool
        archive: bool
        max_attempts: int
        requested_at: datetime
        actor: str
        command_id: str
        correlation_id: str
        observed_at: datetime | None
        metadata: dict[str, Any]

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["metadata"] = {}

    @event(Requested)
    def __init__(
        self,
        id: UUID,
        kind: str,
        inputs: list[dict[str, Any]],
        product_ids: list[str],
        algorithm: str | None,
        algorithm_version: str | None,
        parameters: dict[str, Any],
        result_id: UUID | None,
        run_id: UUID | None,
        catalog: bool,
        publish: bool,
        archive: bool,
        max_attempts: int,
        requested_at: datetime,
        actor: str,
        command_id: str,
        correlation_id: str,
        observed_at: datetime | None,
        metadata: dict[str, Any],
    ) -> None:
        self.kind = kind
        self.metadata = metadata
        self.inputs = inputs
        self.product_ids = product_ids
        self.algorithm = algorithm
        self.algorithm_version = algorithm_version
        self.parameters = parameters
        self.result_id = result_id
        self.run_id = run_id
        self.catalog = catalog
        self.publish = publish
        self.archive = archive
        self.max_attempts = max_attempts
        self.requested_at = requested_at
        self.status = JobStatus.REQUESTED.value
        self.attempts = 0
        self.lease_worker: str | None = None
        self.lease_expires_at: datetime | None = None
        self.cancel_requested = False
        self.steps: list[dict[str, Any]] = []
        self.progress = 0.0
        self.outputs: list[dict[str, Any]] = []
        self.software: dict[str, str] = {}
        self.reason: str | None = None
        self.finished_at: datetime | None = None
        self.requested_by = actor
        self.completed_by: str | None = None

    @classmethod
    def request(cls, job_id: UUID, kind: JobKind, inputs: list[dict[str, Any]],
                product_ids: list[UUID], algorithm: str | None, algorithm_version: str | None,
                parameters: dict[str, Any], result_id: UUID | None, run_id: UUID | None,
                catalog: bool, publish: bool, archive: bool, max_attempts: int, now: datetime,
                provenance: Provenance, metadata: dict[str, Any] | None = None,
                ) -> ProcessingJob:
        if kind is JobKind.CATALOG:
            if not product_ids:
                raise InvalidCommand("a catalog job needs at least one product",
                                     field="product_ids")
            if inputs:
                raise InvalidCommand("a catalog job works on products, not raw data files",
                                     field="file_ids")
        elif not inputs:
            raise InvalidCommand(f"an {kind.value} job needs at least one raw data file"
                                 if kind is JobKind.INGEST else
                                 "a process job needs at least one raw data file",
                                 field="file_ids")
        if kind is JobKind.PROCESS and (not algorithm or not algorithm_version):
            raise InvalidCommand("a process job names its algorithm and version",
                                 field="algorithm")
        ids = [i["file_id"] for i in inputs]
        if len(set(ids)) != len(ids):
            raise InvalidCommand("a raw data file is named twice", field="file_ids")
        if len(set(product_ids)) != len(product_ids):
            raise InvalidCommand("a product is named twice", field="product_ids")
        if max_attempts < 1:
            raise InvalidCommand("max_attempts must be at least 1", field="max_attempts")
        return cls(id=job_id, kind=kind.value, inputs=inputs,
                   product_ids=[str(p) for p in product_ids], algorithm=algorithm,
                   algorithm_version=algorithm_version, parameters=parameters,
                   result_id=result_id, run_id=run_id, catalog=catalog, publish=publish,
                   archive=archive, max_attempts=max_attempts, requested_at=utc(now),
                   metadata=dict(metadata or {}), **provenance.event_fields())

    # -- reading ---------------------------------------------------------------------------
    @property
    def final(self) -> bool:
        return JobStatus(self.status) in FINAL

    def lease_live(self, now: datetime) -> bool:
        return (self.status == JobStatus.RUNNING and self.lease_expires_at is not None
                and self.lease_expires_at > utc(now))

    def held_by(self, worker: str, attempt: int) -> bool:
        return (self.status == JobStatus.RUNNING and self.lease_worker == worker
                and self.attempts == attempt)

    def _move(self, target: JobStatus) -> None:
        require_transition(JOB_TRANSITIONS, JobStatus(self.status), target,
                           f"processing job {self.id}")

    def _holder(self, worker: str, attempt: int) -> None:
        if not self.held_by(worker, attempt):
            holder = (f"attempt {self.attempts} of {self.lease_worker}"
                      if self.status == JobStatus.RUNNING else "no worker")
            raise IllegalTransition(
                f"processing job {self.id} is {self.status}, held by {holder}; attempt "
                f"{attempt} of {worker} no longer holds it", field="worker")

    # -- leases ----------------------------------------------------------------------------
    def claim(self, worker: str, lease_for: timedelta, now: datetime,
              provenance: Provenance) -> None:
        """A worker takes the job: a requested one, or a running one whose lease expired.

        Refused while another lease is live. An expired lease is recorded first; a job with
        a cancel requested is then cancelled, and one whose attempts are used up fails."""
        now = utc(now)
        if self.final:
            raise IllegalTransition(f"processing job {self.id} is {self.status}",
                                    field="status")
        if self.lease_live(now):
            raise IllegalTransition(
                f"processing job {self.id} is leased to {self.lease_worker} until "
                f"{self.lease_expires_at.isoformat() if self.lease_expires_at else '?'}",
                field="worker")
        if self.status == JobStatus.RUNNING:
            self._lease_expired(worker=self.lease_worker or "", attempt=self.attempts,
                                expired_at=now, **provenance.event_fields())
        if self.cancel_requested:
            self._cancelled(reason=self.reason or "cancelled before a worker resumed it",
                            cancelled_at=now, **provenance.event_fields())
            return
        if self.attempts >= self.max_attempts:
            self._failed(reason=f"gave up after {self.attempts} attempts: the last worker's "
                         "lease expired", retryable=False, failed_at=now,
                         **provenance.event_fields())
            return
        self._lease_acquired(worker=worker, attempt=self.attempts + 1,
                             expires_at=now + lease_for, acquired_at=now,
                             **provenance.event_fields())

    @event("LeaseExpired")
    @with_provenance
    def _lease_expired(self, worker: str, attempt: int, expired_at: datetime,
                       **provenance: Any) -> None:
        self.status = JobStatus.REQUESTED.value
        self.lease_worker = None
        self.lease_expires_at = None
        self._interrupt_steps()  # a step the dead worker had begun is begun again

    @event("LeaseAcquired")
    @with_provenance
    def _lease_acquired(self, worker: str, attempt: int, expires_at: datetime,
                        acquired_at: datetime, **provenance: Any) -> None:
        self.status = JobStatus.RUNNING.value
        self.attempts = attempt
        self.lease_worker = worker
        self.lease_expires_at = expires_at
        self.reason = None

    def renew(self, worker: str, attempt: int, lease_for: timedelta, now: datetime,
              provenance: Provenance) -> None:
        """The holder extends its lease (also after expiry, as long as nobody took over)."""
        self._holder(worker, attempt)
        self._lease_renewed(worker=worker, attempt=attempt, expires_at=utc(now) + lease_for,
                            **provenance.event_fields())

    @event("LeaseRenewed")
    @with_provenance
    def _lease_renewed(self, worker: str, attempt: int, expires_at: datetime,
                       **provenance: Any) -> None:
        self.lease_expires_at = expires_at

    # -- the worker's reports --------------------------------------------------------------
    def start_step(self, worker: str, attempt: int, name: str, now: datetime,
                   provenance: Provenance) -> None:
        self._holder(worker, attempt)
        self._step_started(name=name, attempt=attempt, started_at=utc(now),
                           **provenance.event_fields())

    @event("StepStarted")
    @with_provenance
    def _step_started(self, name: str, attempt: int, started_at: datetime,
                      **provenance: Any) -> None:
        self.steps.append({"name": name, "attempt": attempt, "status": "running",
                           "started_at": started_at, "completed_at": None})

    def complete_step(self, worker: str, attempt: int, name: str, now: datetime,
                      provenance: Provenance) -> None:
        self._holder(worker, attempt)
        step = self._running_step(name, attempt)
        self._step_completed(name=name, attempt=attempt, completed_at=utc(now),
                             duration_s=round((utc(now) - step["started_at"]).total_seconds(),
                                              6), **provenance.event_fields())

    def _running_step(self, name: str, attempt: int) -> dict[str, Any]:
        for step in reversed(self.steps):
            if step["name"] == name and step["attempt"] == attempt and \
                    step["status"] == "running":
                return step
        raise IllegalTransition(f"step {name!r} of processing job {self.id} has not started",
                                field="name")

    @event("StepCompleted")
    @with_provenance
    def _step_completed(self, name: str, attempt: int, completed_at: datetime, duration_s: float,
                        **provenance: Any) -> None:
        step = self._running_step(name, attempt)
        step.update(status="completed", completed_at=completed_at)

    def report_progress(self, worker: str, attempt: int, fraction: float, now: datetime,
                        provenance: Provenance) -> None:
        self._holder(worker, attempt)
        if not 0.0 <= fraction <= 1.0:
            raise InvalidCommand("progress is a fraction between 0 and 1", field="fraction")
        self._progressed(fraction=fraction, at=utc(now), **provenance.event_fields())

    @event("Progressed")
    @with_provenance
    def _progressed(self, fraction: float, at: datetime, **provenance: Any) -> None:
        self.progress = fraction

    def succeed(self, worker: str, attempt: int, outputs: list[dict[str, Any]],
                software: dict[str, str], now: datetime, provenance: Provenance) -> None:
        """The job is done; for a process job ``outputs`` are its products (kind, key, size,
        sha256, media type, metrics). Refused once a cancel is requested."""
        self._holder(worker, attempt)
        if self.cancel_requested:
            raise IllegalTransition(f"processing job {self.id} has a cancel requested; it "
                                    "cannot succeed", field="status")
        if self.kind == JobKind.PROCESS and not outputs:
            raise InvalidCommand("a process job succeeds with at least one product",
                                 field="outputs")
        kinds = [o["kind"] for o in outputs if "kind" in o]
        if len(set(kinds)) != len(kinds):
            raise InvalidCommand("two outputs of the same kind", field="outputs")
        self._move(JobStatus.SUCCEEDED)
        self._succeeded(outputs=outputs, software=software, worker=worker, attempt=attempt,
                        finished_at=utc(now), **provenance.event_fields())

    @event("Succeeded")
    @with_provenance
    def _succeeded(self, outputs: list[dict[str, Any]], software: dict[str, str], worker: str,
                   attempt: int, finished_at: datetime, **provenance: Any) -> None:
        self.status = JobStatus.SUCCEEDED.value
        self.completed_by = worker
        self.outputs = outputs
        self.software = software
        self.progress = 1.0
        self.finished_at = finished_at
        self.lease_worker = None
        self.lease_expires_at = None

    def fail(self, worker: str, attempt: int, reason: str, retryable: bool, now: datetime,
             provenance: Provenance) -> None:
        """The attempt failed: a retryable failure with attempts left puts the job back to
        ``requested`` (``Released``); otherwise the job fails with ``reason``."""
        self._holder(worker, attempt)
        if retryable and self.attempts < self.max_attempts and not self.cancel_requested:
            self._released(worker=worker, attempt=attempt, reason=reason,
                           released_at=utc(now), **provenance.event_fields())
            return
        self._move(JobStatus.FAILED)
        self._failed(reason=reason, retryable=retryable, failed_at=utc(now),
                     **provenance.event_fields())

    @event("Released")
    @with_provenance
    def _released(self, worker: str, attempt: int, reason: str, released_at: datetime,
                  **provenance: Any) -> None:
        self.status = JobStatus.REQUESTED.value
        self.lease_worker = None
        self.lease_expires_at = None
        self.reason = reason
        self._interrupt_steps()

    @event("Failed")
    @with_provenance
    def _failed(self, reason: str, retryable: bool, failed_at: datetime,
                **provenance: Any) -> None:
        self.status = JobStatus.FAILED.value
        self.reason = reason
        self.finished_at = failed_at
        self.lease_worker = None
        self.lease_expires_at = None
        self._interrupt_steps()

    def _interrupt_steps(self) -> None:
        """The attempt ended without finishing its running step."""
        for step in self.steps:
            if step["status"] == "running":
                step["status"] = "interrupted"

    # -- cancel ----------------------------------------------------------------------------
    def request_cancel(self, reason: str | None, now: datetime,
                       provenance: Provenance) -> None:
        """People cancel: a job no worker holds is cancelled now, a running one when its
        worker next looks (between steps or chunks)."""
        if self.final:
            raise IllegalTransition(f"processing job {self.id} is {self.status}; it cannot be "
                                    "cancelled", field="status")
        if self.cancel_requested:
            raise IllegalTransition(f"a cancel of processing job {self.id} is already "
                                    "requested", field="status")
        reason = reason or "cancelled"
        self._cancel_requested(reason=reason, requested_at=utc(now),
                               **provenance.event_fields())
        if self.status == JobStatus.REQUESTED:
            self._cancelled(reason=reason, cancelled_at=utc(now), **provenance.event_fields())

    @event("CancelRequested")
    @with_provenance
    def _cancel_requested(self, reason: str, requested_at: datetime, **provenance: Any) -> None:
        self.cancel_requested = True
        self.reason = reason

    def confirm_cancel(self, worker: str, attempt: int, now: datetime,
                       provenance: Provenance) -> None:
        """The worker stopped between steps or chunks; what it built is discarded."""
        self._holder(worker, attempt)
        if not self.cancel_requested:
            raise IllegalTransition(f"no cancel of processing job {self.id} was requested",
                                    field="status")
        self._cancelled(reason=self.reason or "cancelled", cancelled_at=utc(now),
                        **provenance.event_fields())

    @event("Cancelled")
    @with_provenance
    def _cancelled(self, reason: str, cancelled_at: datetime, **provenance: Any) -> None:
        self.status = JobStatus.CANCELLED.value
        self.reason = reason
        self.finished_at = cancelled_at
        self.lease_worker = None
        self.lease_expires_at = None
        self._interrupt_steps()


def _inputs_as_used(inputs: list[dict[str, Any]], uses: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """The job's inputs, each with the ``role`` the algorithm gave it for the product (bias,
    dark, flat, science) and what said so (``classified_from``) — None where it said
    nothing."""
    by_file = {str(u["file_id"]): u for u in uses}
    return [{**i, "role": by_file.get(str(i["file_id"]), {}).get("role"),
             "classified_from": by_file.get(str(i["file_id"]), {}).get("classified_from")}
            for i in inputs]


class ProductStatus(StrEnum):
    BUILT = "built"
    CATALOGUED = "catalogued"
    PUBLISHED = "published"
    ARCHIVED = "archived"


class DataProduct(Aggregate):
    """One product a process job built, with what is needed to trace it to its raw bytes."""

    @event("Built")
    @with_provenance
    def __init__(
        self,
        id: UUID,
        job_id: UUID,
        kind: str,
        name: str,
        area: str,
        key: str,
        uri: str | None,
        size: int,
        sha256: str,
        media_type: str,
        metrics: dict[str, Any],
        algorithm: str,
        algorithm_version: str,
        parameters: dict[str, Any],
        software: dict[str, str],
        inputs: list[dict[str, Any]],
        result_id: UUID | None,
        run_id: UUID | None,
        built_at: datetime,
        **provenance: Any,
    ) -> None:
        self.job_id = job_id
        self.kind = kind
        self.name = name
        self.area = area
        self.key = key
        self.uri = uri
        self.size = size
        self.sha256 = sha256
        self.media_type = media_type
        self.metrics = metrics
        self.algorithm = algorithm
        self.algorithm_version = algorithm_version
        self.parameters = parameters
        self.software = software
        self.inputs = inputs
        self.result_id = result_id
        self.run_id = run_id
        self.status = ProductStatus.BUILT.value
        self.published = False
        self.archived = False
        self.metadata: dict[str, Any] = {}

    @classmethod
    def build(cls, job: ProcessingJob, output: dict[str, Any], now: datetime,
              provenance: Provenance) -> DataProduct:
        if job.status != JobStatus.SUCCEEDED or job.kind != JobKind.PROCESS:
            raise IllegalTransition(f"processing job {job.id} is a {job.kind} job, "
                                    f"{job.status}; it built no products", field="status")
        return cls(id=data_product_id(job.id, output["kind"]), job_id=job.id,
                   kind=output["kind"], name=output["name"], area=output["area"],
                   key=output["key"], uri=output.get("uri"), size=int(output["size"]),
                   sha256=output["sha256"], media_type=output["media_type"],
                   metrics=dict(output.get("metrics") or {}),
                   algorithm=job.algorithm or "", algorithm_version=job.algorithm_version or "",
                   parameters=job.parameters, software=job.software,
                   inputs=_inputs_as_used(job.inputs, output.get("inputs") or []),
                   result_id=job.result_id, run_id=job.run_id, built_at=utc(now),
                   **provenance.event_fields())

    def catalog(self, job_id: UUID, publish: bool, archive: bool, now: datetime,
                provenance: Provenance, metadata: dict[str, Any] | None = None) -> None:
        """Make the product queryable (published, archived as asked); ``metadata`` (the
        catalog job's) joins the product's, a key given again taking the new value."""
        status = (ProductStatus.ARCHIVED if archive else ProductStatus.PUBLISHED if publish
                  else ProductStatus.CATALOGUED)
        self._catalogued(job_id=job_id, status=status.value, published=publish or self.published,
                         archived=archive or self.archived, catalogued_at=utc(now),
                         metadata={**self.metadata, **(metadata or {})},
                         **provenance.event_fields())

    class Catalogued(Aggregate.Event):
        """Version 2 added ``metadata``: the product's catalog metadata from this event on
        (``docs/EVENT_SCHEMA.md``). Products catalogued before had none: ``{}``."""

        class_version = 2

        job_id: UUID
        status: str
        published: bool
        archived: bool
        catalogued_at: datetime
        metadata: dict[str, Any]
        actor: str
        command_id: str
        correlation_id: str
        observed_at: datetime | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["metadata"] = {}

    @event(Catalogued)
    def _catalogued(self, job_id: UUID, status: str, published: bool, archived: bool,
                    catalogued_at: datetime, metadata: dict[str, Any], actor: str,
                    command_id: str, correlation_id: str, observed_at: datetime | None) -> None:
        self.status = status
        self.published = published
        self.archived = archived
        self.metadata = metadata
