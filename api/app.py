"""The HTTP API: critical commands for telescope automation, smart queries for dashboards.

This module builds the app (``create_app``: the settings, the ledger, the middleware and the
feature routers of ``ROUTERS``, one module a feature over ``api/deps.py``) and its edge
(``ObsLedgerAPI``: CORS and gzip, 405 for a method a path does not declare, the plain command
lane, the request metrics and audit)."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar

from fastapi import APIRouter, FastAPI, Response, params
from fastapi.routing import APIRoute
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.middleware.cors import CORSMiddleware
from starlette.middleware.gzip import GZipMiddleware

from api.accounts import AuthRateLimits, PasswordChecks, accounts_router
from api.audit import audit_router
from api.command_status import command_status_router
from api.dashboard import dashboard_router
from api.deps import HEADER_VALUE, RequestContext, submit
from api.docs import install_docs
from api.errors import (
    READ_MODELS_HEADER,
    BodySizeLimit,
    ReadModelsHeader,
    error_response,
    install_error_handlers,
)
from api.health import health_router
from api.mast import mast_router
from api.obs_units import obs_units_router
from api.openapi_docs import TAGS, describe
from api.ops import ops_router
from api.raw_data import document_bulk_limit, raw_data_router
from api.results import results_router
from api.routing import THREAD_PARSE_BYTES, MethodTable
from api.staging import staging_router
from api.stream import StreamConnections, stream_router
from bootstrap.ledger import Ledger
from commands.models import CommandModel
from domain.accounts import Principal
from infra.settings import Settings
from infra.tokens import AuthError

log = logging.getLogger("obsledger.api")


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    ledger: Ledger = app.state.ledger
    ledger.start_probes()
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


#: The routers the app serves, one a feature, in the order requests are routed (within a
#: feature's router, fixed paths such as ``…/counts`` come before the templates that would
#: take them for an id).
ROUTERS: tuple[Callable[[], APIRouter], ...] = (
    accounts_router,
    obs_units_router,
    raw_data_router,
    staging_router,
    command_status_router,
    health_router,
    results_router,
    audit_router,  # read-only audit tools (auditor role)
    mast_router,
    ops_router,  # processing jobs and data products
    stream_router,  # the live stream (server-sent events)
    dashboard_router,  # the night view: the page and its summary
)


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
        openapi_tags=TAGS,
        lifespan=_lifespan,
        docs_url=None,
        redoc_url=None,
    )
    install_docs(app)
    app.state.ledger = ledger
    app.state.settings = settings
    app.state.auth_limits = AuthRateLimits(settings.auth_rate_limit,
                                           settings.auth_rate_limit_per_client)
    app.state.password_checks = PasswordChecks(settings.auth_password_checks,
                                               settings.auth_password_queue, ledger.metrics)
    app.state.stream_connections = StreamConnections(settings.stream_connections_per_account)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ReadModelsHeader)
    for router in ROUTERS:
        app.include_feature_router(router())
    return app


# -- the hot path: plain command requests straight to the command service -------------------
_WAIT_QUERY = {b"": False, b"wait=true": True, b"wait=false": False}
#: Larger bodies take the regular stack, which parses them off the event loop.
_LANE_MAX_BODY = THREAD_PARSE_BYTES
_CONTEXT_HEADERS = {b"idempotency-key": 0, b"authorization": 1, b"x-correlation-id": 2}


class ObsLedgerAPI(FastAPI):
    """FastAPI, plus a lane for plain critical-command requests.

    Acknowledging a command is the hot path of telescope automation, and FastAPI's
    middleware, routing and dependency solving cost more than the acknowledgement itself.
    A plain request — ``POST`` to a marked route, JSON body valid for the command, the
    context headers well formed, no query but ``wait`` — goes straight to ``submit``.
    Anything else, and any request the command service refuses, is replayed to the regular
    FastAPI stack, so every answer (errors included) and the OpenAPI schema stay the same.
    With OpenTelemetry configured (before the first command arrives), every request takes
    the regular, instrumented path. The lane, like the regular stack (``GuardedRoute``),
    authenticates before it reads the body.

    A fixed path is routed before templates: a method it does not declare is 405 with
    ``Allow`` (``MethodTable``), never another route's answer for a path parameter.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.plain_routes: dict[str, tuple[str, type[CommandModel], frozenset[str]]] = {}
        self._lane_open: bool | None = None
        self._methods: MethodTable | None = None
        self._edge: Any = None

    def edge(self) -> Any:
        """What every HTTP request passes first, the plain lane's included: CORS (with
        OBSLEDGER_CORS_ORIGINS: a preflight is answered here, before ``MethodTable`` would
        answer OPTIONS with 405) and gzip for clients that accept it."""
        if self._edge is None:
            settings: Settings = self.state.settings
            edge: Any = GZipMiddleware(self._handle, minimum_size=settings.gzip_minimum_bytes,
                                       compresslevel=6)
            if settings.cors_origin_list:
                edge = CorsEdge(
                    edge, allow_origins=settings.cors_origin_list,
                    allow_methods=["GET", "POST", "PUT", "DELETE"],
                    allow_headers=list(CORS_REQUEST_HEADERS),
                    expose_headers=list(CORS_EXPOSED_HEADERS), max_age=600)
            self._edge = edge
        return self._edge

    def method_table(self) -> MethodTable:
        """The methods of every path (built at the first request: every route is there)."""
        if self._methods is None:
            self._methods = MethodTable(self.routes)
        return self._methods

    def allowed_methods(self, path: str) -> frozenset[str] | None:
        return self.method_table().allowed(path)

    def openapi(self) -> dict[str, Any]:
        """FastAPI's schema, with the limits that come from the settings and integer bounds
        as integers (FastAPI's OpenAPI model keeps them as floats: 2**63 - 1 would become
        2**63)."""
        if self.openapi_schema is None:
            schema = super().openapi()
            _integer_bounds(schema)
            describe(schema)
            document_bulk_limit(schema, self.state.settings.max_bulk_files)
        return self.openapi_schema  # type: ignore[return-value]

    def include_feature_router(self, router: APIRouter) -> None:
        """Include ``router``, and let the lane answer its routes marked ``plain_command``."""
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
            await self.edge()(scope, receive, send_status)
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
        if scope["type"] == "http":
            refusal = self.method_table().refusal(scope["path"], scope["method"])
            if refusal is not None:
                await refusal(scope, receive, send)
                return
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
                if context[slot] is not None or (slot != 1 and not HEADER_VALUE.match(text)):
                    wait = None
                context[slot] = text
            elif name == b"content-length":
                declared = int(value) if value.isdigit() else -1
            elif name == b"content-type":
                content_type = value
        if (wait is None or content_type != b"application/json"
                or not 0 < declared <= min(_LANE_MAX_BODY, self.state.settings.max_body_bytes)):
            return receive
        key, authorization, cid = context
        # before the body is read: the regular stack refreshes the accounts or answers
        # 401/403, also without reading it
        principal = self._lane_principal(authorization, roles)
        if principal is None:
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
        except Exception:  # invalid, or refused by the model (a conflict): the regular
            return _replaying(chunks, receive)  # stack answers it in the error format
        scope.setdefault("state", {})["principal"] = principal
        ctx = RequestContext(actor=principal.actor, correlation_id=cid,
                             idempotency_key=key, wait=wait)
        try:
            response = await submit(self.state.ledger, ctx, command_type, command)
        except Exception:  # refused (nothing journaled): the regular stack answers it
            return _replaying(chunks, receive)
        await response(scope, receive, send)
        return None


