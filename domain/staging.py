"""Staging requests: a transfer agent copies complete raw data packages to a destination."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any
from uuid import UUID

from eventsourcing.domain import Aggregate, event

from domain.errors import IllegalTransition, InvalidCommand
from domain.provenance import Provenance, with_provenance
from domain.raw_data import PackageStatus, RawDataPackage
from domain.transitions import require_transition, transition_table


class StagingStatus(StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: Allowed moves. ``in_progress -> in_progress`` is a progress report.
_UNDER_WAY = {StagingStatus.IN_PROGRESS, StagingStatus.COMPLETED, StagingStatus.FAILED,
              StagingStatus.CANCELLED}
ALLOWED_TRANSITIONS = transition_table(StagingStatus, {
    StagingStatus.PENDING: _UNDER_WAY, StagingStatus.IN_PROGRESS: _UNDER_WAY})


class StagingRequest(Aggregate):
    """A request that complete packages be staged to a destination, and its progress."""

    @event("Requested")
    @with_provenance
    def __init__(
        self,
        id: UUID,
        package_ids: list[UUID],
        destination: str,
        bytes_total: int,
        files_total: int,
        **provenance: Any,
    ) -> None:
        self.package_ids = list(package_ids)
        self.destination = destination
        self.status = StagingStatus.PENDING.value
        self.bytes_total = bytes_total
        self.files_total = files_total
        self.bytes_transferred = 0
        self.files_transferred = 0
        self.message: str | None = None
        self.cancelled_from: str | None = None
        self.retries = 0

    @classmethod
    def request(
        cls,
        *,
        staging_id: UUID,
        packages: list[RawDataPackage],
        destination: str,
        provenance: Provenance,
    ) -> StagingRequest:
        for p in packages:
            if p.status != PackageStatus.COMPLETE.value:
                raise IllegalTransition(
                    f"raw data package {p.id} is {p.status}; only complete packages can be "
                    "staged",
                    field="package_ids",
                )
        return cls(
            id=staging_id,
            package_ids=[p.id for p in packages],
            destination=destination,
            bytes_total=sum(p.total_size for p in packages),
            files_total=sum(len(p.file_ids) for p in packages),
            **provenance.event_fields(),
        )

    def report_progress(
        self,
        status: str,
        bytes_transferred: int,
        files_transferred: int,
        message: str | None,
        provenance: Provenance,
    ) -> None:
        target = StagingStatus(status)
        self._require_transition(target)
        if target is StagingStatus.CANCELLED:
            raise InvalidCommand("use cancel to cancel a staging request", field="status")
        if bytes_transferred < self.bytes_transferred or files_transferred < self.files_transferred:
            raise InvalidCommand(
                "progress cannot go backwards "
                f"(bytes {self.bytes_transferred} -> {bytes_transferred}, "
                f"files {self.files_transferred} -> {files_transferred})",
                field="bytes_transferred",
            )
        if bytes_transferred > self.bytes_total or files_transferred > self.files_total:
            raise InvalidCommand(
                f"progress exceeds the request ({self.bytes_total} bytes, "
                f"{self.files_total} files)",
                field="bytes_transferred",
            )
        self._progress_reported(
            status=target.value,
            bytes_transferred=bytes_transferred,
            files_transferred=files_transferred,
            message=message,
            **provenance.event_fields(),
        )

    @event("ProgressReported")
    @with_provenance
    def _progress_reported(
        self,
        status: str,
        bytes_transferred: int,
        files_transferred: int,
        message: str | None,
        **provenance: Any,
    ) -> None:
        self.status = status
        self.bytes_transferred = bytes_transferred
        self.files_transferred = files_transferred
        self.message = message

    def retry(self, reason: str | None, provenance: Provenance) -> None:
        """Start a failed request again: pending, its progress back to zero (the transfer
        agent copies the packages anew). Only a failed request can be retried."""
        if self.status != StagingStatus.FAILED.value:
            raise IllegalTransition(
                f"staging request {self.id} is {self.status}; only a failed request can be "
                "retried", field="status")
        self._retried(reason=reason, attempt=self.retries + 1, **provenance.event_fields())

    @event("Retried")
    @with_provenance
    def _retried(
        self,
        reason: str | None,
        attempt: int,
        **provenance: Any,
    ) -> None:
        self.status = StagingStatus.PENDING.value
        self.bytes_transferred = 0
        self.files_transferred = 0
        self.message = reason
        self.retries = attempt

    def cancel(self, reason: str | None, provenance: Provenance) -> None:
        self._require_transition(StagingStatus.CANCELLED)
        self._cancelled(reason=reason, previous_status=self.status,
                        **provenance.event_fields())

    class Cancelled(Aggregate.Event):
        """Schema evolution example (``docs/EVENT_SCHEMA.md``): version 2 added
        ``previous_status``, the status the request was cancelled from. Events stored as
        version 1 (no ``class_version`` in their state) are upcast when read: they did not
        record it, so it is ``None``."""

        class_version = 2

        reason: str | None
        previous_status: str | None
        actor: str
        command_id: str
        correlation_id: str
        observed_at: datetime | None

        @staticmethod
        def upcast_v1_v2(state: dict[str, Any]) -> None:
            state["previous_status"] = None

    @event(Cancelled)
    def _cancelled(
        self,
        reason: str | None,
        previous_status: str | None,
        actor: str,
        command_id: str,
        correlation_id: str,
        observed_at: datetime | None,
    ) -> None:
        self.status = StagingStatus.CANCELLED.value
        self.message = reason
        self.cancelled_from = previous_status

    def _require_transition(self, target: StagingStatus) -> None:
        require_transition(ALLOWED_TRANSITIONS, StagingStatus(self.status), target,
                           f"staging request {self.id}")
