"""A Python client of the obsledger API for telescope scripts::

    from obsledger_client import ObsLedgerClient

    with ObsLedgerClient("http://obsledger:8000", token=TOKEN) as ledger:
        started = ledger.start_execution("OU-2026-0412", "HARPS", wait=True)

One method per command and query; an idempotency key per logical command, reused on every
retry; ``wait=`` and ``min_position=``; refusals raised as :class:`ObsLedgerError` carrying
the error format's fields. The tutorial: docs/TUTORIAL.md."""

from obsledger_client.client import CommandResult, ObsLedgerClient
from obsledger_client.errors import (
    BadRequest,
    Conflict,
    FieldError,
    Forbidden,
    NotFound,
    ObsLedgerError,
    ServiceUnreachable,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    ValidationFailed,
)

__all__ = ["BadRequest", "CommandResult", "Conflict", "FieldError", "Forbidden", "NotFound",
           "ObsLedgerClient", "ObsLedgerError", "ServiceUnreachable", "TooManyRequests",
           "Unauthorized", "Unavailable", "ValidationFailed"]
