"""The HTTP API: critical commands for telescope automation, smart queries for dashboards."""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response, params
from fastapi.responses import PlainTextResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from api.accounts import (
    AUTH_ERRORS,
    AuthRateLimits,
    accounts_router,
    allow,
    principal_of,
)
from api.errors import (
    STATUS_OF_CODE,
    ApiError,
    BodySizeLimit,
    ErrorResponse,
    QueryTime,
    as_utc,
    install_error_handlers,
)
from api.runtime import Ledger
from commands.models import (
    AddFilesToPackageRequest,
    BulkRegisterRawDataFilesRequest,
    CommandModel,
    CreateRawDataPackageRequest,
    FinishExecutedObsUnitRequest,
    RegisterRawDataFileRequest,
    StageRequest,
    StagingProgressRequest,
    StartExecutedObsUnitRequest,
)
from commands.service import outcome_body
from domain.accounts import CRITICAL_WRITERS, OPERATORS, READERS, Principal
from infra.accounts import AuthError
from infra.journal import ACCEPTED, APPLIED, REJECTED
from infra.kafka_relay import broker_reachable
from infra.logs import command_id_var, correlation_id_var
from infra.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from infra.settings import Settings
from projections.kafka_projector import KafkaProjector
from queries.models import (
    CommandStatusView,
    ExecutedObsUnitPage,
    ExecutedObsUnitView,
    ExecutionsOfObsUnit,
    RawDataFilePage,
    RawDataFileView,
    RawDataPackageView,
    StagingRequestView,
)

log = logging.getLogger("obsledger.api")
_HEADER_VALUE = re.compile(r"^[A-Za-z0-9._:@/+=-]{1,200}$")
# documented for clients (checked by _check_header, which answers in the error format)
_HEADER_SCHEMA: dict[str, Any] = {"pattern": _HEADER_VALUE.pattern}


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
    400: {"model": ErrorResponse, "description": "Malformed JSON"},
    404: {"model": ErrorResponse, "description": "Unknown entity"},
    409: {"model": ErrorResponse, "description": "Not allowed in the entity's state"},
    413: {"model": ErrorResponse, "description": "Body too large"},
    422: {"model": ErrorResponse, "description": "Validation failed"},
    503: {"model": ErrorResponse, "description": "Store unavailable (queries only)"},
    **AUTH_ERRORS,
}
COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    202: {"model": CommandAccepted, "description": "Durably journaled; applied shortly."},
    200: {"model": CommandAccepted, "description": "Applied (with ?wait=true)."},
    **ERRORS,
}


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    ledger: Ledger = app.state.ledger
    ledger.start_workers()
    ledger.request_audit.start()
    await run_in_threadpool(_ensure_admin, ledger)
    await run_in_threadpool(ledger.auth.refresh)  # the first requests find the accounts read
    # What exists now lives as long as the app: keep it out of the cyclic GC's full
    # collections, which would otherwise rescan it every second under load.
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        await run_in_threadpool(ledger.stop)


def _ensure_admin(ledger: Ledger) -> None:
    """The one-command start: a local ``admin`` account when there is no administrator."""
    s = ledger.settings
    password = s.admin_password.get_secret_value() if s.admin_password else None
    try:
        where = ledger.auth.ensure_admin(password, s.data_dir)
    except SQLAlchemyError as e:
        log.warning("could not check for an admin account (database unreachable): %s", e)
        return
    if where is not None:
        log.warning(
            "created the local admin account 'admin' (roles admin, operator, auditor); its "
            "password is in %s. Get a token: curl -d username=admin -d password=... "
            "http://HOST:PORT/auth/token — then create service accounts for automation "
            "(POST /auth/service-accounts) and users for dashboards (POST /auth/register).",
            where)


