"""Accounts over HTTP: tokens, the roles every endpoint declares, service accounts, and the
request audit log for auditors.

Every endpoint but the probes (``/health``, ``/ready``, ``/metrics``) and ``POST /auth/token``
declares the roles it accepts with :func:`allow`, which shows them in the OpenAPI schema as the
operation's OAuth2 scopes (any one of them suffices). No token, or a refused one → 401; a token
without one of the roles → 403; both in the error format.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, TypeVar
from uuid import UUID

from fastapi import APIRouter, Depends, Form, Path, Query, Request, Response, Security
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from limits import RateLimitItem, parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from pydantic import BaseModel, EmailStr, Field
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from api.errors import RETRY_AFTER_DOC, ApiError, ErrorResponse, QueryTime, as_utc
from api.paging import LINK_HEADER, PageRequest, paged, paging_with_skip
from api.routing import GuardedRoute
from bootstrap.ledger import Ledger
from domain.accounts import (
    ADMINS,
    AUDITORS,
    MIN_PASSWORD_LENGTH,
    READERS,
    ROLE_DESCRIPTIONS,
    USERNAME_PATTERN,
    Principal,
    Role,
)
from infra.accounts import AccountExists
from infra.metrics import Metrics
from infra.passwords import password_problem
from infra.tokens import AuthError, AuthUnavailable

TAG = "accounts"
log = logging.getLogger("obsledger.accounts")
oauth2 = OAuth2PasswordBearer(tokenUrl="/auth/token", scopes=ROLE_DESCRIPTIONS,
                              auto_error=False,
                              description="A user token from POST /auth/token, or a service "
                              "account's API token. The scopes are roles: an endpoint accepts "
                              "a token holding any one of the roles it lists.")
AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No token, or an expired, invalid or revoked "
          "one"},
    403: {"model": ErrorResponse, "description": "The token's roles do not include one this "
          "endpoint accepts"},
}
ACCOUNT_ERRORS: dict[int | str, dict[str, Any]] = {
    **AUTH_ERRORS,
    400: {"model": ErrorResponse, "description": "Malformed body"},
    404: {"model": ErrorResponse, "description": "Unknown account or token"},
    409: {"model": ErrorResponse, "description": "Conflicts with the account's state"},
    422: {"model": ErrorResponse, "description": "Validation failed"},
    429: {"model": ErrorResponse, "description": "Too many failed attempts",
          "headers": {"Retry-After": RETRY_AFTER_DOC}},
    503: {"model": ErrorResponse, "description": "Accounts database unavailable, or too many "
          "password checks at once (Retry-After)",
          "headers": {"Retry-After": RETRY_AFTER_DOC}},
}


def _ledger(request: Request) -> Ledger:
    ledger: Ledger = request.app.state.ledger
    return ledger


def unauthorized(reason: str) -> ApiError:
    return ApiError(401, f"Not authenticated: {reason}",
                    headers={"WWW-Authenticate": "Bearer"})


def accounts_unavailable(reason: str, retry_after_s: int = 2) -> ApiError:
    return ApiError(503, f"Service unavailable: {reason}",
                    [{"field": "Authorization", "message": f"retry in {retry_after_s} s"}],
                    headers={"Retry-After": str(retry_after_s)})


async def authenticate(request: Request, token: str) -> Principal:
    """The token's principal; raises 401. A stale accounts snapshot is refreshed in the
    background; one that can be read but does not know the token yet is refreshed first."""
    auth = _ledger(request).auth
    try:
        if auth.stale():
            auth.refresh_soon()
        principal = auth.authenticate(token)
        if principal is None:
            await run_in_threadpool(auth.refresh)
            principal = auth.authenticate(token, refreshed=True)
    except AuthUnavailable as e:  # fail closed: never trusted on its signature alone
        raise accounts_unavailable(str(e), auth.retry_after_s()) from None
    except AuthError as e:
        raise unauthorized(str(e)) from None
    assert principal is not None
    return principal


async def _authorize(request: Request, required: SecurityScopes,
                     token: Annotated[str | None, Depends(oauth2)]) -> Principal:
    if token is None:
        raise unauthorized("no bearer token")
    return authorize(request, await authenticate(request, token), required)


def authorize(request: Request, principal: Principal, required: SecurityScopes) -> Principal:
    """``principal``, recorded on the request, if it holds one of the ``required`` roles;
    else 403 naming the roles it has."""
    request.state.principal = principal
    if not principal.may(frozenset(required.scopes)):
        raise ApiError(403, f"Forbidden: needs one of the roles {', '.join(required.scopes)}",
                       [{"field": "Authorization", "message": f"{principal.actor} has the "
                         f"roles {', '.join(sorted(principal.roles)) or '(none)'}"}])
    return principal


def allow(roles: frozenset[str]) -> Any:
    """The dependency of an endpoint that accepts any one of ``roles``."""
    return Security(_authorize, scopes=sorted(roles))


def principal_of(request: Request) -> Principal:
    """The principal :func:`allow` authenticated for this request."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # a route without allow(): a programming error, refused safely
        raise unauthorized("this endpoint declares no role")
    return principal


