"""The event store: one ``eventsourcing`` application holding every aggregate.

SQLite is the embedded default, PostgreSQL the production store; ``EventStore.in_memory()``
(eventsourcing's POPO recorder) keeps the same contract in this process's memory, for the
handler unit tests. One application means one global notification log (the "log position"
of every event), which projectors follow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, cast
from uuid import UUID

import orjson
import psycopg
import psycopg_pool
from eventsourcing.application import AggregateNotFoundError, Application
from eventsourcing.domain import Aggregate
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    Environment,
    IntegrityError,
    JSONTranscoder,
    Mapper,
    Notification,
    PersistenceError,
    ProgrammingError,
    Recording,
    StoredEvent,
    Transcoder,
    UUIDAsHex,
)
from eventsourcing.popo import POPOApplicationRecorder, POPOFactory
from eventsourcing.postgres import PostgresApplicationRecorder
from eventsourcing.utils import EnvType, retry
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed, Identifier

from infra.settings import Settings

__all__ = [
    "MEMORY",
    "EventStore",
    "IntegrityError",
    "MemoryRecorder",
    "ObservatoryLedger",
    "PersistenceError",
    "StoreUnavailable",
]


class StoreUnavailable(Exception):
    """The event store cannot be reached; commands wait in the journal."""


#: Errors that mean "the database is not reachable now" rather than "this write is wrong".
STORE_UNREACHABLE: tuple[type[BaseException], ...] = (
    PersistenceError, OSError, psycopg.Error, psycopg_pool.PoolTimeout)


class ChunkedInsertRecorder(PostgresApplicationRecorder):
    """eventsourcing's PostgreSQL recorder, inserting without psycopg's pipeline mode.

    The stock ``insert_events`` sends all events as one array parameter inside a pipeline;
    with ~20,000 events (one bulk file registration) the pipeline never returns: the server
    waits for the rest of the statement, the client for its results (measured here with
    psycopg 3.3.9: 10,000 events in 1.2 s, 20,000 hung for good). This inserts in statements
    of at most ``chunk`` events, in one transaction under the same table lock, so the save is
    still atomic and insert order is still commit order. Connection errors are not retried
    here (the dispatcher backs off and retries the whole batch).

    Each statement sends four parallel arrays in psycopg's binary format instead of one array
    of the stored-event composite type in text format: dumping the composite array as text
    (bytea states hex-encoded) was most of a bulk registration's insert (measured here, 20,000
    events: ~22,000 events/s as composites, ~110,000/s as binary arrays).
    """

    chunk = 2000

    def insert_events(
        self, stored_events: Sequence[StoredEvent], **kwargs: Any
    ) -> Sequence[int] | None:
        ids: list[int] = []
        with self.datastore.get_connection() as conn, conn.transaction(), \
                conn.cursor() as curs:
            if not stored_events:
                return ids
            self._lock_table(curs)
            self._notify_channel(curs)
            if self._insert_sql is None:
                self._insert_sql = SQL(
                    "INSERT INTO {schema}.{table} "
                    "(originator_id, originator_version, topic, state) "
                    "SELECT * FROM unnest(%b::uuid[], %b::int8[], %b::text[], %b::bytea[]) "
                    "RETURNING notification_id").format(
                    schema=Identifier(self.datastore.schema),
                    table=Identifier(self.events_table_name))
            for i in range(0, len(stored_events), self.chunk):
                part = stored_events[i:i + self.chunk]
                curs.execute(self._insert_sql, (
                    [e.originator_id for e in part], [e.originator_version for e in part],
                    [e.topic for e in part], [e.state for e in part]))
                rows = curs.fetchall()
                if len(rows) != len(part):
                    raise ProgrammingError(f"inserted {len(part)} events, got {len(rows)} "
                                           "notification ids")
                ids.extend(row["notification_id"] for row in rows)
        return ids

    _insert_sql: Composed | None = None

    @retry((psycopg.InterfaceError, psycopg.OperationalError), max_attempts=10, wait=0.2)
    def select_notifications(self, start: int | None, limit: int, stop: int | None = None,
                             topics: Sequence[str] = (), *, inclusive_of_start: bool = True,
                             ) -> Sequence[Notification]:
        """The stock read, with plain tuple rows and the columns named: every page the
        projectors, the relay, the audit chain and rebuilds read goes through here, and
        building a dict per row was a tenth of a rebuild's time."""
        if stop is not None or topics or start is None:
            return super().select_notifications(start, limit, stop, topics,
                                                inclusive_of_start=inclusive_of_start)
        if self._page_sql is None:
            self._page_sql = SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state "
                "FROM {schema}.{table} WHERE notification_id >= %s "
                "ORDER BY notification_id LIMIT %s").format(
                schema=Identifier(self.datastore.schema),
                table=Identifier(self.events_table_name))
        first = start if inclusive_of_start else start + 1
        with self.datastore.get_connection() as conn, \
                conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(self._page_sql, (first, limit), prepare=True)
            return [Notification(id=i, originator_id=o, originator_version=v, topic=t,
                                 state=bytes(b))
                    for i, o, v, t, b in curs.fetchall()]

    _page_sql: Composed | None = None


