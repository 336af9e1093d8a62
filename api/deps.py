"""What every feature's routes share: the request context of a critical command, its
submission and answer (``submit``), read-your-writes for smart queries (``caught_up``), the
documented responses, and ``command_route``, which declares a command route whose endpoint
only submits its command.

The feature modules (``api/obs_units.py``, ``api/raw_data.py``, ``api/staging.py``,
``api/results.py``, ``api/mast.py``, ``api/ops.py`` …) import from here; ``api/app.py``
assembles their routers and imports none of them back."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.accounts import AUTH_ERRORS, allow, principal_of
from api.errors import (
    READ_MODELS_HEADER,
    STATUS_OF_CODE,
    ApiError,
    QueryTime,
    as_utc,
    error_doc,
)
from api.paging import LINK_HEADER, PageRequest, paged, paging
from api.routing import GuardedRoute
from bootstrap.ledger import Ledger
from commands.models import CommandModel
from commands.service import outcome_body
from domain.accounts import CRITICAL_WRITERS, READERS
from infra.availability import READ_MODEL_DB, READ_MODEL_ERRORS, read_models_state
from infra.journal import ACCEPTED, REJECTED
from infra.logs import command_id_var, correlation_id_var
from queries.models import Page
from queries.service import QueryService

P = TypeVar("P", bound=Page)
#: What an ``Idempotency-Key`` or ``X-Correlation-ID`` may be.
HEADER_VALUE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")
# documented for clients (checked by check_header, which answers in the error format)
_HEADER_SCHEMA: dict[str, Any] = {"pattern": HEADER_VALUE.pattern}


class CommandAccepted(BaseModel):
    command_id: str = Field(description="The command id (the Idempotency-Key when given).")
    status: Literal["accepted", "applied", "rejected"]
    ids: dict[str, Any] = Field(description="Pre-generated ids of what the command creates.")
    position: int | None = Field(None, description="Log position, once applied.")
    reason: str | None = None

    model_config = {"json_schema_extra": {"examples": [{
        "command_id": "night-1121-ou-0412-start", "status": "accepted",
        "ids": {"executed_obs_unit_id": "e433bda1-579b-4946-9f02-7a3e4a04efe2"}}]}}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: error_doc("Malformed JSON"),
    404: error_doc("Unknown entity"),
    409: error_doc("Not allowed in the entity's state"),
    413: error_doc("Body too large"),
    422: error_doc("Validation failed"),
    503: error_doc("A store does not answer: the event store, or the read models when the "
                   "journal cannot answer alone (docs/OPERATIONS.md, \"During an outage\"). "
                   "Commands are still acknowledged.", retry_after=True),
    **AUTH_ERRORS,
}
#: Smart queries: their 200 may come from the journal alone while the read models are down.
QUERY_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS,
    200: {"description": "The answer; while the read models are unavailable, from the "
          "journal alone (rows `pending: true`, `read_models: \"unavailable\"`).",
          "headers": {READ_MODELS_HEADER: {
              "description": "`unavailable` when the read-model database did not answer and "
              "the body comes from this server's journal alone; absent otherwise.",
              "schema": {"type": "string", "enum": ["unavailable"]}}}},
}
#: Lists (smart queries, paged): the 200 also carries the ``Link`` header (api/paging.py).
LIST_RESPONSES: dict[int | str, dict[str, Any]] = {
    **QUERY_RESPONSES,
    200: {**QUERY_RESPONSES[200], "headers": {**QUERY_RESPONSES[200]["headers"], **LINK_HEADER}},
}
#: Counts: from the read models alone (503 while they do not answer).
COUNT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS, 200: {"description": "The counts, from one snapshot of the read models."}}
#: The headers of a command's 202 and 200 (``submit``); none is marked required.
COMMAND_HEADERS: dict[str, dict[str, Any]] = {
    "Location": {"description": "The command's status: `/commands/{command_id}`.",
                 "schema": {"type": "string"}},
    "X-Correlation-ID": {"description": "The correlation id given, or the command's own.",
                         "schema": {"type": "string"}},
    "Idempotent-Replayed": {"description": "`true` when the `Idempotency-Key` was seen "
                            "before: this answers the first request, nothing was journaled "
                            "again; absent otherwise.",
                            "schema": {"type": "string", "enum": ["true"]}},
}
#: A command applied under ``?wait=true``: also where its event lies in the log.
APPLIED_HEADERS: dict[str, dict[str, Any]] = {
    **COMMAND_HEADERS,
    "X-Log-Position": {"description": "The log position of the applied command's event "
                       "(pass it as `min_position` to read your own write).",
                       "schema": {"type": "integer", "minimum": 0}},
}
COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": CommandAccepted, "description": "Durably journaled; applied shortly.",
          "headers": COMMAND_HEADERS},
    200: {"model": CommandAccepted, "description": "Applied (with ?wait=true).",
          "headers": APPLIED_HEADERS},
    **ERRORS,
}


# -- request context -------------------------------------------------------------------------
@dataclass(slots=True)
class RequestContext:
    actor: str
    correlation_id: str | None  # None: the command id correlates
    idempotency_key: str | None
    wait: bool


def check_header(name: str, value: str | None) -> str | None:
    """``value`` when it is a well-formed context header; 422 in the error format if not."""
    if value is not None and not HEADER_VALUE.match(value):
        raise ApiError(422, "Validation failed", [{
            "field": name, "message": "1-200 characters of letters, digits and ._:@/+=-"}])
    return value


async def request_context(  # async: FastAPI would run a sync dependency in a worker thread
    request: Request,
    idempotency_key: Annotated[str | None, Header(
        alias="Idempotency-Key", description="Makes a retry return the first answer.",
        json_schema_extra=_HEADER_SCHEMA)] = None,
    correlation_id: Annotated[str | None, Header(
        alias="X-Correlation-ID", description="Correlates related commands (default: the "
        "command id).", json_schema_extra=_HEADER_SCHEMA)] = None,
    wait: Annotated[bool, Query(
        description="Wait until the command is applied (or rejected) and answer with its "
        "outcome and log position.")] = False,
) -> RequestContext:
    """The command's context; the actor is the principal the endpoint's ``allow`` checked."""
    check_header("Idempotency-Key", idempotency_key)
    check_header("X-Correlation-ID", correlation_id)
    return RequestContext(actor=principal_of(request).actor, correlation_id=correlation_id,
                          idempotency_key=idempotency_key, wait=wait)


Ctx = Annotated[RequestContext, Depends(request_context)]
IdPath = Annotated[UUID, Path(description="Entity id")]
MinPosition = Annotated[int | None, Query(
    ge=0, description="Wait (briefly, bounded) until the read models include this log "
    "position: read-your-writes.")]


Paging = Annotated[PageRequest, Depends(paging)]
#: How a list's ``sort`` says it is descending.
DESCENDING = "`-` first: descending"


def query_time(what: str) -> Any:
    """A time a query filters on."""
    return Query(description=f"{what} (ISO 8601, UTC if no offset)")


RegisteredFrom = Annotated[QueryTime | None, query_time(
    "Registered (recorded in the ledger) at or after; a pending entity counts as registered "
    "now")]
RegisteredTo = Annotated[QueryTime | None, query_time("Registered before")]
RequestedFrom = Annotated[QueryTime | None, query_time("Requested at or after")]
RequestedTo = Annotated[QueryTime | None, query_time("Requested before")]
BuiltFrom = Annotated[QueryTime | None, query_time("Built at or after")]
BuiltTo = Annotated[QueryTime | None, query_time("Built before")]
#: A count's time window: the names and types of its two query parameters (from, to).
Window = tuple[tuple[str, Any], tuple[str, Any]]
REGISTERED: Window = (("registered_from", RegisteredFrom), ("registered_to", RegisteredTo))
REQUESTED: Window = (("requested_from", RequestedFrom), ("requested_to", RequestedTo))
BUILT: Window = (("built_from", BuiltFrom), ("built_to", BuiltTo))


def json_response(body: Any, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def ledger_of(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


def as_str(v: Any) -> str | None:
    """A query's optional id as the read models store it."""
    return None if v is None else str(v)


