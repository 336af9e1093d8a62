"""What the service refused, as exceptions carrying its error format's fields
(``{"detail", "status_code", "errors": [{"field", "message"}]}``, README "Errors")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem, named by the request field it is about (``files.3.size``)."""

    field: str
    message: str


class ObsLedgerError(Exception):
    """An answer of 400 or above: ``status_code``, ``detail``, ``errors`` (one per field),
    the ``command_id`` of a rejected command, and ``retry_after`` (seconds) when the service
    said when to try again."""

    def __init__(self, status_code: int, detail: str, errors: list[FieldError] | None = None,
                 *, command_id: str | None = None, retry_after: float | None = None,
                 body: Any = None) -> None:
        self.status_code = status_code
        self.detail = detail
        self.errors = errors or []
        self.command_id = command_id
        self.retry_after = retry_after
        self.body = body
        where = "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        super().__init__(f"{status_code} {detail}" + (f" ({where})" if where else ""))


class BadRequest(ObsLedgerError):
    """400: the body is not JSON."""


class Unauthorized(ObsLedgerError):
    """401: no token, or one that is expired, revoked or unknown."""


class Forbidden(ObsLedgerError):
    """403: the token lacks every role the endpoint accepts."""


class NotFound(ObsLedgerError):
    """404: the entity does not exist (yet)."""


class Conflict(ObsLedgerError):
    """409: not allowed in the entity's state, a name taken, or an idempotency key reused
    with another body."""


class ValidationFailed(ObsLedgerError):
    """422: the request breaks a rule; ``errors`` names the fields."""


class TooManyRequests(ObsLedgerError):
    """429: too many failed logins."""


class Unavailable(ObsLedgerError):
    """503 (after the client's retries): a store does not answer. Commands are still
    acknowledged while the event store is down; this is what the rest answers."""


class ServiceUnreachable(ObsLedgerError):
    """No answer at all (after the client's retries): refused, timed out, reset. ``status_code``
    is 0."""


_BY_STATUS: dict[int, type[ObsLedgerError]] = {
    400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
    422: ValidationFailed, 429: TooManyRequests, 503: Unavailable}


def error_from(status_code: int, body: Any, retry_after: float | None) -> ObsLedgerError:
    """The exception for an error answer (its JSON ``body``, or text when it was not JSON)."""
    detail = str(body)
    errors: list[FieldError] = []
    command_id = None
    if isinstance(body, dict):
        detail = str(body.get("detail") or "")
        errors = [FieldError(str(e.get("field", "")), str(e.get("message", "")))
                  for e in body.get("errors") or [] if isinstance(e, dict)]
        command_id = body.get("command_id")
    kind = _BY_STATUS.get(status_code, ObsLedgerError)
    return kind(status_code, detail, errors, command_id=command_id, retry_after=retry_after,
                body=body)
