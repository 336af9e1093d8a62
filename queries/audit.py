"""Reading the event log as an auditor: who did what, when, on whose behalf, and what the
system knew at a given time — from the log alone, never from the read models."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID

import orjson
from eventsourcing.persistence import Notification

from infra.event_store import EventStore, stored_fields

#: Fields every event carries; the rest of the stored state is the event's data.
PROVENANCE = ("timestamp", "actor", "command_id", "correlation_id", "observed_at",
              "originator_id", "originator_version", "class_version")


def untag(value: Any) -> Any:
    """eventsourcing's tagged JSON (``{"_type_": "datetime_iso", "_data_": …}``) as plain
    JSON: timestamps as ISO 8601 text, UUIDs as their canonical text."""
    if isinstance(value, dict):
        if set(value) == {"_type_", "_data_"}:
            kind, data = value["_type_"], value["_data_"]
            if kind == "uuid_hex":
                return str(UUID(data))
            return untag(data)
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


def _time(value: Any) -> datetime | None:
    try:
        return datetime.fromisoformat(value) if isinstance(value, str) else None
    except ValueError:
        return None


#: A stored state nested deeper than this is shown raw: nested in a page of events it could
#: pass the JSON encoders' limits (orjson: 254 levels). Commands nest at most 32.
RENDER_DEPTH = 100


def _depth(value: Any, limit: int) -> int:
    """How deep ``value`` nests, counted up to ``limit + 1``."""
    if limit < 0 or not isinstance(value, dict | list):
        return 0
    children = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in children), default=0)


def read_state(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """A stored event's state as JSON, or None and why it cannot be shown as JSON: not JSON
    (``NaN`` written by an older version, bytes that are not UTF-8), not an object, or too
    deep to render."""
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return None, f"the stored state is not valid JSON: {e}"
    if not isinstance(state, dict):
        return None, "the stored state is not a JSON object"
    # counting brackets is cheap; only a state with many is walked
    if raw.count(b"{") + raw.count(b"[") > RENDER_DEPTH and \
            _depth(state, RENDER_DEPTH) > RENDER_DEPTH:
        return None, f"the stored state nests deeper than {RENDER_DEPTH} levels"
    return state, None


def _lenient_provenance(raw: bytes) -> dict[str, Any]:
    """The provenance fields of a state that is not valid JSON but that Python's json module
    reads (``NaN``): text fields only, and only text that can be written as UTF-8."""
    state = stored_fields(raw)
    out: dict[str, Any] = {}
    for name in ("timestamp", "actor", "command_id", "correlation_id", "observed_at"):
        value = untag(state.get(name))
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                continue
            out[name] = value
    return out


@dataclass(frozen=True)
class AuditEvent:
    position: int
    aggregate_type: str
    aggregate_id: str
    version: int
    event_type: str
    recorded_at: datetime | None
    observed_at: datetime | None
    actor: str | None
    command_id: str | None
    correlation_id: str | None
    data: dict[str, Any]
    #: The event class's schema version the event was stored in (``class_version``; 1 when
    #: absent). ``data`` is as stored; ``state_at`` upcasts (``docs/EVENT_SCHEMA.md``).
    schema_version: int = 1
    #: An event whose stored state cannot be shown as JSON: why, and its bytes in base64
    #: (``data`` is then empty; the provenance fields are read where Python's json can).
    unreadable: str | None = None
    raw_state: str | None = None

    @classmethod
    def of(cls, n: Notification) -> AuditEvent:
        raw = bytes(n.state)
        parsed, problem = read_state(raw)
        qualname = n.topic.rpartition(":")[2]
        state: dict[str, Any] = untag(parsed) if parsed is not None \
            else _lenient_provenance(raw)
        try:
            schema_version = int(state.get("class_version", 1))
        except (TypeError, ValueError):
            schema_version = 1
        return cls(
            position=n.id, aggregate_type=qualname.partition(".")[0],
            aggregate_id=str(n.originator_id), version=n.originator_version,
            event_type=qualname, recorded_at=_time(state.get("timestamp")),
            observed_at=_time(state.get("observed_at")), actor=_text(state.get("actor")),
            command_id=_text(state.get("command_id")),
            correlation_id=_text(state.get("correlation_id")),
            data={k: v for k, v in state.items() if k not in PROVENANCE}
            if problem is None else {},
            schema_version=schema_version, unreadable=problem,
            raw_state=base64.b64encode(raw).decode() if problem is not None else None)

    def as_json(self) -> dict[str, Any]:
        """Plain JSON values (``data`` is shared, not copied: it is freshly parsed per event).
        An unreadable event also has ``unreadable`` and ``raw_state``."""
        out = {
            "position": self.position, "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id, "version": self.version,
            "event_type": self.event_type,
            "recorded_at": self.recorded_at.isoformat() if self.recorded_at else None,
            "observed_at": self.observed_at.isoformat() if self.observed_at else None,
            "actor": self.actor, "command_id": self.command_id,
            "correlation_id": self.correlation_id, "data": self.data,
            "schema_version": self.schema_version}
        if self.unreadable is not None:
            out["unreadable"] = self.unreadable
            out["raw_state"] = self.raw_state
        return out


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


@dataclass
class EventFilter:
    """All given conditions must hold (times are inclusive from, exclusive to)."""

    aggregate_id: str | None = None
    aggregate_type: str | None = None
    event_type: str | None = None
    actor: str | None = None
    command_id: str | None = None
    correlation_id: str | None = None
    from_position: int = 0
    to_position: int | None = None
    recorded_from: datetime | None = None
    recorded_to: datetime | None = None
    observed_from: datetime | None = None
    observed_to: datetime | None = None

    def matches(self, e: AuditEvent) -> bool:
        if self.aggregate_id and e.aggregate_id != self.aggregate_id:
            return False
        if self.aggregate_type and e.aggregate_type != self.aggregate_type:
            return False
        if self.event_type and self.event_type not in (e.event_type,
                                                       e.event_type.partition(".")[2]):
            return False
        for name in ("actor", "command_id", "correlation_id"):
            wanted = getattr(self, name)
            if wanted and getattr(e, name) != wanted:
                return False
        return (_within(e.recorded_at, self.recorded_from, self.recorded_to)
                and _within(e.observed_at, self.observed_from, self.observed_to))


def _within(t: datetime | None, start: datetime | None, end: datetime | None) -> bool:
    if start is None and end is None:
        return True
    if t is None:
        return False
    return (start is None or t >= start) and (end is None or t < end)


def replay(store: EventStore, f: EventFilter, page_size: int = 5000) -> Iterator[AuditEvent]:
    """The log's events in order, filtered."""
    if f.aggregate_id:  # one aggregate: its own events, not the whole log
        events = [AuditEvent.of(n) for n in _aggregate_notifications(store, f.aggregate_id)]
        yield from (e for e in events if f.matches(e) and e.position > f.from_position
                    and (f.to_position is None or e.position <= f.to_position))
        return
    after = f.from_position
    while True:
        page = store.select_notifications(after, page_size)
        if not page:
            return
        for n in page:
            if f.to_position is not None and n.id > f.to_position:
                return
            e = AuditEvent.of(n)
            if f.matches(e):
                yield e
        after = page[-1].id