def not_found(what: str, entity_id: Any) -> ApiError:
    return ApiError(404, f"{what} {entity_id} not found")


# -- critical commands -----------------------------------------------------------------------
async def submit(ledger: Ledger, ctx: RequestContext, command_type: str,
                 body: CommandModel, path: dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None) -> Response:
    """Submit the command; answer 202 (accepted), or with ``?wait=true`` its outcome. ``extra``
    fields join an accepted or applied answer."""
    # this request's task: the log lines from here on carry the command's ids
    command_id_var.set(ctx.idempotency_key)
    correlation_id_var.set(ctx.correlation_id)
    sub = await ledger.commands.submit(
        command_type, body, path=path, actor=ctx.actor, correlation_id=ctx.correlation_id,
        idempotency_key=ctx.idempotency_key)
    command_id_var.set(sub.entry.command_id)
    correlation_id_var.set(sub.entry.correlation_id)
    headers = {"Location": f"/commands/{sub.entry.command_id}",
               "X-Correlation-ID": ctx.correlation_id or sub.entry.correlation_id}
    if sub.replayed:
        headers["Idempotent-Replayed"] = "true"
    if not ctx.wait:
        return json_response({**sub.body, **(extra or {})}, 202, headers)
    entry = await ledger.journal.wait_outcome(sub.entry.command_id,
                                              ledger.settings.sync_wait_s)
    if entry is None or entry.status == ACCEPTED:
        return json_response({**sub.body, **(extra or {})}, 202, headers)
    if entry.status == REJECTED:
        status = STATUS_OF_CODE.get(entry.reason_code or "", 422)
        errors = ([{"field": entry.reason_field, "message": entry.reason or ""}]
                  if entry.reason_field else [])
        return json_response({"detail": entry.reason, "status_code": status, "errors": errors,
                              "command_id": entry.command_id}, status, headers)
    headers["X-Log-Position"] = str(entry.position)
    return json_response({**outcome_body(entry), **(extra or {})}, 200, headers)


