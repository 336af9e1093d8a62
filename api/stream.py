"""``GET /stream``: what changes in the read models, as server-sent events (sse-starlette).

The messages and their guarantees are ``queries.stream``'s. Authenticated like every query
(any role that may read): a bearer token, or — for a browser's ``EventSource``, which cannot
send headers — the short-lived, HttpOnly stream ticket cookie that ``POST /stream/session``
sets for the bearer token of the request (never a token in the URL).
"""

from __future__ import annotations

from collections import Counter
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Query, Request, Response, Security
from fastapi.security import SecurityScopes
from pydantic import BaseModel, Field
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.background import BackgroundTask

from api.accounts import (
    AUTH_ERRORS,
    accounts_unavailable,
    allow,
    authenticate,
    authorize,
    oauth2,
    principal_of,
    unauthorized,
)
from api.errors import ApiError, error_doc
from api.routing import GuardedRoute
from bootstrap.ledger import Ledger
from domain.accounts import READERS, Principal
from infra.tokens import AuthError, AuthUnavailable
from queries.stream import Message

TAG = "live stream"
TICKET_COOKIE = "obsledger_stream"
#: A stream ticket's lifetime (never beyond the token it was made from).
TICKET_TTL_S = 600.0
#: Comment lines that keep an idle connection open through proxies.
PING_S = 15
#: How long a client refused for holding too many streams is told to wait.
BUSY_RETRY_S = 5


class StreamConnections:
    """Open ``/stream`` connections per account, at most ``limit`` each: one account's
    scripts or forgotten tabs cannot hold every connection the server has. Counted on the
    event loop (no lock needed); a connection's slot is released exactly once, whether its
    stream ended, the client went away, or the response never started."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._open: Counter[UUID] = Counter()

    def open(self, principal: Principal) -> Any:
        """A slot for one more stream of ``principal`` (429 beyond the limit), and the
        function that gives it back."""
        account = principal.account_id
        if self._open[account] >= self.limit:
            raise ApiError(429, f"Too many open streams: at most {self.limit} per account",
                           [{"field": "stream", "message": "close a stream, or retry in "
                             f"{BUSY_RETRY_S} s"}],
                           headers={"Retry-After": str(BUSY_RETRY_S)})
        self._open[account] += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._open[account] -= 1
                if self._open[account] <= 0:
                    del self._open[account]

        return release


class StreamSession(BaseModel):
    expires_in: int = Field(description="Seconds the stream ticket cookie is valid.")
    position: int = Field(description="The stream's position now: where a client that has "
                          "just read the queries resumes (`GET /stream?after=`).")


async def _stream_principal(
    request: Request, required: SecurityScopes,
    token: Annotated[str | None, Depends(oauth2)],
) -> Principal:
    """A bearer token, else the stream ticket cookie; 401/403 in the error format (called
    before the body is read by ``GuardedRoute`` too, with the bearer token only)."""
    ticket = request.cookies.get(TICKET_COOKIE)
    if token is not None:
        principal = await authenticate(request, token)
    elif ticket is not None:
        ledger: Ledger = request.app.state.ledger
        auth = ledger.auth
        try:
            claims = auth.signer.decode_stream_ticket(ticket)
            principal_or_none = auth.principal(claims, refreshed=True)
        except AuthUnavailable as e:
            raise accounts_unavailable(str(e), auth.retry_after_s()) from None
        except AuthError as e:
            raise unauthorized(str(e)) from None
        assert principal_or_none is not None
        principal = principal_or_none
    else:
        raise unauthorized("no bearer token and no stream ticket (POST /stream/session)")
    return authorize(request, principal, required)


def _event(m: Message) -> ServerSentEvent:
    return ServerSentEvent(data=m.data.decode(), event=m.event,
                           id=None if m.position is None else str(m.position))


def stream_router() -> APIRouter:
    r = APIRouter(route_class=GuardedRoute)

    @r.get("/stream", tags=[TAG],
           dependencies=[Security(_stream_principal, scopes=sorted(READERS))],
           response_class=EventSourceResponse,
           responses={200: {"content": {"text/event-stream": {}},
                            "description": "Server-sent events (docs/OPERATIONS.md, \"The "
                            "live stream\")."},
                      422: error_doc("Bad Last-Event-ID or after"),
                      429: error_doc("The account holds as many open streams as it may "
                                     "(Retry-After)", retry_after=True),
                      **AUTH_ERRORS},
           summary="What changes in the read models, live (server-sent events)",
           description="`change` messages carry the log position as their `id` and the rows "
           "an event inserted or updated per read model; `command` messages (no id) a "
           "command accepted by this server (`pending: true`, with the rows it will create) "
           "and again once applied or rejected; `download_progress` messages (no id) the "
           "downloader's live bytes, B/s and ETA per running job, every second. Resume with "
           "`Last-Event-ID` (or `after`, for a first connection): no change after it is "
           "lost. Authenticated by a bearer token or the stream ticket cookie of "
           "`POST /stream/session`.")
    async def stream(
        request: Request,
        after: Annotated[int | None, Query(
            ge=0, description="Start after this log position (e.g. the "
            "`read_model_position` of the queries just read); default: from now on. "
            "`Last-Event-ID` wins.")] = None,
        last_event_id: Annotated[str | None, Header(
            alias="Last-Event-ID", description="The id of the last message received "
            "(a log position): resume after it.")] = None,
    ) -> Any:
        if last_event_id is not None and last_event_id.strip():
            if not last_event_id.strip().isdigit() or len(last_event_id.strip()) > 19:
                raise ApiError(422, "Validation failed", [{
                    "field": "Last-Event-ID", "message": "a log position (a whole number)"}])
            after = int(last_event_id.strip())
        ledger: Ledger = request.app.state.ledger
        connections: StreamConnections = request.app.state.stream_connections
        release = connections.open(principal_of(request))

        async def events() -> Any:
            try:
                async for m in ledger.feed.subscribe(after):
                    yield _event(m)
            finally:
                release()

        return EventSourceResponse(events(), ping=PING_S, background=BackgroundTask(release),
                                   headers={"Cache-Control": "no-store",
                                            "X-Accel-Buffering": "no"})

    @r.post("/stream/session", tags=[TAG], dependencies=[allow(READERS)],
            response_model=StreamSession, responses={**AUTH_ERRORS},
            summary="Set the stream ticket cookie for a browser's EventSource",
            description="For the bearer token of this request: an HttpOnly, SameSite=Strict "
            "cookie valid for `/stream` only, for at most 10 minutes and never beyond the "
            "token; it stops being accepted as soon as the token's account is disabled or "
            "its tokens revoked. Call it again before it expires.")
    async def session(request: Request, response: Response,
                      token: Annotated[str | None, Depends(oauth2)]) -> Any:
        ledger: Ledger = request.app.state.ledger
        assert token is not None  # allow() authenticated it
        ledger.feed.start()
        ticket, ttl = ledger.auth.signer.stream_ticket(ledger.auth.signer.decode(token),
                                                       TICKET_TTL_S)
        response.set_cookie(TICKET_COOKIE, ticket, max_age=ttl, path="/stream",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return StreamSession(expires_in=ttl, position=ledger.feed.position)

    return r