def _aggregate_notifications(store: EventStore, aggregate_id: str) -> list[Notification]:
    """An aggregate's stored events with their log positions."""
    uid = UUID(aggregate_id)
    stored = store.recorder.select_events(uid)
    out = []
    for s in stored:
        position = store.position_of(uid, s.originator_version)
        out.append(Notification(id=position or 0, originator_id=s.originator_id,
                                originator_version=s.originator_version, topic=s.topic,
                                state=s.state))
    return out


class AggregateAt(NamedTuple):
    """What :func:`state_at` found."""

    state: dict[str, Any] | None
    events: list[AuditEvent]
    #: Why the state stops short of ``events`` (an event that cannot be applied), or None.
    incomplete: str | None = None


def state_at(store: EventStore, aggregate_id: str, *, version: int | None = None,
             recorded_at: datetime | None = None, observed_at: datetime | None = None,
             ) -> AggregateAt:
    """The aggregate as it was after ``version`` events, as the system knew it at
    ``recorded_at``, and as far as it had happened at the telescope by ``observed_at`` (the
    longest prefix of its events meeting every bound given; observed — or, without an
    observation time, recorded — by then); and the events that produced it. An event that
    cannot be applied ends the state there (``incomplete`` says which and why)."""
    chosen: list[tuple[Notification, AuditEvent]] = []
    for n in _aggregate_notifications(store, aggregate_id):
        e = AuditEvent.of(n)
        if version is not None and e.version > version:
            break
        if recorded_at is not None and (e.recorded_at is None or e.recorded_at > recorded_at):
            break
        when = e.observed_at or e.recorded_at
        if observed_at is not None and (when is None or when > observed_at):
            break
        chosen.append((n, e))
    aggregate: Any = None
    incomplete = None
    for i, (n, _) in enumerate(chosen):
        try:
            aggregate = store.decode(n).mutate(aggregate)
        except Exception as exc:  # a stored event this version cannot read or apply
            reason = str(exc).encode("utf-8", "backslashreplace").decode("utf-8")
            incomplete = (f"the event at position {n.id} cannot be applied "
                          f"({type(exc).__name__}: {reason}); the state is as before it")
            del chosen[i + 1:]
            break
    state = None
    if aggregate is not None:
        try:
            state = aggregate_state(aggregate)
        except (TypeError, ValueError) as exc:  # e.g. nested beyond what orjson writes
            incomplete = incomplete or f"the state cannot be shown as JSON: {exc}"
        if state is not None and _depth(state, RENDER_DEPTH) > RENDER_DEPTH:
            state = None
            incomplete = incomplete or f"the state nests deeper than {RENDER_DEPTH} levels"
    return AggregateAt(state, [e for _, e in chosen], incomplete)


def aggregate_state(aggregate: Any) -> dict[str, Any]:
    """An aggregate's attributes as plain JSON values."""
    raw = {k.lstrip("_"): v for k, v in vars(aggregate).items()
           if k not in ("_pending_events",)}
    return orjson.loads(orjson.dumps(raw, default=_plain))  # type: ignore[no-any-return]


def _plain(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return sorted(value)
    return str(value)


def trail(store: EventStore, entity_id: str, page_size: int = 5000) -> list[dict[str, Any]]:
    """Every event of the entity and every command that touched it, oldest first: the event,
    who, which command (its type from the command's receipt) and what it changed."""
    events = {e.position: e for e in replay(store, EventFilter(aggregate_id=entity_id))}
    commands: dict[str, str] = {}
    after = 0
    while True:  # receipts: the commands that named the entity, and their types
        page = store.select_notifications(after, page_size)
        if not page:
            break
        for n in page:
            if n.topic.endswith(":CommandReceipt.Recorded"):
                e = AuditEvent.of(n)
                if entity_id in e.data.get("entity_ids", []) and e.command_id:
                    commands[e.command_id] = str(e.data.get("command_type"))
        after = page[-1].id
    out = []
    for position in sorted(events):
        e = events[position]
        out.append({**e.as_json(), "command_type": commands.get(e.command_id or "")})
    return out