class NoBody(CommandModel):
    """The journaled body of a command whose request has none."""


class CancelBody(CommandModel):
    """The journaled body of a cancel (its reason from the query)."""

    reason: str | None = None


#: A cancel's optional reason, a query parameter (a DELETE has no body).
CancelReason = Annotated[str | None, Query(max_length=2000, pattern=r"^[^\x00]*$")]


def cancel_body(reason: str | None) -> CommandModel:
    """What a cancel without a request model of its own journals: its reason, or no body."""
    return CancelBody(reason=reason) if reason else NoBody()


def plain_command(command_type: str, model: type[CommandModel]) -> Any:
    """Mark a route whose endpoint is exactly ``submit(ledger, ctx, command_type, body)``:
    the plain command lane (``api.app.ObsLedgerAPI``) may answer its requests."""
    def mark(endpoint: Any) -> Any:
        endpoint.plain_command = (command_type, model)
        return endpoint
    return mark


_PATH_PARAMETER = re.compile(r"{(\w+)}")


def add_endpoint(router: APIRouter, method: str, path: str, endpoint: Callable[..., Any],
                 parameters: dict[str, Any], *, name: str, tag: str, roles: frozenset[str],
                 **route: Any) -> None:
    """Add ``endpoint`` to ``router`` as ``name`` (its OpenAPI operation id), its parameters
    as FastAPI reads them: ``request`` then ``parameters`` (name → annotation, or
    (annotation, default)); ``roles`` are checked before the body is read."""
    kw = inspect.Parameter.KEYWORD_ONLY
    signature = [inspect.Parameter("request", kw, annotation=Request)]
    for n, a in parameters.items():
        annotation, default = a if isinstance(a, tuple) else (a, inspect.Parameter.empty)
        signature.append(inspect.Parameter(n, kw, annotation=annotation, default=default))
    endpoint.__signature__ = inspect.Signature(signature)  # type: ignore[attr-defined]
    endpoint.__name__ = endpoint.__qualname__ = name
    router.add_api_route(path, endpoint, methods=[method], name=name,
                         dependencies=[allow(roles)], tags=[tag], **route)


