"""Why a lookup made before anything is journaled refuses a request: an unknown entity, an
entity whose state does not allow it, input that is not valid, a store that does not
answer. Raised by the request-side lookups (``queries.processing_plans``,
``queries.data_products``); ``api/errors.py`` maps each to its HTTP answer in the documented
error format."""

from __future__ import annotations

from typing import Literal

#: A domain refusal's code (``domain.errors``: not_found, conflict, invalid), or
#: ``unavailable``: a store the request needs does not answer.
RefusalCode = Literal["not_found", "conflict", "invalid", "unavailable"]


class Refusal(Exception):
    """A refused request: ``detail`` says what was refused; ``field`` (with its ``message``,
    the ``detail`` when not given) names the part of the request at fault; a store that
    does not answer says when to retry (``retry_after_s``)."""

    def __init__(self, code: RefusalCode, detail: str, field: str | None = None,
                 message: str | None = None, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.field = field
        self.message = detail if message is None else message
        self.retry_after_s = retry_after_s