class CorsEdge(CORSMiddleware):
    """Starlette's CORS, its refused preflight (plain text) in the error format."""

    _HEADER: ClassVar[dict[str, str]] = {
        "origin": "Origin", "method": "Access-Control-Request-Method",
        "headers": "Access-Control-Request-Headers"}

    def preflight_response(self, request_headers: Any) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        detail = bytes(response.body).decode()
        failures = detail.removeprefix("Disallowed CORS ").split(", ")
        return error_response(400, detail, [
            {"field": self._HEADER.get(f, f), "message": "not allowed from another origin "
             "(OBSLEDGER_CORS_ORIGINS)"} for f in failures],
            headers={k: v for k, v in response.headers.items()
                     if k not in ("content-length", "content-type")})


#: Headers a browser on another origin may send, and may read from an answer.
CORS_REQUEST_HEADERS = ("Authorization", "Content-Type", "Idempotency-Key", "X-Correlation-ID",
                        "Last-Event-ID")
CORS_EXPOSED_HEADERS = ("Link", "Location", "Retry-After", READ_MODELS_HEADER,
                        "X-Correlation-ID", "X-Log-Position", "Idempotent-Replayed")

_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _integer_bounds(node: Any) -> None:
    """Whole-number bounds in a JSON schema as integers (in place)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                node[key] = int(value)
            else:
                _integer_bounds(value)
    elif isinstance(node, list):
        for value in node:
            _integer_bounds(value)


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