# -- rate limits ---------------------------------------------------------------------------
T = TypeVar("T")


class AuthRateLimits:
    """Moving-window limits on failed password checks (logins, password changes): per
    username, and per client address. An attempt is counted *before* its password is
    checked: it takes one of the budget's remaining failures while it runs (released if the
    password was right, kept as a failure if not), so concurrent guesses can never check more
    passwords than the limit allows. Once a limit is reached every attempt is refused (429),
    the right password included, until the window moves on."""

    def __init__(self, per_name: str, per_client: str) -> None:
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self.per_name: RateLimitItem = parse(per_name)
        self.per_client: RateLimitItem = parse(per_client)
        self._running: Counter[tuple[str, str]] = Counter()  # attempts being checked

    def _checks(self, name: str, client: str | None) -> list[tuple[RateLimitItem, str, str]]:
        checks = [(self.per_name, "name", name)]
        if client is not None:
            checks.append((self.per_client, "client", client))
        return checks

    def begin(self, name: str, client: str | None = None) -> None:
        """Count an attempt (429 when ``name`` or ``client`` has no failure left, those
        being checked included). Runs on the event loop: no other attempt interleaves."""
        checks = self._checks(name, client)
        for item, kind, key in checks:
            stats = self._limiter.get_window_stats(item, kind, key)
            if stats.remaining - self._running[(kind, key)] <= 0:
                retry = 1  # attempts being checked hold the rest of the budget: a moment
                if stats.remaining <= 0:
                    retry = max(1, int(stats.reset_time - datetime.now(UTC).timestamp()) + 1)
                raise ApiError(429, f"Too many failed attempts: at most {item} per {kind}",
                               [{"field": "username" if kind == "name" else "client",
                                 "message": f"retry in {retry} s"}],
                               headers={"Retry-After": str(retry)})
        for _item, kind, key in checks:
            self._running[(kind, key)] += 1

    def end(self, name: str, client: str | None, *, failed: bool) -> None:
        """The attempt :meth:`begin` counted is over; a failure stays in the window."""
        for item, kind, key in self._checks(name, client):
            self._running[(kind, key)] -= 1
            if self._running[(kind, key)] <= 0:
                del self._running[(kind, key)]
            if failed:
                self._limiter.hit(item, kind, key)

    @asynccontextmanager
    async def attempt(self, name: str, client: str | None) -> AsyncIterator[list[bool]]:
        """``begin`` … ``end``; the body sets ``outcome[0] = True`` when the password was
        wrong. An error of ours (503, …) is not counted as a failure."""
        self.begin(name, client)
        outcome = [False]
        try:
            yield outcome
        finally:
            self.end(name, client, failed=outcome[0])


