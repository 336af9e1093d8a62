"""One error format for every 4xx/5xx answer (see docs/ARCHITECTURE.md):

``{"detail": "...", "status_code": 422, "errors": [{"field": "files.3.size", "message": "..."}]}``
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, BeforeValidator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from domain.errors import DomainRejection
from infra.event_store import StoreUnavailable

log = logging.getLogger("obsledger.api")

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


def error_response(status: int, detail: str, errors: list[dict[str, str]] | None = None,
                   headers: Mapping[str, str] | None = None) -> ORJSONResponse:
    return ORJSONResponse(
        {"detail": detail, "status_code": status, "errors": errors or []},
        status_code=status, headers=headers,
    )


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
    """A query parameter's time in UTC (naive means UTC); 422 when it cannot be."""
    if v is None:
        return None
    try:
        return v.replace(tzinfo=UTC) if v.tzinfo is None else v.astimezone(UTC)
    except OverflowError:  # e.g. 0001-01-01T00:00:00+01:00
        raise ApiError(422, "Validation failed", [{
            "field": "query", "message": f"{v.isoformat()} is not representable in UTC"}],
        ) from None


def _field(loc: tuple[Any, ...]) -> str:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:] if parts[0] == "body" else parts
    return ".".join(str(p) for p in parts) or "body"


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
            msg = str(e.get("msg", "invalid"))
            msg = msg.removeprefix("Value error, ")
            errors.append({"field": _field(tuple(e.get("loc", ()))), "message": msg})
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

    @app.exception_handler(StoreUnavailable)
    async def _unavailable(_: Request, exc: StoreUnavailable) -> ORJSONResponse:
        return error_response(503, f"Service unavailable: {exc}", headers={"Retry-After": "2"})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> ORJSONResponse:
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
