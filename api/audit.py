"""Read-only HTTP for auditors, under ``/audit``: the replay, state, trail and verify tools of
the command line, over the event log alone (never the read models). Included by
``api.app.create_app``. Access control (the ``auditor`` role) is added with authentication."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, TypeVar
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.accounts import allow
from api.deps import ERRORS, ledger_of, not_found
from api.errors import ApiError, QueryTime, as_utc
from api.paging import LINK_HEADER, next_after
from api.routing import GuardedRoute
from domain.accounts import AUDITORS
from infra.audit_chain import AnchorLog, verify
from infra.event_store import STORE_UNREACHABLE, EventStore, StoreUnavailable
from queries.audit import EventFilter, replay, state_at, trail

TAG = "audit"
T = TypeVar("T")

_EVENT_EXAMPLE: dict[str, Any] = {
    "position": 1834, "aggregate_type": "ExecutedObsUnit",
    "aggregate_id": "6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21", "version": 2,
    "event_type": "ExecutedObsUnit.Finished", "recorded_at": "2026-11-22T04:51:07.113420+00:00",
    "observed_at": "2026-11-22T04:50:59+00:00", "actor": "night-script",
    "command_id": "night-1121-ou-0412-finish", "correlation_id": "night-1121",
    "data": {"status": "success", "end_time": "2026-11-22T04:50:59+00:00",
             "metadata": {"exposures": 12}},
    "schema_version": 1}


class AuditEventView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [_EVENT_EXAMPLE]})

    position: int = Field(description="Position in the global log.")
    aggregate_type: str
    aggregate_id: str
    version: int = Field(description="The aggregate's version after this event.")
    event_type: str
    recorded_at: datetime | None = Field(description="When the event was recorded.")
    observed_at: datetime | None = Field(description="Telescope time, as the client said.")
    actor: str | None
    command_id: str | None
    correlation_id: str | None
    data: dict[str, Any] = Field(description="The event's fields as stored (empty when the "
                                 "event is `unreadable`).")
    schema_version: int = Field(description="The event class version it was stored in "
                                "(docs/EVENT_SCHEMA.md).")
    unreadable: str | None = Field(None, description="Why the stored state cannot be shown "
                                   "as JSON (e.g. a NaN written by an older version); "
                                   "absent otherwise.")
    raw_state: str | None = Field(None, description="With `unreadable`: the stored state's "
                                  "bytes, base64.")


class AuditEventPage(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "items": [_EVENT_EXAMPLE], "limit": 100, "next_after": None}]})

    items: list[AuditEventView]
    limit: int
    next_after: int | None = Field(description="More may follow: pass it as `after` for the "
                                   "next page. None at the end of the log.")


class AuditStateView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "aggregate_id": "6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21",
        "state": {"id": "6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21", "version": 1,
                  "obs_unit_id": "OU-2026-0412", "instrument": "HARPS", "status": "running"},
        "events": [{**_EVENT_EXAMPLE, "version": 1, "event_type": "ExecutedObsUnit.Started"}]}]})

    aggregate_id: str
    state: dict[str, Any] = Field(description="The aggregate as it was (today's model: old "
                                  "events are upcast).")
    events: list[AuditEventView] = Field(description="The events that produced it.")
    incomplete: str | None = Field(None, description="Why `state` stops before the last of "
                                   "`events` (an event that cannot be applied); absent "
                                   "otherwise.")


class AuditTrailRow(AuditEventView):
    command_type: str | None = Field(description="From the command's receipt.")


class AuditTrailView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "entity_id": "6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21",
        "items": [{**_EVENT_EXAMPLE, "command_type": "executed_obs_unit.finish"}]}]})

    entity_id: str
    items: list[AuditTrailRow]


class FindingView(BaseModel):
    position: int
    kind: str = Field(description="modified | deleted | inserted | anchor-mismatch | "
                      "chain-missing")
    detail: str


class VerificationView(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"ok": True, "events": 120344, "chained_head": 120344, "anchors_checked": 12,
         "finding": None},
        {"ok": False, "events": 17, "chained_head": 40, "anchors_checked": 1,
         "finding": {"position": 17, "kind": "modified", "detail": "the stored event (or the "
                     "chain row) does not match its chained hash"}}]})

    ok: bool
    events: int
    chained_head: int
    anchors_checked: int
    finding: FindingView | None


def _store(request: Request) -> EventStore:
    return ledger_of(request).event_store()


async def _read(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run an event-log read in a worker thread; a database that does not answer is 503."""
    def call() -> T:
        try:
            return fn(*args, **kwargs)
        except StoreUnavailable:
            raise
        except STORE_UNREACHABLE as e:
            raise StoreUnavailable(f"event store unavailable: {e}") from e
    return await run_in_threadpool(call)


def _time(name: str) -> Any:
    return Query(description=f"{name} (ISO 8601; UTC if no offset)")


AggregatePath = Annotated[UUID, Path(description="Aggregate (entity) id")]