def command_route(router: APIRouter, method: Literal["POST", "PUT", "DELETE"], path: str,
                  command_type: str, body: type[CommandModel] | None, *, name: str,
                  tag: str, summary: str, description: str | None = None,
                  roles: frozenset[str] = CRITICAL_WRITERS,
                  path_types: dict[str, Any] | None = None,
                  path_names: dict[str, str] | None = None, plain: bool = False,
                  cancel: Callable[[str | None], CommandModel] | None = None,
                  prepare: Callable[[Ledger, Any], CommandModel] | None = None,
                  responses: dict[int | str, dict[str, Any]] | None = None) -> None:
    """Declare on ``router`` a route whose endpoint only submits ``command_type``: the request
    ``body`` (or, with None, no body: ``NoBody`` is journaled) and the path's parameters
    (each an ``IdPath`` unless ``path_types`` says otherwise) go to ``submit`` as they are
    (named as in the path, or as ``path_names`` maps them).
    202 ``CommandAccepted`` with ``COMMAND_RESPONSES``; ``roles`` are checked before the body
    is read; ``name`` is the endpoint's (and makes its OpenAPI operation id). ``plain``
    offers its requests to the plain command lane (a POST with a body and no path
    parameter). ``cancel`` makes it a cancel: no request body, the journaled body is
    ``cancel`` of the optional ``reason`` query parameter. ``prepare`` makes the journaled
    command of the request body (in a worker thread: it may look things up, and refuse);
    ``responses`` are documented besides ``COMMAND_RESPONSES``."""
    ids = _PATH_PARAMETER.findall(path)
    parameters: dict[str, Any] = {n: (path_types or {}).get(n, IdPath) for n in ids}
    if body is not None:
        parameters["body"] = body
    parameters["ctx"] = Ctx
    if cancel is not None:
        parameters["reason"] = (CancelReason, None)

    async def endpoint(request: Request, ctx: RequestContext, body: CommandModel | None = None,
                       reason: str | None = None, **path_ids: Any) -> Response:
        path = {(path_names or {}).get(k, k): v for k, v in path_ids.items()}
        ledger = ledger_of(request)
        if cancel is not None:
            body = cancel(reason)
        if prepare is not None:
            body = await run_in_threadpool(prepare, ledger, body)
        return await submit(ledger, ctx, command_type, body if body is not None else NoBody(),
                            path or None)

    if plain:
        if method != "POST" or body is None or ids or prepare is not None:
            raise ValueError(f"{path}: only a POST of its body, without path parameters, is "
                             "plain")
        plain_command(command_type, body)(endpoint)
    add_endpoint(router, method, path, endpoint, parameters, name=name, tag=tag, roles=roles,
                 status_code=202, response_model=CommandAccepted,
                 responses={**COMMAND_RESPONSES, **(responses or {})}, summary=summary,
                 description=description)


async def caught_up(request: Request, min_position: int | None) -> None:
    """Wait (bounded) until the read models include ``min_position``: read-your-writes."""
    ledger: Ledger = request.app.state.ledger
    if not min_position or ledger.availability.down(READ_MODEL_DB):
        return  # the read models cannot catch up now: the query answers from the journal
    timeout = request.app.state.settings.min_position_wait_s
    if ledger.projector is not None and ledger.workers and ledger.settings.embedded_projector \
            and ledger.leading:
        if ledger.projector.position >= min_position:
            return
        await run_in_threadpool(ledger.projector.wait_for, min_position, timeout)
        return
    deadline = time.monotonic() + timeout
    delay = 0.002
    while time.monotonic() < deadline and ledger.availability.up(READ_MODEL_DB):
        try:
            if await run_in_threadpool(ledger.queries.read_model_position) >= min_position:
                return
        except READ_MODEL_ERRORS as e:
            ledger.availability.failed(READ_MODEL_DB, e)
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


async def smart_row(request: Request, min_position: int | None,
                    read: Callable[[str], Any | None], what: str, entity_id: Any) -> Any:
    """One entity of a smart query: ``read(str(entity_id))`` in a worker thread once the read
    models include ``min_position``; 404 (``what`` named) when there is none."""
    await caught_up(request, min_position)
    row = await run_in_threadpool(read, str(entity_id))
    if row is None:
        raise not_found(what, entity_id)
    return row