def create_app(settings: Settings | None = None, ledger: Ledger | None = None) -> ObsLedgerAPI:
    settings = settings or Settings()
    ledger = ledger or Ledger(settings)
    app = ObsLedgerAPI(
        title="obsledger",
        version="0.1.0",
        description=(
            "Event-sourced ledger of observatory operations. Critical commands are "
            "acknowledged (202) once durably journaled, then applied in order to the event "
            "store; queries merge not-yet-projected commands (`pending: true`). Send an "
            "`Idempotency-Key` header to make retries safe; add `?wait=true` to wait for the "
            "command to be applied. Errors: `{detail, status_code, errors[{field, message}]}`."
        ),
        lifespan=_lifespan,
    )
    app.state.ledger = ledger
    app.state.settings = settings
    app.state.auth_limits = AuthRateLimits(settings.auth_rate_limit,
                                           settings.auth_rate_limit_per_client)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(accounts_router())
    app.include_command_router(_command_router())
    app.include_router(_query_router())
    from api.results import results_command_router, results_query_router  # uses this module

    app.include_command_router(results_command_router())
    app.include_router(results_query_router())
    from api.audit import audit_router  # read-only audit tools (auditor role)

    app.include_router(audit_router())

    from api.mast import mast_router  # uses this module

    app.include_router(mast_router())
    from api.ops import ops_router  # processing jobs and data products; uses this module

    app.include_router(ops_router())
    return app


# -- request context -------------------------------------------------------------------------
@dataclass(slots=True)
class RequestContext:
    actor: str
    correlation_id: str | None  # None: the command id correlates
    idempotency_key: str | None
    wait: bool


def _check_header(name: str, value: str | None) -> str | None:
    if value is not None and not _HEADER_VALUE.match(value):
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
    _check_header("Idempotency-Key", idempotency_key)
    _check_header("X-Correlation-ID", correlation_id)
    return RequestContext(actor=principal_of(request).actor, correlation_id=correlation_id,
                          idempotency_key=idempotency_key, wait=wait)


Ctx = Annotated[RequestContext, Depends(request_context)]
IdPath = Annotated[UUID, Path(description="Entity id")]


def _json(body: Any, status: int, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json",
                    headers=headers)


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


async def _submit(ledger: Ledger, ctx: RequestContext, command_type: str,
                  body: CommandModel, path: dict[str, Any] | None = None) -> Response:
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
        return _json(sub.body, 202, headers)
    entry = await ledger.journal.wait_outcome(sub.entry.command_id,
                                              ledger.settings.sync_wait_s)
    if entry is None or entry.status == ACCEPTED:
        return _json(sub.body, 202, headers)
    if entry.status == REJECTED:
        status = STATUS_OF_CODE.get(entry.reason_code or "", 422)
        errors = ([{"field": entry.reason_field, "message": entry.reason or ""}]
                  if entry.reason_field else [])
        return _json({"detail": entry.reason, "status_code": status, "errors": errors,
                      "command_id": entry.command_id}, status, headers)
    headers["X-Log-Position"] = str(entry.position)
    return _json(outcome_body(entry), 200, headers)


# -- the hot path: plain command requests straight to the command service -------------------
_WAIT_QUERY = {b"": False, b"wait=true": True, b"wait=false": False}
_LANE_MAX_BODY = 1024 * 1024
_CONTEXT_HEADERS = {b"idempotency-key": 0, b"authorization": 1, b"x-correlation-id": 2}


def _plain_command(command_type: str, model: type[CommandModel]) -> Any:
    """Mark a route whose endpoint is exactly ``_submit(ledger, ctx, command_type, body)``:
    the plain command lane may answer its requests."""
    def mark(endpoint: Any) -> Any:
        endpoint.plain_command = (command_type, model)
        return endpoint
    return mark