class PasswordChecks:
    """Bounds the argon2 work (~64 MiB and tens of ms of a core each) running at once:
    ``concurrent`` checks or hashes run, ``queue`` more wait; beyond, 503 with Retry-After
    rather than an unbounded queue (memory) or a thread per guess."""

    def __init__(self, concurrent: int, queue: int, metrics: Metrics | None = None) -> None:
        self.concurrent = concurrent
        self.queue = queue
        self.metrics = metrics
        self._slots = asyncio.Semaphore(concurrent)
        self.waiting = 0
        self.running = 0
        self.peak = 0

    async def run(self, kind: str, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread once a slot is free (``kind`` labels the metric:
        login, password_change, hash)."""
        if self._slots.locked() and self.waiting >= self.queue:
            if self.metrics is not None:
                self.metrics.password_checks_refused.inc()
            raise ApiError(503, "Service unavailable: too many password checks at once",
                           [{"field": "password", "message": "retry in 1 s"}],
                           headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        if self.metrics is not None:
            self.metrics.password_checks.labels(kind).inc()
        try:
            return await run_in_threadpool(fn, *args)
        finally:
            self.running -= 1
            self._slots.release()


def _limits(request: Request) -> AuthRateLimits:
    limits: AuthRateLimits = request.app.state.auth_limits
    return limits


def _password_checks(request: Request) -> PasswordChecks:
    checks: PasswordChecks = request.app.state.password_checks
    return checks


def _client(request: Request) -> str | None:
    """The client address: the peer, or what a configured proxy said
    (OBSLEDGER_FORWARDED_ALLOW_IPS; no header is trusted otherwise)."""
    return request.client.host if request.client else None


async def _strong(password: str, username: str, field: str = "password") -> None:
    """422 unless ``password`` passes the one rule of every password."""
    problem = await run_in_threadpool(password_problem, password, username)
    if problem is not None:
        raise ApiError(422, "Validation failed", [{"field": field, "message": problem}])


class _AccountsRoute(GuardedRoute):
    """A route of this router (authenticated before its body is read, as every route): the
    accounts database unreachable or unreadable (an error of SQLAlchemy) is 503 with
    Retry-After, never a 500."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except SQLAlchemyError as e:
                log.warning("%s %s: accounts database: %s", request.method, request.url.path,
                            e)
                raise ApiError(503, "Service unavailable: the accounts database cannot be "
                               f"read ({type(e).__name__})", headers={"Retry-After": "2"}
                               ) from None
        return handle


# -- models --------------------------------------------------------------------------------
RoleName = Literal["automation", "operator", "viewer", "auditor", "admin"]


class TokenResponse(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int = Field(description="Seconds until the token expires.")


class AccountView(BaseModel):
    id: UUID
    username: str
    kind: Literal["user", "service"]
    roles: list[RoleName]
    created_at: datetime
    created_by: str
    disabled_at: datetime | None = None
    email: str | None = Field(None, description="A user's e-mail address, when given.")


class Me(AccountView):
    actor: str = Field(description="How events record this principal.")
    token_id: str | None = None


PASSWORD_RULE = (f"At least {MIN_PASSWORD_LENGTH} characters, and not easy to guess: zxcvbn's "
                 "strength estimate (the username counting as a known word) must be at least "
                 "3 of 4; a weak one answers 422 saying why.")


class RegisterUser(BaseModel):
    username: str = Field(pattern=USERNAME_PATTERN, examples=["night-operator"])
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=200,
                          examples=["correct horse battery staple"], description=PASSWORD_RULE)
    roles: list[RoleName] = Field(min_length=1, examples=[["operator"]])
    email: EmailStr | None = Field(None, max_length=320, description="The user's e-mail "
                                   "address, kept with the account (optional).")

    model_config = {"json_schema_extra": {"examples": [{
        "username": "night-operator", "password": "correct horse battery staple",
        "roles": ["operator"], "email": "night-operator@observatory.example.org"}]}}


class NewServiceAccount(BaseModel):
    name: str = Field(pattern=USERNAME_PATTERN, examples=["telescope-automation"])
    roles: list[RoleName] = Field(min_length=1, examples=[["automation"]])


class NewServiceToken(BaseModel):
    name: str = Field(min_length=1, max_length=100, examples=["dome-pc-2026"])
    expires_in_days: int | None = Field(None, ge=1, le=3650,
                                        description="Default: no expiry (revoke it instead).")


class ServiceTokenView(BaseModel):
    id: str
    name: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    revoked_by: str | None = None


class IssuedServiceToken(ServiceTokenView):
    token: str = Field(description="The API token. Shown once: store it now.")


class NewPassword(BaseModel):
    current_password: str = Field(min_length=1, max_length=200,
                                  description="Your password now (checked like a login, and "
                                  "rate limited with logins).")
    password: str = Field(min_length=MIN_PASSWORD_LENGTH, max_length=200,
                          description="The new password. " + PASSWORD_RULE)

    model_config = {"json_schema_extra": {"examples": [{
        "current_password": "correct horse battery staple",
        "password": "quasar sextant umbra meridian"}]}}


class RequestRecord(BaseModel):
    id: int
    at: datetime
    principal: str | None
    method: str
    route: str
    path: str
    resource_id: str | None
    client: str | None
    status: int
    duration_ms: float
    command_id: str | None


class RequestRecordPage(BaseModel):
    items: list[RequestRecord]
    total: int
    offset: int = Field(description="Rows skipped (the `Link` header has the neighbouring "
                        "pages).")
    skip: int = Field(description="Deprecated: the same as `offset`.")
    limit: int


def _view(row: dict[str, Any]) -> AccountView:
    return AccountView(**{k: row[k] for k in AccountView.model_fields if k in row})


AccountPath = Annotated[UUID, Path(description="Account id")]


def _account(ledger: Ledger, account_id: UUID, kind: str | None = None) -> dict[str, Any]:
    row = ledger.auth.store.find(account_id=account_id)
    if row is None or (kind is not None and row["kind"] != kind):
        raise ApiError(404, f"Unknown {'service ' if kind == 'service' else ''}account "
                       f"{account_id}")
    return row


# -- routes --------------------------------------------------------------------------------
def accounts_router() -> APIRouter:
    r = APIRouter(tags=[TAG], responses=ACCOUNT_ERRORS, route_class=_AccountsRoute)

    @r.post("/auth/token", response_model=TokenResponse,
            responses={401: {"model": ErrorResponse}, 429: ACCOUNT_ERRORS[429],
                       503: ACCOUNT_ERRORS[503]},
            summary="A user token (OAuth2 password form; expires after 30 minutes by default)",
            description="Form fields `username` and `password`. Failures are limited per "
            "username and per client address (429 with Retry-After), an attempt counting "
            "from before its password is checked; at most OBSLEDGER_AUTH_PASSWORD_CHECKS "
            "passwords are checked at once, a few more wait, beyond that 503 with "
            "Retry-After.")
    async def token(request: Request, username: Annotated[str, Form(max_length=100)],
                    password: Annotated[str, Form(max_length=200)]) -> Any:
        auth = _ledger(request).auth
        async with _limits(request).attempt(username, _client(request)) as wrong:
            try:
                access, expires_in = await _password_checks(request).run(
                    "login", auth.password_login, username, password)
            except AuthError as e:
                wrong[0] = True
                raise unauthorized(str(e)) from None
        return TokenResponse(access_token=access, expires_in=expires_in)

    @r.get("/auth/me", response_model=Me, dependencies=[allow(READERS)],
           summary="The account this token acts as")
    async def me(request: Request) -> Any:
        p = principal_of(request)
        row = await run_in_threadpool(_account, _ledger(request), p.account_id)
        return Me(**_view(row).model_dump(), actor=p.actor, token_id=p.token_id)

    @r.put("/auth/me/password", status_code=204, dependencies=[allow(READERS)],
           summary="Change your password (your earlier tokens stop working)",
           description="Needs `current_password` (a wrong one answers 403; failures count "
           "with failed logins of the same username and client: 429 beyond the limit). The "
           "new password must pass the same rule as at registration (422 saying why).")
    async def change_password(request: Request, body: NewPassword) -> None:
        p = principal_of(request)
        if p.kind != "user":
            raise ApiError(409, "A service account has no password")
        ledger = _ledger(request)
        checks = _password_checks(request)
        async with _limits(request).attempt(p.name, _client(request)) as wrong:
            if not await checks.run("password_change", ledger.auth.check_password,
                                    p.account_id, body.current_password):
                wrong[0] = True
                raise ApiError(403, "Forbidden: the current password is not right",
                               [{"field": "current_password", "message": "incorrect"}])
        await _strong(body.password, p.name)
        hashed = await checks.run("hash", ledger.auth.passwords.hash, body.password)
        await run_in_threadpool(ledger.auth.store.set_password, p.account_id, hashed)
        await run_in_threadpool(ledger.auth.refresh)

    @r.post("/auth/register", status_code=201, response_model=AccountView,
            dependencies=[allow(ADMINS)],
            responses={409: {"model": ErrorResponse}},
            summary="Create a user account with its roles (admin)")
    async def register(request: Request, body: RegisterUser) -> Any:
        ledger = _ledger(request)
        await _strong(body.password, body.username)
        hashed = await _password_checks(request).run("hash", ledger.auth.passwords.hash,
                                                     body.password)
        return _view(await _create(request, body.username, "user", body.roles, hashed,
                                   body.email))

    @r.get("/auth/accounts", response_model=list[AccountView], dependencies=[allow(ADMINS)],
           summary="Every account (admin)")
    async def list_accounts(request: Request) -> Any:
        return [_view(a) for a in await run_in_threadpool(_ledger(request).auth.store.all)]

    @r.put("/auth/accounts/{id}/disabled", response_model=AccountView,
           dependencies=[allow(ADMINS)],
           summary="Disable (true) or enable (false) an account: its tokens stop or resume "
           "working (admin)")
    async def set_disabled(request: Request, id: AccountPath,
                           disabled: Annotated[bool, Query()] = True) -> Any:
        ledger = _ledger(request)
        p = principal_of(request)
        if disabled and id == p.account_id:
            raise ApiError(409, "An administrator cannot disable their own account")
        await run_in_threadpool(_account, ledger, id)
        await run_in_threadpool(ledger.auth.store.set_disabled, id, disabled, p.actor)
        await run_in_threadpool(ledger.auth.refresh)
        return _view(await run_in_threadpool(_account, ledger, id))

    @r.post("/auth/service-accounts", status_code=201, response_model=AccountView,
            dependencies=[allow(ADMINS)],
            responses={409: {"model": ErrorResponse}},
            summary="Create a service account (telescope automation, agents) (admin)")
    async def new_service_account(request: Request, body: NewServiceAccount) -> Any:
        return _view(await _create(request, body.name, "service", body.roles, None))

    @r.post("/auth/service-accounts/{id}/tokens", status_code=201,
            response_model=IssuedServiceToken, dependencies=[allow(ADMINS)],
            summary="Issue a long-lived API token for a service account (admin; shown once)")
    async def issue_token(request: Request, id: AccountPath, body: NewServiceToken) -> Any:
        ledger = _ledger(request)
        account = await run_in_threadpool(_account, ledger, id, "service")
        expires = (datetime.now(UTC) + timedelta(days=body.expires_in_days)
                   if body.expires_in_days else None)
        row = await run_in_threadpool(ledger.auth.store.issue_token, id, body.name, expires,
                                      principal_of(request).actor)
        await run_in_threadpool(ledger.auth.refresh)
        return IssuedServiceToken(**row, token=ledger.auth.signer.service_token(account, row))

    @r.get("/auth/service-accounts/{id}/tokens", response_model=list[ServiceTokenView],
           dependencies=[allow(ADMINS)], summary="A service account's tokens (admin)")
    async def list_tokens(request: Request, id: AccountPath) -> Any:
        ledger = _ledger(request)
        await run_in_threadpool(_account, ledger, id, "service")
        return await run_in_threadpool(ledger.auth.store.tokens, id)

    @r.delete("/auth/service-accounts/{id}/tokens/{token_id}", status_code=204,
              dependencies=[allow(ADMINS)],
              summary="Revoke a service token (admin; refused at once by this process, by "
              "others within OBSLEDGER_AUTH_REFRESH_S)")
    async def revoke_token(request: Request, id: AccountPath,
                           token_id: Annotated[str, Path(max_length=40)]) -> None:
        ledger = _ledger(request)
        found = await run_in_threadpool(ledger.auth.store.revoke_token, id, token_id,
                                        principal_of(request).actor)
        if not found:
            raise ApiError(404, f"Unknown token {token_id} of service account {id}")
        await run_in_threadpool(ledger.auth.refresh)

    @r.get("/audit/requests", response_model=RequestRecordPage, dependencies=[allow(AUDITORS)],
           responses={200: {"description": "A page of the log.", "headers": LINK_HEADER}},
           tags=["audit"], summary="The request audit log, newest first (auditor)",
           description="Every request: time, principal, method, route, resource id, client "
           "address, status, duration, command id. Written in batches (within about a second).")
    async def requests(
        request: Request, response: Response,
        page: Annotated[PageRequest, Depends(paging_with_skip)],
        principal: Annotated[str | None, Query(max_length=120)] = None,
        method: Annotated[str | None, Query(pattern="^[A-Za-z]{1,10}$")] = None,
        route: Annotated[str | None, Query(max_length=300,
                                           examples=["/executed_obs_units/start"])] = None,
        status: Annotated[int | None, Query(ge=100, le=599)] = None,
        resource_id: Annotated[str | None, Query(max_length=200)] = None,
        command_id: Annotated[str | None, Query(max_length=200)] = None,
        since: Annotated[QueryTime | None, Query()] = None,
        until: Annotated[QueryTime | None, Query()] = None,
    ) -> Any:
        log = _ledger(request).request_audit
        await run_in_threadpool(log.flush)
        items, total = await run_in_threadpool(
            lambda: log.query(principal=principal, method=method, route=route, status=status,
                              resource_id=resource_id, command_id=command_id,
                              since=as_utc(since), until=as_utc(until), skip=page.offset,
                              limit=page.limit))
        paged(request, response, page, total)
        return {"items": items, "total": total, "offset": page.offset, "skip": page.offset,
                "limit": page.limit}

    return r


async def _create(request: Request, name: str, kind: Literal["user", "service"],
                  roles: list[RoleName], password_hash: str | None,
                  email: str | None = None) -> dict[str, Any]:
    ledger = _ledger(request)
    try:
        row = await run_in_threadpool(ledger.auth.store.create, name, kind,
                                      [Role(r) for r in roles], password_hash,
                                      principal_of(request).actor, email)
    except AccountExists:
        raise ApiError(409, f"An account named {name!r} exists",
                       [{"field": "username" if kind == "user" else "name",
                         "message": "taken"}]) from None
    await run_in_threadpool(ledger.auth.refresh)
    return row