class MemoryRecorder(POPOApplicationRecorder):
    """eventsourcing's in-memory (POPO) recorder, answering the two look-ups the SQL
    recorders answer with a query: an event's log position, and which aggregates exist.

    The log position of the n-th stored event is n, as in the SQL stores (from 1, no gaps).
    """

    def position_of(self, aggregate_id: UUID, version: int) -> int | None:
        with self._database_lock:
            index = self._stored_events_index.get(str(aggregate_id), {}).get(version)
            return None if index is None else index + 1

    def existing(self, aggregate_ids: Iterable[UUID]) -> set[UUID]:
        """Which of ``aggregate_ids`` have a first event."""
        with self._database_lock:
            events = self._stored_events_index
            return {a for a in aggregate_ids if 1 in events.get(str(a), {})}


class MemoryFactory(POPOFactory):
    """eventsourcing's POPO persistence module, with :class:`MemoryRecorder`."""

    def application_recorder(self) -> MemoryRecorder:
        return MemoryRecorder()


#: The kind of the in-memory event store (:meth:`EventStore.in_memory`).
MEMORY = "memory"
_MEMORY_ENV = {"PERSISTENCE_MODULE": f"{__name__}:{MemoryFactory.__qualname__}"}


#: Types orjson writes exactly as the json module does.
_AS_IS = frozenset({str, int, bool, type(None)})


class _Unusual(Exception):
    """A value orjson cannot write as the json module does (NaN, infinities)."""


class EventStateTranscoder(JSONTranscoder):
    """eventsourcing's JSON transcoder, with event states written by orjson.

    The bytes are the stock transcoder's (compact separators, UTF-8, ``{"_type_", "_data_"}``
    for UUIDs, datetimes and decimals), so reading, hashing (the audit chain) and rebuilding
    are unchanged; what orjson would write differently (NaN and infinities, integers beyond
    64 bits, keys that are not strings, unregistered types) goes to the stock encoder. Writing
    a raw data file's event took ~13.5 us with the json module and ~7 us this way: a fifth of
    a bulk registration's dispatch.
    """

    _OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS

    def encode(self, obj: Any) -> bytes:
        try:
            return orjson.dumps(self._tagged(obj), default=self._encode_obj,
                                option=self._OPTIONS)
        except (_Unusual, TypeError):  # orjson.JSONEncodeError is a TypeError
            return super().encode(obj)

    def _tagged(self, o: Any) -> Any:
        """``o`` with its UUIDs, datetimes and decimals as the stock transcoder writes them
        (orjson would write a UUID as a plain string, never asking ``default``) and its
        floats as the json module writes them (orjson writes 1e-08 as 1e-8)."""
        t = type(o)
        if t in _AS_IS:
            return o
        if t is dict:
            tagged = self._tagged
            return {k: v if type(v) in _AS_IS else tagged(v) for k, v in o.items()}
        if t in self.types:  # UUIDs, datetimes, decimals
            return self._encode_obj(o)
        if isinstance(o, UUID):
            return self._encode_obj(o)
        if isinstance(o, list | tuple):
            return [self._tagged(v) for v in o]
        if isinstance(o, dict):
            return {k: self._tagged(v) for k, v in o.items()}
        if isinstance(o, float):
            if not math.isfinite(o):
                raise _Unusual
            return orjson.Fragment(float.__repr__(o))
        return o


def stored_fields(state: bytes) -> dict[str, Any]:
    """A stored event state's fields, however it was written: what orjson reads, else what
    Python's json module reads (``NaN`` and infinities, which older versions let through),
    else nothing. For provenance and headers; the audit tools show such an event raw."""
    try:
        fields = orjson.loads(state)
    except orjson.JSONDecodeError:
        try:
            fields = json.loads(state)
        except (ValueError, RecursionError):
            return {}
    return fields if isinstance(fields, dict) else {}


def event_transcoder() -> EventStateTranscoder:
    """The application's transcoder: eventsourcing's transcodings (UUIDs, decimals,
    datetimes), written by orjson."""
    transcoder = EventStateTranscoder()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(transcoding)
    return transcoder


def event_mapper() -> Mapper[UUID]:
    """The application's mapper (stored event ⇄ domain event, upcasting on the way), without
    an application or a database: what a rebuild's decoder processes decode with."""
    return Mapper(transcoder=event_transcoder())