class ObsLedgerAPI(FastAPI):
    """FastAPI, plus a lane for plain critical-command requests.

    Acknowledging a command is the hot path of telescope automation, and FastAPI's
    middleware, routing and dependency solving cost more than the acknowledgement itself.
    A plain request — ``POST`` to a marked route, JSON body valid for the command, the
    context headers well formed, no query but ``wait`` — goes straight to ``_submit``.
    Anything else, and any request the command service refuses, is replayed to the regular
    FastAPI stack, so every answer (errors included) and the OpenAPI schema stay the same.
    With OpenTelemetry configured (before the first command arrives), every request takes
    the regular, instrumented path.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plain_routes: dict[str, tuple[str, type[CommandModel], frozenset[str]]] = {}
        self._lane_open: bool | None = None

    def include_command_router(self, router: APIRouter) -> None:
        """Include ``router``, and let the lane answer its marked routes."""
        self.include_router(router)
        self.plain_routes = {**self.plain_routes, **{
            route.path: (*route.endpoint.plain_command, _roles(route)) for route in router.routes
            if isinstance(route, APIRoute) and route.methods == {"POST"}
            and hasattr(route.endpoint, "plain_command")}}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self._handle(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        command_id: str | None = None

        async def send_status(message: Any) -> None:
            nonlocal status, command_id
            if message["type"] == "http.response.start":
                status = message["status"]
                for name, value in message.get("headers", ()):
                    if name == b"location" and value.startswith(b"/commands/"):
                        command_id = value[10:].decode("latin-1")
            await send(message)

        try:
            await self._handle(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route = scope.get("route")
            label = getattr(route, "path", None) or (
                scope["path"] if scope["path"] in self.plain_routes else "unmatched")
            ledger = self.state.ledger
            ledger.metrics.http_request(scope["method"], label, status, seconds)
            principal = scope.get("state", {}).get("principal")
            params_ = scope.get("path_params")
            client = scope.get("client")
            ledger.request_audit.record(
                datetime.now(UTC), principal.actor if principal else None, scope["method"],
                label, scope["path"], str(next(iter(params_.values()))) if params_ else None,
                client[0] if client else None, status, seconds * 1000, command_id)

    async def _handle(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            plain = self.plain_routes.get(scope["path"])
            if plain is not None and self._lane_open is None:
                self._lane_open = not self._native_telemetry.enabled()
            if plain is not None and self._lane_open:
                receive = await self._plain_lane(scope, receive, send, *plain)
                if receive is None:
                    return
        await super().__call__(scope, receive, send)

    def _lane_principal(self, authorization: str | None,
                        roles: frozenset[str]) -> Principal | None:
        """The principal of a bearer token the accounts snapshot knows and that holds one of
        ``roles``; None sends the request to the regular stack (which refreshes a stale
        snapshot, or answers 401/403)."""
        if authorization is None or authorization[:7].lower() != "bearer ":
            return None
        auth = self.state.ledger.auth
        if auth.stale():
            auth.refresh_soon()
        try:
            principal = auth.authenticate(authorization[7:].strip())
        except AuthError:
            return None
        return principal if principal is not None and principal.may(roles) else None

    async def _plain_lane(self, scope: Any, receive: Any, send: Any, command_type: str,
                          model: type[CommandModel], roles: frozenset[str]) -> Any:
        """Answer a plain request and return None, or return the ``receive`` with which the
        regular stack gets the request (the body read here replayed first)."""
        wait = _WAIT_QUERY.get(scope.get("query_string", b""))
        context: list[str | None] = [None, None, None]
        declared = -1
        content_type = None
        for name, value in scope["headers"]:
            slot = _CONTEXT_HEADERS.get(name)
            if slot is not None:
                text = value.decode("latin-1")
                if context[slot] is not None or (slot != 1 and not _HEADER_VALUE.match(text)):
                    wait = None
                context[slot] = text
            elif name == b"content-length":
                declared = int(value) if value.isdigit() else -1
            elif name == b"content-type":
                content_type = value
        if (wait is None or content_type != b"application/json"
                or not 0 < declared <= min(_LANE_MAX_BODY, self.state.settings.max_body_bytes)):
            return receive

        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # disconnected: let the regular stack see it
                return _replaying(chunks, receive, message)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            command = model.model_validate_json(body)
        except ValueError:
            return _replaying(chunks, receive)
        key, authorization, cid = context
        principal = self._lane_principal(authorization, roles)
        if principal is None:  # the regular stack refreshes the accounts or answers 401/403
            return _replaying(chunks, receive)
        scope.setdefault("state", {})["principal"] = principal
        ctx = RequestContext(actor=principal.actor, correlation_id=cid,
                             idempotency_key=key, wait=wait)
        try:
            response = await _submit(self.state.ledger, ctx, command_type, command)
        except Exception:  # refused (nothing journaled): the regular stack answers it
            return _replaying(chunks, receive)
        await response(scope, receive, send)
        return None


def _roles(route: APIRoute) -> frozenset[str]:
    """The roles a route's ``allow`` accepts."""
    return frozenset(scope for d in route.dependencies if isinstance(d, params.Security)
                     for scope in d.scopes or ())


