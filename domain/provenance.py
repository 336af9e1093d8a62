"""Who asked for a change, through which command, and when it happened at the telescope."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

Apply = TypeVar("Apply", bound=Callable[..., None])


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


#: The provenance fields every event ends with, as eventsourcing reads them from a signature.
_PROVENANCE_PARAMETERS = tuple(
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=annotation)
    for name, annotation in (("actor", "str"), ("command_id", "str"),
                             ("correlation_id", "str"), ("observed_at", "datetime | None")))


def with_provenance(apply: Apply) -> Apply:
    """Declares the provenance fields (``Provenance.event_fields``) of the event that
    eventsourcing's ``@event`` makes from ``apply``: after the fields ``apply`` names, in the
    order events have always stored them. ``apply`` receives them in ``**provenance``."""
    signature = inspect.signature(apply)
    fields = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    cast(Any, apply).__signature__ = signature.replace(
        parameters=[*fields, *_PROVENANCE_PARAMETERS])
    return apply