def row_route(router: APIRouter, path: str, read: Callable[[Ledger], Callable[[str], Any]],
              what: str, *, name: str, tag: str, response_model: Any, summary: str,
              id_type: Any = IdPath,
              responses: dict[int | str, dict[str, Any]] = QUERY_RESPONSES) -> None:
    """Declare on ``router`` the smart query of one entity: GET ``path`` (its ``{id}`` an
    ``id_type``) answers ``read(ledger)(id)`` once the read models include ``min_position``,
    404 naming ``what`` when there is none (``smart_row``); ``QUERY_RESPONSES`` unless
    ``responses`` says otherwise, for the roles that may read; ``name`` is the endpoint's
    (and makes its OpenAPI operation id)."""

    async def endpoint(request: Request, id: Any, min_position: int | None = None) -> Any:
        return await smart_row(request, min_position, read(ledger_of(request)), what, id)

    add_endpoint(router, "GET", path, endpoint,
                 {"id": id_type, "min_position": (MinPosition, None)}, name=name, tag=tag,
                 roles=READERS, response_model=response_model, responses=responses,
                 summary=summary)


def counts_route(router: APIRouter, path: str,
                 count: Callable[[QueryService, datetime | None, datetime | None], Any], *,
                 window: Window, name: str, tag: str, response_model: Any,
                 summary: str) -> None:
    """Declare on ``router`` counts from the read models: GET ``path`` answers
    ``count(queries, from, to)`` in a worker thread, the bounds (UTC) from the ``window``'s
    two query parameters; ``COUNT_RESPONSES``, for the roles that may read."""
    (start, start_type), (end, end_type) = window

    async def endpoint(request: Request, **bounds: datetime | None) -> Any:
        return await run_in_threadpool(count, ledger_of(request).queries,
                                       as_utc(bounds[start]), as_utc(bounds[end]))

    add_endpoint(router, "GET", path, endpoint,
                 {start: (start_type, None), end: (end_type, None)}, name=name, tag=tag,
                 roles=READERS, response_model=response_model, responses=COUNT_RESPONSES,
                 summary=summary)


def list_route(router: APIRouter, path: str, page_model: Any, *, tag: str, summary: str,
               description: str | None = None,
               responses: dict[int | str, dict[str, Any]] = LIST_RESPONSES,
               ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a paged list (a decorator): GET ``path`` for the roles that may read,
    answering a ``page_model``, with ``LIST_RESPONSES`` (``Link`` on the 200) unless
    ``responses`` says otherwise."""
    return router.get(path, dependencies=[allow(READERS)], tags=[tag],
                      response_model=page_model, responses=responses, summary=summary,
                      description=description)


async def smart_page(request: Request, response: Response, page: PageRequest,
                     min_position: int | None, model: type[P],
                     query: Callable[..., tuple[int | None, int | None, list[Any], int]],
                     **filters: Any) -> P:
    """A page of a smart list: ``query(**filters, limit=, offset=)`` in a worker thread once
    the read models include ``min_position``, the ``Link`` header set, as ``model``."""
    await caught_up(request, min_position)
    pos, total, items, pending = await run_in_threadpool(
        query, **filters, limit=page.limit, offset=page.offset)
    paged(request, response, page, total)
    return model(items=items, total=total, limit=page.limit, offset=page.offset,
                 pending_count=pending, read_model_position=pos,
                 read_models=read_models_state())


async def read_page(request: Request, response: Response, page: PageRequest,
                    min_position: int | None,
                    query: Callable[[int, int], tuple[int | None, int | None, list[Any]]],
                    ) -> dict[str, Any]:
    """A page of a list without pending counts: ``query(limit, offset)`` (read-model position,
    total, items) in a worker thread once the read models include ``min_position``, the
    ``Link`` header set. ``skip`` (the deprecated ``offset``) and ``read_models`` are left out
    by the pages that do not have them."""
    await caught_up(request, min_position)
    pos, total, items = await run_in_threadpool(query, page.limit, page.offset)
    paged(request, response, page, total)
    return {"items": items, "total": total, "limit": page.limit, "offset": page.offset,
            "skip": page.offset, "read_model_position": pos, "read_models": read_models_state()}


def feature_router() -> APIRouter:
    """A feature's router: every route a ``GuardedRoute``."""
    return APIRouter(route_class=GuardedRoute)
