"""Reading the event log as an auditor: who did what, when, on whose behalf, and what the
system knew at a given time — from the log alone, never from the read models."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import orjson
from eventsourcing.persistence import Notification

from infra.event_store import EventStore

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
    return datetime.fromisoformat(value) if isinstance(value, str) else None


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

    @classmethod
    def of(cls, n: Notification) -> AuditEvent:
        state = untag(orjson.loads(bytes(n.state)))
        qualname = n.topic.rpartition(":")[2]
        return cls(
            position=n.id, aggregate_type=qualname.partition(".")[0],
            aggregate_id=str(n.originator_id), version=n.originator_version,
            event_type=qualname, recorded_at=_time(state.get("timestamp")),
            observed_at=_time(state.get("observed_at")), actor=state.get("actor"),
            command_id=state.get("command_id"), correlation_id=state.get("correlation_id"),
            data={k: v for k, v in state.items() if k not in PROVENANCE},
            schema_version=int(state.get("class_version", 1)))

    def as_json(self) -> dict[str, Any]:
        """Plain JSON values (``data`` is shared, not copied: it is freshly parsed per event)."""
        return {
            "position": self.position, "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id, "version": self.version,
            "event_type": self.event_type,
            "recorded_at": self.recorded_at.isoformat() if self.recorded_at else None,
            "observed_at": self.observed_at.isoformat() if self.observed_at else None,
            "actor": self.actor, "command_id": self.command_id,
            "correlation_id": self.correlation_id, "data": self.data,
            "schema_version": self.schema_version}


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


def state_at(store: EventStore, aggregate_id: str, *, version: int | None = None,
             recorded_at: datetime | None = None, observed_at: datetime | None = None,
             ) -> tuple[dict[str, Any] | None, list[AuditEvent]]:
    """The aggregate as it was after ``version`` events, or as the system knew it at
    ``recorded_at``, or as far as it had happened at the telescope by ``observed_at`` (the
    longest prefix of its events observed — or, without an observation time, recorded — by
    then); and the events that produced it."""
    notifications = _aggregate_notifications(store, aggregate_id)
    chosen: list[Notification] = []
    for n in notifications:
        e = AuditEvent.of(n)
        if version is not None and e.version > version:
            break
        if recorded_at is not None and (e.recorded_at is None or e.recorded_at > recorded_at):
            break
        when = e.observed_at or e.recorded_at
        if observed_at is not None and (when is None or when > observed_at):
            break
        chosen.append(n)
    aggregate: Any = None
    for n in chosen:
        aggregate = store.decode(n).mutate(aggregate)
    return (None if aggregate is None else aggregate_state(aggregate),
            [AuditEvent.of(n) for n in chosen])


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
