"""Executed observation units: one execution of a planned observation unit at the telescope."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import IllegalTransition
from domain.provenance import Provenance, utc, with_provenance
from domain.transitions import require_transition, transition_table


class ExecutionStatus(StrEnum):
    RUNNING = "running"
    SUCCESS = "success"
    FAILED = "failed"
    ABORTED = "aborted"


#: Which status an execution may move to from each status. Final statuses have no exits.
ALLOWED_TRANSITIONS = transition_table(ExecutionStatus, {
    ExecutionStatus.RUNNING: {ExecutionStatus.SUCCESS, ExecutionStatus.FAILED,
                              ExecutionStatus.ABORTED},
})


class ExecutedObsUnit(Aggregate):
    """An execution of a planned obs unit: started, then finished with an outcome."""

    @event("Started")
    @with_provenance
    def __init__(
        self,
        id: UUID,
        obs_unit_id: str,
        instrument: str,
        start_time: datetime,
        metadata: dict[str, Any],
        **provenance: Any,
    ) -> None:
        self.obs_unit_id = obs_unit_id
        self.instrument = instrument
        self.start_time = start_time
        self.end_time: datetime | None = None
        self.status = ExecutionStatus.RUNNING.value
        self.metadata = dict(metadata)
        self.started_by: str = provenance["actor"]
        self.finished_by: str | None = None

    @classmethod
    def start(
        cls,
        execution_id: UUID,
        obs_unit_id: str,
        instrument: str,
        start_time: datetime,
        metadata: dict[str, Any],
        provenance: Provenance,
    ) -> ExecutedObsUnit:
        return cls(
            id=execution_id,
            obs_unit_id=obs_unit_id,
            instrument=instrument,
            start_time=utc(start_time),
            metadata=metadata,
            **provenance.event_fields(),
        )

    def finish(
        self,
        status: str,
        end_time: datetime,
        metadata: dict[str, Any],
        provenance: Provenance,
    ) -> None:
        target = ExecutionStatus(status)
        require_transition(ALLOWED_TRANSITIONS, ExecutionStatus(self.status), target,
                           f"executed obs unit {self.id}")
        end_time = utc(end_time)
        if end_time < self.start_time:  # the request is well formed: it conflicts with the record
            raise IllegalTransition(
                f"end_time {end_time.isoformat()} is before start_time "
                f"{self.start_time.isoformat()}",
                field="end_time",
            )
        self._finished(
            status=target.value, end_time=end_time, metadata=metadata,
            **provenance.event_fields(),
        )

    @event("Finished")
    @with_provenance
    def _finished(
        self,
        status: str,
        end_time: datetime,
        metadata: dict[str, Any],
        **provenance: Any,
    ) -> None:
        self.status = status
        self.end_time = end_time
        self.metadata = {**self.metadata, **metadata}
        self.finished_by = provenance["actor"]
