"""Observation results: one materialized leaf cell of an observation request, the durable,
instrument-agnostic deliverable of the observatory.

A result has two lifecycles:

- **fulfillment** — was the deliverable obtained? Dispatching creates a task (an execution
  attempt); the task's outcome moves the result through ``FULFILLMENT_TRANSITIONS``.
- **data products** — the reduced products built from it. Every contributing asset bumps
  ``assets_revision`` and marks the result dirty; once the debounce has passed, a processing
  run builds the revision it started from. A run that completes while newer assets arrived
  leaves the result ``STALE`` and still dirty; a failed run is retried with backoff.

Time is always passed in (``now``): the domain reads no clock, so tests of the debounce are
exact.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import IllegalTransition, InvalidCommand
from domain.provenance import Provenance, utc, with_provenance
from domain.transitions import require_transition, transition_table

#: Namespace of observation result ids: uuid5 of the leaf cell, so materializing is idempotent.
RESULT_NAMESPACE = UUID("6b0f3a52-2f4e-5b8e-9a57-0c1d0b7e4e21")


def observation_result_id(observation_id: int, request_id: int, epoch_index: int,
                          sample_index: int, copy_index: int) -> UUID:
    """The id of a leaf cell (observation, request, epoch, sample, copy)."""
    return uuid.uuid5(RESULT_NAMESPACE, f"{observation_id}/{request_id}/{epoch_index}/"
                                        f"{sample_index}/{copy_index}")


class CopiesMode(StrEnum):
    SINGLE = "single"
    ALL_ELIGIBLE = "all_eligible"
    COUNT = "count"


def copies_per_cell(mode: CopiesMode, copies: int, eligible_instruments: list[str],
                    ) -> list[str | None]:
    """The instrument of each copy of a cell (None: not fixed): ``single`` is one copy,
    ``count`` is ``copies`` copies, ``all_eligible`` one copy per eligible instrument."""
    if mode is CopiesMode.ALL_ELIGIBLE:
        return list(eligible_instruments)
    first = eligible_instruments[0] if eligible_instruments else None
    return [first] * (copies if mode is CopiesMode.COUNT else 1)


def leaf_cells(observation_id: int, request_id: int, epochs: int, samples: int,
               copies: list[str | None]) -> Iterator[tuple[UUID, int, int, int, str | None]]:
    """(result id, epoch, sample, copy, instrument) of every cell of a request spec."""
    for epoch in range(epochs):
        for sample in range(samples):
            for copy, instrument in enumerate(copies):
                yield (observation_result_id(observation_id, request_id, epoch, sample, copy),
                       epoch, sample, copy, instrument)


class Fulfillment(StrEnum):
    PENDING_DISPATCH = "pending_dispatch"
    DISPATCHED = "dispatched"
    PARTIALLY_FULFILLED = "partially_fulfilled"
    FULFILLED = "fulfilled"
    CANCELED = "canceled"


#: Which fulfillment status a result may move to from each status (final ones have no exit).
FULFILLMENT_TRANSITIONS = transition_table(Fulfillment, {
    Fulfillment.PENDING_DISPATCH: {Fulfillment.DISPATCHED, Fulfillment.CANCELED},
    Fulfillment.DISPATCHED: {Fulfillment.FULFILLED, Fulfillment.PARTIALLY_FULFILLED,
                             Fulfillment.PENDING_DISPATCH, Fulfillment.CANCELED},
    Fulfillment.PARTIALLY_FULFILLED: {Fulfillment.DISPATCHED, Fulfillment.FULFILLED,
                                      Fulfillment.CANCELED},
})


class TaskOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELED = "canceled"


#: Where a task's outcome takes the result. A failed or canceled attempt leaves it to be
#: dispatched again (a new attempt); a partial one keeps what was obtained.
OUTCOME_TARGET: dict[TaskOutcome, Fulfillment] = {
    TaskOutcome.SUCCEEDED: Fulfillment.FULFILLED,
    TaskOutcome.PARTIAL: Fulfillment.PARTIALLY_FULFILLED,
    TaskOutcome.FAILED: Fulfillment.PENDING_DISPATCH,
    TaskOutcome.CANCELED: Fulfillment.PENDING_DISPATCH,
}


class ProductStatus(StrEnum):
    PENDING = "PENDING"
    BUILDING = "BUILDING"
    READY = "READY"
    BLOCKED = "BLOCKED"
    FAILED = "FAILED"
    SKIPPED = "SKIPPED"
    STALE = "STALE"


class RunEnd(StrEnum):
    """How a processing run ends (``completed`` with outputs, or why not)."""

    COMPLETED = "completed"
    FAILED = "failed"
    BLOCKED = "blocked"  # missing prerequisites
    SKIPPED = "skipped"  # nothing to build


class ObservationResult(Aggregate):
    """One leaf cell of an observation request, its tasks and its processing runs."""

    @event("Materialized")
    @with_provenance
    def __init__(
        self,
        id: UUID,
        observation_id: int,
        request_id: int,
        epoch_index: int,
        sample_index: int,
        copy_index: int,
        instrument_id: str | None,
        copies_mode: str,
        not_before: datetime | None,
        spec_snapshot: dict[str, Any] | None,
        **provenance: Any,
    ) -> None:
        self.observation_id = observation_id
        self.request_id = request_id
        self.epoch_index = epoch_index
        self.sample_index = sample_index
        self.copy_index = copy_index
        self.instrument_id = instrument_id
        self.copies_mode = copies_mode
        self.not_before = not_before
        self.spec_snapshot = spec_snapshot
        self.fulfillment_status = Fulfillment.PENDING_DISPATCH.value
        self.fulfilled_on: datetime | None = None
        self.data_product_status = ProductStatus.PENDING.value
        self.assets_revision = 0
        self.dirty_from_revision: int | None = None
        self.next_eligible_run_at: datetime | None = None
        self.last_built_revision: int | None = None
        self.current_processing_run_id: UUID | None = None
        self.failed_runs = 0  # consecutive failed runs since the last success or new asset
        self.tasks: dict[str, dict[str, Any]] = {}  # task id → attempt, instrument, outcome…
        self.runs: dict[str, dict[str, Any]] = {}  # run id → revision, status, outputs…
        self.assets: set[str] = set()

    @classmethod
    def materialize(cls, observation_id: int, request_id: int, epoch_index: int,
                    sample_index: int, copy_index: int, instrument_id: str | None,
                    copies_mode: CopiesMode, not_before: datetime | None,
                    spec_snapshot: dict[str, Any] | None,
                    provenance: Provenance) -> ObservationResult:
        return cls(
            id=observation_result_id(observation_id, request_id, epoch_index, sample_index,
                                     copy_index),
            observation_id=observation_id, request_id=request_id, epoch_index=epoch_index,
            sample_index=sample_index, copy_index=copy_index, instrument_id=instrument_id,
            copies_mode=copies_mode.value,
            not_before=utc(not_before) if not_before else None,
            spec_snapshot=spec_snapshot, **provenance.event_fields())

    # -- reading ---------------------------------------------------------------------------
    @property
    def dirty(self) -> bool:
        return self.dirty_from_revision is not None

    @property
    def open_task_id(self) -> str | None:
        for task_id, task in self.tasks.items():
            if task["outcome"] is None:
                return task_id
        return None

    def due(self, now: datetime) -> bool:
        """Whether the scheduler should start a processing run now."""
        return (self.dirty and self.current_processing_run_id is None
                and self.data_product_status != ProductStatus.BLOCKED
                and self.next_eligible_run_at is not None and self.next_eligible_run_at <= now)

    # -- fulfillment -----------------------------------------------------------------------
    def _move(self, target: Fulfillment) -> None:
        require_transition(FULFILLMENT_TRANSITIONS, Fulfillment(self.fulfillment_status),
                           target, f"observation result {self.id}", field="fulfillment_status")

    def dispatch(self, task_id: UUID, instrument_id: str | None,
                 executed_obs_unit_id: UUID | None, now: datetime,
                 provenance: Provenance) -> None:
        """A new execution attempt (task) for this result."""
        self._move(Fulfillment.DISPATCHED)
        if self.open_task_id is not None:
            raise IllegalTransition(f"task {self.open_task_id} of observation result "
                                    f"{self.id} is still open", field="task_id")
        if str(task_id) in self.tasks:
            raise IllegalTransition(f"task {task_id} already exists", field="task_id")
        if self.not_before is not None and utc(now) < self.not_before:
            raise InvalidCommand(f"observation result {self.id} may not be dispatched before "
                                 f"{self.not_before.isoformat()}", field="not_before")
        self._dispatched(task_id=task_id, attempt=len(self.tasks) + 1,
                         instrument_id=instrument_id or self.instrument_id,
                         executed_obs_unit_id=executed_obs_unit_id, dispatched_at=utc(now),
                         **provenance.event_fields())

    @event("Dispatched")
    @with_provenance
    def _dispatched(self, task_id: UUID, attempt: int, instrument_id: str | None,
                    executed_obs_unit_id: UUID | None, dispatched_at: datetime,
                    **provenance: Any) -> None:
        self.tasks[str(task_id)] = {
            "attempt": attempt, "instrument_id": instrument_id,
            "executed_obs_unit_id": executed_obs_unit_id, "dispatched_at": dispatched_at,
            "outcome": None, "finished_at": None}
        self.fulfillment_status = Fulfillment.DISPATCHED.value

    def report_task(self, task_id: UUID, outcome: TaskOutcome, finished_at: datetime,
                    executed_obs_unit_id: UUID | None, provenance: Provenance) -> None:
        """The outcome of a task: drives the result through the fulfillment states."""
        task = self.tasks.get(str(task_id))
        if task is None:
            raise InvalidCommand(f"observation result {self.id} has no task {task_id}",
                                 field="task_id")
        if task["outcome"] is not None:
            raise IllegalTransition(f"task {task_id} already ended: {task['outcome']}",
                                    field="outcome")
        target = OUTCOME_TARGET[outcome]
        self._move(target)
        finished_at = utc(finished_at)
        self._task_ended(task_id=task_id, outcome=outcome.value, finished_at=finished_at,
                         executed_obs_unit_id=executed_obs_unit_id or
                         task["executed_obs_unit_id"], fulfillment_status=target.value,
                         fulfilled_on=finished_at if target is Fulfillment.FULFILLED else None,
                         **provenance.event_fields())

    @event("TaskEnded")
    @with_provenance
    def _task_ended(self, task_id: UUID, outcome: str, finished_at: datetime,
                    executed_obs_unit_id: UUID | None, fulfillment_status: str,
                    fulfilled_on: datetime | None, **provenance: Any) -> None:
        self.tasks[str(task_id)].update(outcome=outcome, finished_at=finished_at,
                                        executed_obs_unit_id=executed_obs_unit_id)
        self.fulfillment_status = fulfillment_status
        self.fulfilled_on = fulfilled_on

    def cancel(self, reason: str, now: datetime, provenance: Provenance) -> None:
        """Cancel from any non-final state; an open task is canceled with it."""
        self._move(Fulfillment.CANCELED)
        self._canceled(reason=reason, canceled_at=utc(now), task_id=self.open_task_id,
                       **provenance.event_fields())

    @event("Canceled")
    @with_provenance
    def _canceled(self, reason: str, canceled_at: datetime, task_id: str | None,
                  **provenance: Any) -> None:
        if task_id is not None:
            self.tasks[task_id].update(outcome=TaskOutcome.CANCELED.value,
                                       finished_at=canceled_at)
        self.fulfillment_status = Fulfillment.CANCELED.value

    # -- data products ---------------------------------------------------------------------
    def contribute_asset(self, asset_id: str, now: datetime, debounce: timedelta,
                         provenance: Provenance) -> bool:
        """An asset (raw data, a per-asset run) feeds the result; False if already counted."""
        if asset_id in self.assets:
            return False
        revision = self.assets_revision + 1
        status = ProductStatus(self.data_product_status)
        if status is not ProductStatus.BUILDING:  # a build in progress ends STALE instead
            status = (ProductStatus.STALE if self.last_built_revision is not None
                      else ProductStatus.PENDING)
        self._asset_contributed(
            asset_id=asset_id, revision=revision,
            dirty_from_revision=self.dirty_from_revision or revision,
            next_eligible_run_at=utc(now) + debounce, data_product_status=status.value,
            **provenance.event_fields())
        return True

    @event("AssetContributed")
    @with_provenance
    def _asset_contributed(self, asset_id: str, revision: int, dirty_from_revision: int,
                           next_eligible_run_at: datetime, data_product_status: str,
                           **provenance: Any) -> None:
        self.assets.add(asset_id)
        self.assets_revision = revision
        self.dirty_from_revision = dirty_from_revision
        self.next_eligible_run_at = next_eligible_run_at
        self.data_product_status = data_product_status
        self.failed_runs = 0

    def start_run(self, run_id: UUID, now: datetime, provenance: Provenance) -> None:
        """A processing run builds the current ``assets_revision``."""
        if self.current_processing_run_id is not None:
            raise IllegalTransition(f"run {self.current_processing_run_id} of observation "
                                    f"result {self.id} is in progress", field="run_id")
        if not self.dirty:
            raise IllegalTransition(f"observation result {self.id} has nothing new to build",
                                    field="run_id")
        if str(run_id) in self.runs:
            raise IllegalTransition(f"run {run_id} already exists", field="run_id")
        self._run_started(run_id=run_id, revision=self.assets_revision, started_at=utc(now),
                          **provenance.event_fields())

    @event("RunStarted")
    @with_provenance
    def _run_started(self, run_id: UUID, revision: int, started_at: datetime,
                     **provenance: Any) -> None:
        self.runs[str(run_id)] = {"revision": revision, "status": "running",
                                  "started_at": started_at, "finished_at": None,
                                  "outputs": [], "error": None}
        self.current_processing_run_id = run_id
        self.data_product_status = ProductStatus.BUILDING.value

    def end_run(self, run_id: UUID, end: RunEnd, outputs: list[dict[str, Any]],
                error: str | None, now: datetime, retry_limit: int, retry_base: timedelta,
                provenance: Provenance) -> None:
        """The current run ended: completed (with its outputs), failed, blocked or skipped.

        A failed run is retried after ``retry_base * 2**(n-1)`` for the n-th consecutive
        failure, up to ``retry_limit`` retries; then the result stays FAILED until an asset
        arrives.
        """
        if self.current_processing_run_id is None or str(run_id) != str(
                self.current_processing_run_id):
            raise IllegalTransition(f"run {run_id} is not the run in progress of observation "
                                    f"result {self.id}", field="run_id")
        if end is RunEnd.COMPLETED and error is not None:
            raise InvalidCommand("a completed run has no error", field="error")
        if end is not RunEnd.COMPLETED and outputs:
            raise InvalidCommand(f"a {end.value} run has no outputs", field="outputs")
        revision = self.runs[str(run_id)]["revision"]
        dirty_from, next_run = self.dirty_from_revision, self.next_eligible_run_at
        last_built, failed_runs = self.last_built_revision, self.failed_runs
        if end in (RunEnd.COMPLETED, RunEnd.SKIPPED):
            last_built, failed_runs = revision, 0
            if self.assets_revision == revision:
                dirty_from, next_run = None, None
                status = ProductStatus.READY if end is RunEnd.COMPLETED else ProductStatus.SKIPPED
            else:  # assets arrived during the build: dirty from the first one after it
                dirty_from, status = revision + 1, ProductStatus.STALE
        elif end is RunEnd.FAILED:
            next_run = (utc(now) + retry_base * 2 ** failed_runs if failed_runs < retry_limit
                        else None)
            failed_runs, status = failed_runs + 1, ProductStatus.FAILED
        else:  # blocked: waits for a new asset to become eligible again
            next_run, status = None, ProductStatus.BLOCKED
        self._run_ended(run_id=run_id, end=end.value, outputs=outputs, error=error,
                        finished_at=utc(now), data_product_status=status.value,
                        dirty_from_revision=dirty_from, next_eligible_run_at=next_run,
                        last_built_revision=last_built, failed_runs=failed_runs,
                        **provenance.event_fields())

    @event("RunEnded")
    @with_provenance
    def _run_ended(self, run_id: UUID, end: str, outputs: list[dict[str, Any]], error: str | None,
                   finished_at: datetime, data_product_status: str,
                   dirty_from_revision: int | None, next_eligible_run_at: datetime | None,
                   last_built_revision: int | None, failed_runs: int, **provenance: Any) -> None:
        self.runs[str(run_id)].update(status=end, finished_at=finished_at, outputs=outputs,
                                      error=error)
        self.current_processing_run_id = None
        self.data_product_status = data_product_status
        self.dirty_from_revision = dirty_from_revision
        self.next_eligible_run_at = next_eligible_run_at
        self.last_built_revision = last_built_revision
        self.failed_runs = failed_runs
