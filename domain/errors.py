"""Why the domain refuses a command. Each refusal carries a machine-readable code."""

from __future__ import annotations


class DomainRejection(Exception):
    """A command that the domain refuses; the command is rejected with this reason."""

    code = "rejected"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class TargetNotFound(DomainRejection):
    """The command refers to an entity the event store does not (yet) hold.

    The dispatcher retries such a command until a deadline, because the command creating the
    target may still be on its way (a finish that overtook its start).
    """

    code = "not_found"


class IllegalTransition(DomainRejection):
    """The entity's state does not allow the requested change (finishing twice, ...)."""

    code = "conflict"


class DuplicateEntity(DomainRejection):
    """An entity with the same identity already exists (file name per instrument, ...)."""

    code = "conflict"


class LimitExceeded(DomainRejection):
    """A configured limit would be exceeded (total size of a raw data package, ...)."""

    code = "limit_exceeded"


class InvalidCommand(DomainRejection):
    """The command is inconsistent with the recorded state (end before start, ...)."""

    code = "invalid"