def audit_router() -> APIRouter:
    r = APIRouter(route_class=GuardedRoute, prefix="/audit", tags=[TAG],
                  dependencies=[allow(AUDITORS)])

    @r.get("/events", response_model=AuditEventPage, responses={
               **ERRORS, 200: {"description": "A page of the log.", "headers": LINK_HEADER}},
           summary="The event log in order, filtered (replay), a page at a time",
           description="Every filter given must hold; times are inclusive from, exclusive "
           "to. Pages follow the log: pass `next_after` as `after`. A narrow filter over a "
           "long log scans it, so it may take a while.")
    async def events(
        request: Request, response: Response,
        aggregate_id: UUID | None = None,
        aggregate_type: Annotated[str | None, Query(max_length=100,
                                                    examples=["ExecutedObsUnit"])] = None,
        event_type: Annotated[str | None, Query(
            max_length=200, description="`Aggregate.Event` or just `Event`",
            examples=["ExecutedObsUnit.Finished"])] = None,
        actor: Annotated[str | None, Query(max_length=255)] = None,
        command_id: Annotated[str | None, Query(max_length=255)] = None,
        correlation_id: Annotated[str | None, Query(max_length=255)] = None,
        after: Annotated[int, Query(ge=0, le=2**62, description="Log position to start "
                                    "after")] = 0,
        to_position: Annotated[int | None, Query(ge=0, le=2**62,
                                                 description="Up to this position")] = None,
        recorded_from: Annotated[QueryTime | None, _time("Recorded at or after")] = None,
        recorded_to: Annotated[QueryTime | None, _time("Recorded before")] = None,
        observed_from: Annotated[QueryTime | None, _time("Observed at or after")] = None,
        observed_to: Annotated[QueryTime | None, _time("Observed before")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Any:
        f = EventFilter(
            aggregate_id=str(aggregate_id) if aggregate_id else None,
            aggregate_type=aggregate_type, event_type=event_type, actor=actor,
            command_id=command_id, correlation_id=correlation_id, from_position=after,
            to_position=to_position, recorded_from=as_utc(recorded_from),
            recorded_to=as_utc(recorded_to), observed_from=as_utc(observed_from),
            observed_to=as_utc(observed_to))
        store = _store(request)
        page = await _read(lambda: list(itertools.islice(replay(store, f), limit + 1)))
        more = len(page) > limit
        items = [e.as_json() for e in page[:limit]]
        position = items[-1]["position"] if more else None
        next_after(request, response, position)
        return {"items": items, "limit": limit, "next_after": position}

    @r.get("/state/{aggregate_id}", response_model=AuditStateView, responses=ERRORS,
           summary="An aggregate as it was: after `version` events, as known at "
           "`recorded_at`, as it had happened by `observed_at`",
           description="The longest prefix of the aggregate's events that meets every bound "
           "given (`version`, `recorded_at`, `observed_at`); none gives the current state. "
           "404 when the aggregate had no events by then.")
    async def state(
        request: Request, aggregate_id: AggregatePath,
        version: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
        recorded_at: Annotated[QueryTime | None, _time("What the system knew at")] = None,
        observed_at: Annotated[QueryTime | None, _time("What had happened by")] = None,
    ) -> Any:
        given = any(v is not None for v in (version, recorded_at, observed_at))
        store = _store(request)
        found = await _read(state_at, store, str(aggregate_id), version=version,
                            recorded_at=as_utc(recorded_at), observed_at=as_utc(observed_at))
        if found.state is None and found.incomplete is None:
            raise ApiError(404, f"aggregate {aggregate_id} had no events by then"
                           if found.events or given else f"aggregate {aggregate_id} not found")
        return {"aggregate_id": str(aggregate_id), "state": found.state or {},
                "events": [e.as_json() for e in found.events],
                "incomplete": found.incomplete}

    @r.get("/trail/{entity_id}", response_model=AuditTrailView, responses=ERRORS,
           summary="Every event and command that touched an entity, oldest first",
           description="Each event with its actor, command id and type (from the command's "
           "receipt), correlation id and the fields it changed. Scans the log for receipts.")
    async def entity_trail(request: Request, entity_id: Annotated[UUID, Path(
            description="Entity (aggregate) id")]) -> Any:
        store = _store(request)
        rows = await _read(trail, store, str(entity_id))
        if not rows:
            raise not_found("entity", entity_id)
        return {"entity_id": str(entity_id), "items": rows}

    @r.get("/verify", response_model=VerificationView, responses=ERRORS,
           summary="Recompute the audit hash chain from the log; the first tampered position",
           description="Checks every stored event against the chain table and the anchors "
           "written outside the database. 200 either way: `ok` false names the first "
           "modified, deleted, inserted or reordered position. Reads the whole log.")
    async def verify_chain(request: Request) -> Any:
        ledger = ledger_of(request)
        store = _store(request)
        result = await _read(verify, store, ledger.engine,
                             AnchorLog(ledger.settings.anchors_file))
        return result.as_json()

    return r
