"""One error format for every 4xx/5xx answer (see docs/ARCHITECTURE.md):

``{"detail": "...", "status_code": 422, "errors": [{"field": "files.3.size", "message": "..."}]}``
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from domain.errors import DomainRejection
from infra.availability import (
    EVENT_STORE,
    LABELS,
    READ_MODEL_DB,
    UNAVAILABLE_ERRORS,
    end_request,
    note_unavailable,
    short_error,
    track_request,
    unavailable_part,
)
from infra.event_store import StoreUnavailable
from infra.mast_archive import ArchiveError
from infra.read_model_db import ReadModelsUnavailable
from queries.refusals import Refusal

log = logging.getLogger("obsledger.api")

#: Retry-After of a 503 while a store does not answer (seconds).
RETRY_AFTER_S = "2"
#: The header of an answer given without the read models (from the journal alone, or 503).
READ_MODELS_HEADER = "X-Read-Models"
#: ``Retry-After`` as documented on the answers that may send it (503, 429).
RETRY_AFTER_DOC: dict[str, Any] = {"description": "Seconds to wait before retrying.",
                                   "schema": {"type": "integer", "minimum": 0}}
_READ_MODELS_UNAVAILABLE = (READ_MODELS_HEADER.lower().encode(), b"unavailable")

#: HTTP status for each domain refusal code.
STATUS_OF_CODE = {
    "not_found": 404,
    "conflict": 409,
    "idempotency_conflict": 409,
    "limit_exceeded": 422,
    "invalid": 422,
    "internal": 422,
    "rejected": 422,
}
#: HTTP status for each refusal of a lookup made before journaling (``queries.refusals``).
STATUS_OF_REFUSAL = {**STATUS_OF_CODE, "unavailable": 503}
#: The ``detail`` of a MAST archive error, by its status.
ARCHIVE_DETAIL = {404: "Unknown target", 422: "Validation failed"}


class ORJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class FieldError(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    detail: str
    status_code: int
    errors: list[FieldError] = []

    model_config = {"json_schema_extra": {"examples": [{
        "detail": "Validation failed", "status_code": 422,
        "errors": [{"field": "files.3.size", "message": "Input should be greater than or "
                    "equal to 0"}]}]}}


def error_doc(description: str, retry_after: bool = False) -> dict[str, Any]:
    """A documented error answer (a route's ``responses``): the error format, and
    ``Retry-After`` when the answer tells the client when to retry."""
    doc: dict[str, Any] = {"model": ErrorResponse, "description": description}
    if retry_after:
        doc["headers"] = {"Retry-After": RETRY_AFTER_DOC}
    return doc


def error_response(status: int, detail: str, errors: list[dict[str, str]] | None = None,
                   headers: Mapping[str, str] | None = None) -> ORJSONResponse:
    return ORJSONResponse(
        {"detail": detail, "status_code": status, "errors": errors or []},
        status_code=status, headers=headers,
    )


def method_not_allowed(methods: Iterable[str]) -> ORJSONResponse:
    """405 with ``Allow`` listing ``methods``."""
    allow = ", ".join(sorted(methods))
    return error_response(405, "Method Not Allowed", [
        {"field": "method", "message": f"this path answers {allow}"}], headers={"Allow": allow})


class ApiError(Exception):
    def __init__(self, status: int, detail: str, errors: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors or []
        self.headers = headers


_NUMBER = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)\s*$")


def _iso_time(v: Any) -> Any:
    if isinstance(v, str) and _NUMBER.match(v):  # pydantic would read it as a Unix time
        raise ValueError("an ISO 8601 date-time, e.g. 2026-11-21T23:00:00Z")
    return v


QueryTime = Annotated[datetime, BeforeValidator(_iso_time)]
"""A date-time query parameter: ISO 8601 only (as documented), naive means UTC."""


def as_utc(v: datetime | None) -> datetime | None:
    """A query parameter's time in UTC (naive means UTC). A time before the first or after
    the last one UTC can hold (0001-01-01T00:00:00+01:00) is that first or last time: as a
    bound of a filter it selects the same."""
    if v is None:
        return None
    try:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
    except OverflowError:
        return (datetime.min if v.year == 1 else datetime.max).replace(tzinfo=UTC)


def _field(loc: tuple[Any, ...]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if parts[0] == "body" else parts
    return ".".join(str(p) for p in parts) or "body"


def field_errors(errors: Sequence[Any]) -> list[dict[str, str]]:
    """pydantic's (or FastAPI's) validation errors as the error format's ``errors``: the
    field each names (with the path inside it of unstorable input) and the message."""
    out = []
    for e in errors:
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        field = _field(tuple(e.get("loc", ())))
        ctx = e.get("ctx") or {}
        if e.get("type") == "unstorable":  # commands.models.unstorable_error
            inner, msg = str(ctx["field"]), str(ctx["message"])
            field = inner if field == "body" else f"{field}.{inner}"
        out.append({"field": field, "message": msg})
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> ORJSONResponse:
        errors = []
        malformed = False
        for e in exc.errors():
            if e.get("type") == "json_invalid":
                malformed = True
                errors.append({"field": "body", "message": f"malformed JSON: {e.get('msg')}"})
                continue
            errors.extend(field_errors([e]))
        if malformed:
            return error_response(400, "Malformed JSON", errors)
        return error_response(422, "Validation failed", errors)

    @app.exception_handler(DomainRejection)
    async def _domain(_: Request, exc: DomainRejection) -> ORJSONResponse:
        errors = [{"field": exc.field, "message": exc.message}] if exc.field else []
        return error_response(STATUS_OF_CODE.get(exc.code, 422), exc.message, errors)

    @app.exception_handler(ApiError)
    async def _api(_: Request, exc: ApiError) -> ORJSONResponse:
        return error_response(exc.status, exc.detail, exc.errors, headers=exc.headers)

    @app.exception_handler(Refusal)
    async def _refusal(_: Request, exc: Refusal) -> ORJSONResponse:
        errors = [{"field": exc.field, "message": exc.message}] if exc.field else []
        headers = None if exc.retry_after_s is None else {
            "Retry-After": str(exc.retry_after_s)}
        return error_response(STATUS_OF_REFUSAL.get(exc.code, 422), exc.detail, errors,
                              headers=headers)

    @app.exception_handler(ArchiveError)
    async def _archive(_: Request, exc: ArchiveError) -> ORJSONResponse:
        """MAST refused or failed a search or a download's lookup: its status, the field at
        fault (``mast`` when none)."""
        return error_response(exc.status, ARCHIVE_DETAIL.get(exc.status, "MAST unavailable"),
                              [{"field": exc.field or "mast", "message": exc.message}])

    async def _unavailable(request: Request, exc: Exception) -> ORJSONResponse:
        """A store that does not answer, wherever it surfaced: 503 with Retry-After (never
        a 500, which would also cost the client its keep-alive connection: uvicorn closes it
        after an error that reaches the server-error middleware)."""
        part = unavailable_part(exc) or EVENT_STORE
        ledger = getattr(request.app.state, "ledger", None)
        if ledger is not None and not isinstance(exc, (StoreUnavailable,
                                                       ReadModelsUnavailable)):
            ledger.availability.failed(part, exc)  # requests stop trying it at once
        if part == READ_MODEL_DB:
            note_unavailable(READ_MODEL_DB)
        detail = str(exc) if isinstance(exc, (StoreUnavailable, ReadModelsUnavailable)) \
            else f"{LABELS[part]} does not answer ({short_error(exc)})"
        return error_response(503, f"Service unavailable: {detail}",
                              headers={"Retry-After": RETRY_AFTER_S})

    for error in UNAVAILABLE_ERRORS:
        app.add_exception_handler(error, _unavailable)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> ORJSONResponse:
        if exc.status_code == 405:  # Allow: every method of the path, not one route's
            allowed = getattr(request.app, "allowed_methods", None)
            methods = allowed(request.url.path) if allowed is not None else None
            if methods:
                return method_not_allowed(methods)
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> ORJSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "Internal server error")


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared < 0 or declared > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
        received = 0
        too_large = False

        async def limited_receive() -> Any:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _TooLarge
            return message

        async def guarded_send(message: Any) -> None:
            # FastAPI turns any error while reading the body into its own 400 answer: drop
            # that answer, the 413 below replaces it.
            if not too_large:
                await send(message)

        with contextlib.suppress(_TooLarge):
            await self.app(scope, limited_receive, guarded_send)
        if too_large:
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Any, receive: Any, send: Any) -> None:
        status = 413
        response = error_response(
            status, f"Request body larger than {self.max_bytes} bytes",
            [{"field": "body", "message": f"must be at most {self.max_bytes} bytes"}])
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class ReadModelsHeader:
    """``X-Read-Models: unavailable`` on the answer of a request served without the read
    models (a smart query answered from the journal alone, or its 503). The query service
    notes it on the request's context (``infra.availability.note_unavailable``)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        reads, token = track_request()

        async def marked_send(message: Any) -> None:
            if message["type"] == "http.response.start" and READ_MODEL_DB in reads.unavailable:
                message = {**message, "headers": [*message.get("headers", ()),
                                                  _READ_MODELS_UNAVAILABLE]}
            await send(message)

        try:
            await self.app(scope, receive, marked_send)
        finally:
            end_request(token)
