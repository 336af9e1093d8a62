"""Why a lookup made before anything is journaled refuses a request: an unknown entity, an
entity whose state does not allow it, input that is not valid, a store that does not
answer. Raised by the request-side lookups (``queries.processing_plans``,
``queries.data_products``, ``queries.mast_search``); ``api/errors.py`` maps each to its HTTP
answer in the documented error format."""

from __future__ import annotations


class Refusal(Exception):
    """A refused request. ``code`` is a domain refusal's code (``domain.errors``), or
    ``unavailable``; ``detail`` says what was refused; ``field`` (with its ``message``, the
    ``detail`` when not given) names the part of the request at fault."""

    code = "rejected"

    def __init__(self, detail: str, field: str | None = None, message: str | None = None,
                 retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.message = detail if message is None else message
        self.retry_after_s = retry_after_s


class UnknownEntity(Refusal):
    """The request names an entity the ledger does not hold."""

    code = "not_found"


class StateConflict(Refusal):
    """The entity named is not in a state that allows the request."""

    code = "conflict"


class InvalidRequest(Refusal):
    """The request is well-formed but cannot be done as asked."""

    code = "invalid"


class PartUnavailable(Refusal):
    """A store the request needs does not answer; retry after ``retry_after_s``."""

    code = "unavailable"