class ObservatoryLedger(Application[UUID]):
    """The single application whose notification log is the ledger of all operations."""

    name = "ObsLedger"

    def construct_transcoder(self) -> Transcoder:
        return event_transcoder()

    def construct_env(self, name: str, env: EnvType | None = None) -> Environment:
        # Only the configuration we pass: never pick up stray eventsourcing variables.
        return Environment(name, dict(env or {}))


class EventStore:
    """What the rest of obsledger needs from the event store, whichever database backs it:
    SQLite or PostgreSQL as ``settings.store`` says, or this process's memory
    (:meth:`in_memory`)."""

    def __init__(self, settings: Settings, *, in_memory: bool = False) -> None:
        self.settings = settings
        self.kind: str = MEMORY if in_memory else settings.store
        env = _MEMORY_ENV if in_memory else settings.event_store_env()
        try:
            self.app = ObservatoryLedger(env=env)
        except PersistenceError as e:
            raise StoreUnavailable(str(e)) from e
        self.recorder: Any = self.app.recorder
        self.mapper = self.app.mapper
        if isinstance(self.recorder, PostgresApplicationRecorder):
            # psycopg_pool retries a lost connection after 1, 2, 4, 8, 16… s for 5 minutes:
            # after an outage of 45 s its next try came ~18 s after the database was back,
            # and nothing was applied meanwhile. Given up after the connect timeout instead,
            # a connection is made again as soon as someone asks for one (the dispatcher
            # retries every few seconds at most), so the backlog drains within ~1-2 s.
            self.recorder.datastore.pool.reconnect_timeout = float(
                settings.postgres_connect_timeout)

    @classmethod
    def in_memory(cls, settings: Settings | None = None) -> EventStore:
        """An event store held in this process's memory (eventsourcing's POPO recorder), with
        the same contract as the SQL stores: atomic saves, ``IntegrityError`` on a collision
        (a replayed command's receipt, a duplicate id), log positions from 1, notifications.
        Nothing survives the process: for handler unit tests (tests/unit) and experiments,
        never beside a journal or read models that outlive it."""
        return cls(settings if settings is not None else Settings(), in_memory=True)

    # -- writing -------------------------------------------------------------------------
    def save(self, *events: Any) -> list[Recording[UUID]]:
        """Append events atomically (one transaction), returning their log positions.

        Raises ``IntegrityError`` when an event collides with a stored one (a replayed command's
        receipt, a duplicate id, a concurrent writer) and ``StoreUnavailable`` when the
        database cannot be reached.

        The events go straight to the application's event store (mapper and recorder):
        ``Application.save`` would only add what this application does not use (no snapshots,
        no aggregate cache), and its runtime-checked protocol tests on every event were a
        tenth of a bulk registration's dispatch.
        """
        try:
            return self.app.events.put(list(events))
        except IntegrityError:
            raise
        except STORE_UNREACHABLE as e:
            raise StoreUnavailable(f"event store unavailable: {e}") from e

    # -- reading -------------------------------------------------------------------------
    def get(self, aggregate_id: UUID) -> Aggregate | None:
        try:
            return cast(Aggregate, self.app.repository.get(aggregate_id,
                                                           projector_func=_replay))
        except AggregateNotFoundError:
            return None
        except STORE_UNREACHABLE as e:
            raise StoreUnavailable(f"event store unavailable: {e}") from e

    def exists(self, aggregate_id: UUID) -> bool:
        try:
            return bool(self.recorder.select_events(aggregate_id, limit=1))
        except STORE_UNREACHABLE as e:
            raise StoreUnavailable(f"event store unavailable: {e}") from e

    def topics_since(self, aggregate_id: UUID, version: int) -> list[tuple[int, str]]:
        """(version, topic) of the aggregate's events after ``version``, oldest first (not
        decoded: a cheap way to learn what happened to it since it was read)."""
        try:
            return [(e.originator_version, e.topic)
                    for e in self.recorder.select_events(aggregate_id, gt=version)]
        except STORE_UNREACHABLE as e:
            raise StoreUnavailable(f"event store unavailable: {e}") from e

    def recorded_by(self, aggregate_id: UUID) -> str | None:
        """The actor of an aggregate's first event (of a command receipt: who sent the
        command), None if it has none."""
        stored = self.recorder.select_events(aggregate_id, limit=1)
        actor = stored_fields(bytes(stored[0].state)).get("actor") if stored else None
        return actor if isinstance(actor, str) else None

    def position_of(self, aggregate_id: UUID, version: int = 1) -> int | None:
        """The log position of one stored event (used to answer a replayed command)."""
        try:
            return self._position_of(aggregate_id, version)
        except STORE_UNREACHABLE as e:
            raise StoreUnavailable(f"event store unavailable: {e}") from e

    def _position_of(self, aggregate_id: UUID, version: int) -> int | None:
        if isinstance(self.recorder, MemoryRecorder):
            return self.recorder.position_of(aggregate_id, version)
        table = self.recorder.events_table_name
        if self.kind == "sqlite":
            with self.recorder.datastore.transaction(commit=False) as curs:
                curs.execute(
                    f"SELECT rowid FROM {table} WHERE originator_id=? AND originator_version=?",
                    (aggregate_id.hex, version),  # eventsourcing stores SQLite ids as hex
                )
                row = curs.fetchone()
                return int(row[0]) if row else None
        schema = self.recorder.datastore.schema
        with self.recorder.datastore.transaction(commit=False) as curs:
            curs.execute(
                f'SELECT notification_id FROM "{schema}"."{table}" '
                "WHERE originator_id=%s AND originator_version=%s",
                (aggregate_id, version),
            )
            row = curs.fetchone()
            return int(row["notification_id"]) if row else None

    def existing(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        """Which of ``aggregate_ids`` the store holds (one query per thousand ids)."""
        try:
            return self._existing(aggregate_ids)
        except STORE_UNREACHABLE as e:  # the dispatcher retries the batch: not this command's fault
            raise StoreUnavailable(f"event store unavailable: {e}") from e

    def _existing(self, aggregate_ids: Sequence[UUID]) -> set[UUID]:
        if isinstance(self.recorder, MemoryRecorder):
            return self.recorder.existing(aggregate_ids)
        table = self.recorder.events_table_name
        found: set[UUID] = set()
        for i in range(0, len(aggregate_ids), 1000):
            chunk = aggregate_ids[i:i + 1000]
            if self.kind == "sqlite":
                marks = ",".join("?" * len(chunk))
                with self.recorder.datastore.transaction(commit=False) as curs:
                    curs.execute(f"SELECT originator_id FROM {table} WHERE originator_version=1 "
                                 f"AND originator_id IN ({marks})", [a.hex for a in chunk])
                    found.update(UUID(row[0]) for row in curs.fetchall())
            else:
                schema = self.recorder.datastore.schema
                with self.recorder.datastore.transaction(commit=False) as curs:
                    curs.execute(f'SELECT originator_id FROM "{schema}"."{table}" '
                                 "WHERE originator_version=1 AND originator_id = ANY(%s)",
                                 (list(chunk),))
                    found.update(UUID(str(row["originator_id"])) for row in curs.fetchall())
        return found

    def lag(self, position: int) -> dict[str, Any]:
        """Events the log holds beyond ``position`` (a projector's, the relay's), and how many
        seconds ago the oldest of them was recorded."""
        head = self.max_position()
        events = max(0, head - position)
        seconds = 0.0
        if events:
            first = self.select_notifications(position, 1)
            if first:
                recorded = _recorded_at(stored_fields(bytes(first[0].state)).get("timestamp"))
                if recorded is not None:
                    seconds = max(0.0, (datetime.now(UTC) - recorded).total_seconds())
        return {"events": events, "seconds": round(seconds, 3)}

    def max_position(self) -> int:
        return self.recorder.max_notification_id() or 0

    def select_notifications(self, after: int, limit: int) -> Sequence[Notification]:
        return cast(
            Sequence[Notification],
            self.recorder.select_notifications(start=after, limit=limit, inclusive_of_start=False),
        )

    def decode(self, notification: Notification) -> Any:
        return self.mapper.to_domain_event(notification)

    def ping(self) -> bool:
        """Whether the store answers right now."""
        try:
            # One attempt, bounded by the connect timeout: eventsourcing's @retry would try
            # 10 times (~10 x connect timeout) and hang /health while the store is down.
            query = type(self.recorder).max_notification_id
            getattr(query, "__wrapped__", query)(self.recorder)
        except Exception:
            return False
        return True

    @property
    def notify_channel(self) -> str | None:
        """PostgreSQL channel NOTIFYed on every insert (None for SQLite and memory)."""
        return cast(str, self.recorder.channel_name) if self.kind == "postgres" else None

    def close(self) -> None:
        self.app.close()


def _replay(aggregate: Any, events: Iterable[Any]) -> Any:
    """eventsourcing's ``project_aggregate`` without its per-event runtime protocol check
    (``isinstance(event, CanMutateProtocol)``, ~13 µs: as much as decoding the event), which
    made replaying a long-lived aggregate (a download job's checkpoints) cost twice as much.
    Every event of the store is one of the domain's aggregate events."""
    for event in events:
        aggregate = event.mutate(aggregate)
    return aggregate


def _recorded_at(stamp: Any) -> datetime | None:
    """The event's recorded timestamp from its stored state (eventsourcing's JSON encoding)."""
    if isinstance(stamp, dict):
        stamp = stamp.get("_data_")
    if not isinstance(stamp, str):
        return None
    try:
        value = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)
