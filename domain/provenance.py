"""Who asked for a change, through which command, and when it happened at the telescope."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any


def utc(value: datetime) -> datetime:
    """Return ``value`` as a timezone-aware UTC datetime (naive values are taken as UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Provenance:
    """Carried by every event: the actor, the command and correlation ids, observation time."""

    actor: str
    command_id: str
    correlation_id: str
    observed_at: datetime | None = None

    def event_fields(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "command_id": self.command_id,
            "correlation_id": self.correlation_id,
            "observed_at": self.observed_at,
        }