def _replaying(chunks: list[bytes], receive: Any, last: Any = None) -> Any:
    """A ``receive`` that hands out the body already read, then the original's messages."""
    pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": last is not None}]
    if last is not None:
        pending.append(last)

    async def replay() -> Any:
        return pending.pop(0) if pending else await receive()

    return replay


# -- commands --------------------------------------------------------------------------------
def _command_router() -> APIRouter:
    r = APIRouter()

    @r.post("/executed_obs_units/start", dependencies=[allow(CRITICAL_WRITERS)],
            tags=["executed obs units"], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Start an executed obs unit (critical)")
    @_plain_command("executed_obs_unit.start", StartExecutedObsUnitRequest)
    async def start_unit(request: Request, body: StartExecutedObsUnitRequest,
                         ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "executed_obs_unit.start", body)

    @r.put("/executed_obs_units/{id}/finish", dependencies=[allow(CRITICAL_WRITERS)],
           tags=["executed obs units"], status_code=202,
           response_model=CommandAccepted, responses=COMMAND_RESPONSES,
           summary="Finish an executed obs unit: success, failed or aborted (critical)")
    async def finish_unit(request: Request, id: IdPath, body: FinishExecutedObsUnitRequest,
                          ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "executed_obs_unit.finish", body, {"id": id})

    @r.post("/raw_data_files", dependencies=[allow(CRITICAL_WRITERS)],
            tags=["raw data files"], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Register one raw data file (critical)",
            description="A file's id is derived from (instrument, name): uuid5 of the "
            "raw-data-file namespace, so names are unique per instrument.")
    @_plain_command("raw_data_file.register", RegisterRawDataFileRequest)
    async def register_file(request: Request, body: RegisterRawDataFileRequest,
                            ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "raw_data_file.register", body)

    @r.post("/raw_data_files/bulk", dependencies=[allow(CRITICAL_WRITERS)],
            tags=["raw data files"], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Register many raw data files in one command: all or none (critical)")
    async def register_files(request: Request, body: BulkRegisterRawDataFilesRequest,
                             ctx: Ctx) -> Response:
        limit = request.app.state.settings.max_bulk_files
        if len(body.files) > limit:
            raise ApiError(422, "Validation failed", [{
                "field": "files", "message": f"at most {limit} files per command"}])
        return await _submit(_ledger(request), ctx, "raw_data_file.register_bulk", body)

    @r.post("/raw_data_package", dependencies=[allow(CRITICAL_WRITERS)],
            tags=["raw data packages"], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Create a raw data package, optionally registering its files (critical)")
    @_plain_command("raw_data_package.create", CreateRawDataPackageRequest)
    async def create_package(request: Request, body: CreateRawDataPackageRequest,
                             ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "raw_data_package.create", body)

    @r.post("/raw_data_package/{id}/files", dependencies=[allow(CRITICAL_WRITERS)],
            tags=["raw data packages"], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Add registered files to a building package (critical)")
    async def add_files(request: Request, id: IdPath, body: AddFilesToPackageRequest,
                        ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "raw_data_package.add_files", body, {"id": id})

    @r.put("/raw_data_package/{id}/finalize", dependencies=[allow(CRITICAL_WRITERS)],
           tags=["raw data packages"], status_code=202,
           response_model=CommandAccepted, responses=COMMAND_RESPONSES,
           summary="Finalize a package: building -> complete, within the size limit")
    async def finalize_package(request: Request, id: IdPath, ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "raw_data_package.finalize", _Empty(),
                             {"id": id})

    @r.post("/staging/stage", dependencies=[allow(CRITICAL_WRITERS)],
            tags=["staging"], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Request that complete packages be staged to a destination (critical)")
    @_plain_command("staging.stage", StageRequest)
    async def stage(request: Request, body: StageRequest, ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "staging.stage", body)

    @r.put("/staging/{id}/progress", dependencies=[allow(CRITICAL_WRITERS)],
           tags=["staging"], status_code=202,
           response_model=CommandAccepted, responses=COMMAND_RESPONSES,
           summary="Report transfer progress or the outcome (transfer agent)")
    async def progress(request: Request, id: IdPath, body: StagingProgressRequest,
                       ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "staging.report_progress", body, {"id": id})

    @r.delete("/staging/{id}", dependencies=[allow(OPERATORS)], tags=["staging"], status_code=202,
              response_model=CommandAccepted, responses=COMMAND_RESPONSES,
              summary="Cancel a staging request (not once completed)")
    async def cancel(request: Request, id: IdPath, ctx: Ctx,
                     reason: Annotated[str | None, Query(
                         max_length=2000, pattern=r"^[^\x00]*$")] = None) -> Response:
        body = _CancelBody(reason=reason) if reason else _Empty()
        return await _submit(_ledger(request), ctx, "staging.cancel", body, {"id": id})

    return r


class _Empty(CommandModel):
    pass


class _CancelBody(CommandModel):
    reason: str | None = None


# -- queries ---------------------------------------------------------------------------------
MinPosition = Annotated[int | None, Query(
    ge=0, description="Wait (briefly, bounded) until the read models include this log "
    "position: read-your-writes.")]


async def _caught_up(request: Request, min_position: int | None) -> None:
    if not min_position:
        return
    ledger: Ledger = request.app.state.ledger
    timeout = request.app.state.settings.min_position_wait_s
    if ledger.projector is not None and ledger.workers and ledger.settings.embedded_projector:
        if ledger.projector.position >= min_position:
            return
        await run_in_threadpool(ledger.projector.wait_for, min_position, timeout)
        return
    deadline = time.monotonic() + timeout
    delay = 0.002
    while time.monotonic() < deadline:
        if await run_in_threadpool(ledger.queries.read_model_position) >= min_position:
            return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


def _not_found(what: str, entity_id: Any) -> ApiError:
    return ApiError(404, f"{what} {entity_id} not found")


def _query_router() -> APIRouter:
    r = APIRouter()

    @r.get("/executed_obs_units", dependencies=[allow(READERS)],
           tags=["executed obs units"], response_model=ExecutedObsUnitPage,
           responses=ERRORS, summary="Executed obs units for dashboards (filters, pages)")
    async def list_units(
        request: Request,
        status: Annotated[Literal["running", "success", "failed", "aborted"] | None,
                          Query()] = None,
        instrument: Annotated[str | None, Query(max_length=100)] = None,
        obs_unit_id: Annotated[str | None, Query(max_length=100)] = None,
        start_from: Annotated[QueryTime | None, Query(
            description="Started at or after (UTC)")] = None,
        start_to: Annotated[QueryTime | None, Query(description="Started before (UTC)")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        min_position: MinPosition = None,
    ) -> Any:
        await _caught_up(request, min_position)
        ledger: Ledger = request.app.state.ledger
        pos, total, items, pending = await run_in_threadpool(
            ledger.queries.list_executions, status=status, instrument=instrument,
            start_from=as_utc(start_from), start_to=as_utc(start_to), obs_unit_id=obs_unit_id,
            limit=limit, offset=offset)
        return ExecutedObsUnitPage(items=items, total=total, limit=limit, offset=offset,
                                   pending_count=pending, read_model_position=pos)

    @r.get("/executed_obs_units/execution/{id}", dependencies=[allow(READERS)],
           tags=["executed obs units"],
           response_model=ExecutedObsUnitView, responses=ERRORS,
           summary="One execution by its id (smart query)")
    async def get_execution(request: Request, id: UUID,
                            min_position: MinPosition = None) -> Any:
        await _caught_up(request, min_position)
        row = await run_in_threadpool(request.app.state.ledger.queries.execution, str(id))
        if row is None:
            raise _not_found("executed obs unit", id)
        return row

    @r.get("/executed_obs_units/{obs_unit_id}", dependencies=[allow(READERS)],
           tags=["executed obs units"],
           response_model=ExecutionsOfObsUnit, responses=ERRORS,
           summary="Every execution of a planned obs unit, merged with pending ones")
    async def executions_of(request: Request,
                            obs_unit_id: Annotated[str, Path(max_length=100)],
                            min_position: MinPosition = None) -> Any:
        await _caught_up(request, min_position)
        pos, rows = await run_in_threadpool(
            request.app.state.ledger.queries.executions_of, obs_unit_id)
        return ExecutionsOfObsUnit(obs_unit_id=obs_unit_id, read_model_position=pos,
                                   executions=rows)

    @r.get("/raw_data_files", dependencies=[allow(READERS)],
           tags=["raw data files"], response_model=RawDataFilePage,
           responses=ERRORS, summary="Raw data files, filtered and paged")
    async def list_files(
        request: Request,
        executed_obs_unit_id: UUID | None = None,
        package_id: UUID | None = None,
        instrument: Annotated[str | None, Query(max_length=100)] = None,
        file_type: Annotated[str | None, Query(max_length=50)] = None,
        name: Annotated[str | None, Query(max_length=255)] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        min_position: MinPosition = None,
    ) -> Any:
        await _caught_up(request, min_position)
        pos, total, items, pending = await run_in_threadpool(
            request.app.state.ledger.queries.list_files,
            executed_obs_unit_id=_s(executed_obs_unit_id), package_id=_s(package_id),
            instrument=instrument, file_type=file_type, name=name, limit=limit, offset=offset)
        return RawDataFilePage(items=items, total=total, limit=limit, offset=offset,
                               pending_count=pending, read_model_position=pos)

    @r.get("/raw_data_files/{id}", dependencies=[allow(READERS)],
           tags=["raw data files"], response_model=RawDataFileView,
           responses=ERRORS, summary="One raw data file (smart query)")
    async def get_file(request: Request, id: UUID, min_position: MinPosition = None) -> Any:
        await _caught_up(request, min_position)
        row = await run_in_threadpool(request.app.state.ledger.queries.file, str(id))
        if row is None:
            raise _not_found("raw data file", id)
        return row

    @r.get("/raw_data_package/{id}", dependencies=[allow(READERS)], tags=["raw data packages"],
           response_model=RawDataPackageView, responses=ERRORS,
           summary="A raw data package with its files (smart query)")
    async def get_package(request: Request, id: UUID, min_position: MinPosition = None) -> Any:
        await _caught_up(request, min_position)
        row = await run_in_threadpool(request.app.state.ledger.queries.package, str(id))
        if row is None:
            raise _not_found("raw data package", id)
        return row

    @r.get("/staging/status/{id}", dependencies=[allow(READERS)],
           tags=["staging"], response_model=StagingRequestView,
           responses=ERRORS, summary="Where a staging request stands (smart query)")
    async def staging_status(request: Request, id: UUID,
                             min_position: MinPosition = None) -> Any:
        await _caught_up(request, min_position)
        row = await run_in_threadpool(request.app.state.ledger.queries.staging, str(id))
        if row is None:
            raise _not_found("staging request", id)
        return row

    @r.get("/commands/{command_id}", dependencies=[allow(READERS)],
           tags=["commands"], response_model=CommandStatusView,
           responses=ERRORS, summary="Where a critical command stands")
    async def command_status(request: Request,
                             command_id: Annotated[str, Path(max_length=200)]) -> Any:
        entry = request.app.state.ledger.journal.get(command_id)
        if entry is None:
            raise _not_found("command", command_id)
        return CommandStatusView(
            command_id=entry.command_id, command_type=entry.command_type, status=entry.status,
            position=entry.position if entry.status == APPLIED else None, reason=entry.reason,
            reason_code=entry.reason_code, reason_field=entry.reason_field,
            received_at=entry.received_at, finished_at=entry.finished_at, actor=entry.actor,
            correlation_id=entry.correlation_id, attempts=entry.attempts,
            ids=entry.response.get("ids", {}))

    @r.get("/health", tags=["operations"], summary="Journal depth, store reachability, lag")
    async def health(request: Request) -> Any:
        ledger: Ledger = request.app.state.ledger
        return await run_in_threadpool(health_report, ledger)

    @r.get("/ready", tags=["operations"], responses={503: {"model": ErrorResponse}},
           summary="Readiness: store reachable, journal depth and age, projector and relay "
           "lag within the configured thresholds",
           description="200 `{ready: true, checks}`; 503 in the error format, `errors` naming "
           "each failing check, with the same `checks` (shape in docs/OPERATIONS.md).")
    async def ready(request: Request) -> Any:
        ledger: Ledger = request.app.state.ledger
        failing, checks = await run_in_threadpool(readiness_report, ledger)
        if not failing:
            return {"ready": True, "checks": checks}
        return _json({"detail": "not ready: " + "; ".join(m for _, m in failing),
                      "status_code": 503,
                      "errors": [{"field": f, "message": m} for f, m in failing],
                      "ready": False, "checks": checks}, 503)

    @r.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
           summary="Prometheus metrics: commands by type and outcome, journal depth, "
           "dispatcher batches, append latency, projection and relay lag, HTTP latency")
    async def metrics(request: Request) -> Response:
        ledger: Ledger = request.app.state.ledger
        body = await run_in_threadpool(ledger.metrics.exposition)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    return r


def health_report(ledger: Ledger) -> dict[str, Any]:
    store_ok = ledger.store is not None and ledger.store.ping()
    head = ledger.store.max_position() if store_ok and ledger.store else None
    oldest = ledger.journal.oldest_pending_received_at()
    try:
        projected: int | None = ledger.queries.read_model_position()
    except Exception:
        projected = None
    d = ledger.dispatcher
    return {
        "status": "ok" if store_ok else "degraded",
        "store": {"kind": ledger.settings.store, "reachable": store_ok, "head_position": head},
        "journal": {
            "depth": ledger.journal.depth(),
            "oldest_pending_age_s": (datetime.now(UTC) - oldest).total_seconds()
            if oldest else None,
            "commands": ledger.journal.counts(),
        },
        "dispatcher": {
            "embedded": ledger.workers,
            "store_reachable": d.store_reachable if d else False,
            "last_error": d.last_error if d else "event store not connected",
        },
        "projector": {
            "source": ledger.settings.projection_source,
            "position": projected,
            "lag_events": (head - projected) if head is not None and projected is not None
            else None,
            "last_error": ledger.projector.last_error if ledger.projector else None,
            **kafka_projector_health(ledger),
        },
        "kafka": relay_health(ledger),
        "results": _results_health(ledger),
        "downloader": ledger.downloader.report() if ledger.downloader else None,
        "processing_worker": ledger.processing_worker.report()
        if ledger.processing_worker else None,
        "object_store": ledger.object_store_status(),
    }


def _results_health(ledger: Ledger) -> dict[str, Any] | None:
    """The results process manager and scheduler (None until the store is connected)."""
    if ledger.results is None:
        return None
    try:
        return ledger.results.report()
    except Exception as e:  # the read-model database is down: other sections say so
        return {"last_error": f"unavailable: {e}"}


def readiness_report(ledger: Ledger) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The failing checks (field, message) and every figure checked."""
    c = ledger.readiness()
    s = ledger.settings
    failing: list[tuple[str, str]] = []
    if not c["store_reachable"]:
        failing.append(("store_reachable", "the event store does not answer"))
    if c["journal_depth"] > s.ready_max_journal_depth:
        failing.append(("journal_depth", f"{c['journal_depth']} commands pending "
                        f"(threshold {s.ready_max_journal_depth})"))
    if c["oldest_pending_age_s"] > s.ready_max_oldest_pending_s:
        failing.append(("oldest_pending_age_s", f"the oldest pending command is "
                        f"{c['oldest_pending_age_s']:.0f}s old "
                        f"(threshold {s.ready_max_oldest_pending_s:.0f}s)"))
    if (c["projector_lag_events"] or 0) > s.ready_max_projector_lag_events:
        failing.append(("projector_lag_events", f"the read models lag "
                        f"{c['projector_lag_events']} events "
                        f"(threshold {s.ready_max_projector_lag_events})"))
    if (c["projector_lag_s"] or 0) > s.ready_max_projector_lag_s:
        failing.append(("projector_lag_s", f"the read models lag {c['projector_lag_s']:.0f}s "
                        f"(threshold {s.ready_max_projector_lag_s:.0f}s)"))
    relay = c["relay"]
    if relay is not None and not relay["broker_reachable"]:
        failing.append(("relay.broker_reachable", "no Kafka bootstrap broker answers"))
    if relay is not None and relay["lag_s"] > s.ready_max_relay_lag_s:
        failing.append(("relay.lag_s", f"the relay lags {relay['lag_s']:.0f}s "
                        f"(threshold {s.ready_max_relay_lag_s:.0f}s)"))
    return failing, c


def kafka_projector_health(ledger: Ledger) -> dict[str, Any]:
    """With OBSLEDGER_PROJECTION_SOURCE=kafka: the group, and this process's member if any."""
    projector = ledger.projector
    if not isinstance(projector, KafkaProjector):
        return {}
    return {"kafka": {
        "group": projector.group,
        "member": projector.member if projector.running else None,
        "assigned_partitions": [f"{t}:{p}" for t, p in projector.assigned],
        "malformed_records": projector.malformed_records,
    }}


def relay_health(ledger: Ledger) -> dict[str, Any] | None:
    """The Kafka relay: broker reachability and lag (events, seconds); None without Kafka."""
    settings = ledger.settings
    if not settings.kafka_bootstrap:
        return None
    relay = ledger.relay
    report: dict[str, Any] = {
        "bootstrap": settings.kafka_bootstrap,
        "relay_embedded": bool(relay is not None and relay.running),
        "broker_reachable": broker_reachable(settings.kafka_bootstrap_servers),
        "published_position": None, "lag": None,
        "last_error": relay.last_error if relay is not None else None,
    }
    if relay is None or ledger.store is None:
        return report
    try:  # the relay may run in its own process: its position is in the read-model database
        position = relay.read_position()
        report["published_position"] = position
        report["lag"] = ledger.store.lag(position)
    except Exception as e:  # the store or read-model database is down: other sections say so
        report["last_error"] = report["last_error"] or f"lag unavailable: {e}"
    return report


def _s(v: Any) -> str | None:
    return None if v is None else str(v)
