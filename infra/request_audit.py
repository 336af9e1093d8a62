"""The request audit log: every HTTP request — time, principal, method and route, resource id,
client address, status, duration, command id — in the append-only ``request_audit`` table of
the read-model database.

Recording a request appends a tuple to a buffer; a writer thread takes the buffered records
every ``flush_s`` (it pops them one by one from the buffer's left while requests append on
its right: the buffer is never iterated, so a request arriving mid-flush is simply left for the
next one) and inserts them (one ``COPY`` on PostgreSQL, an executemany INSERT on SQLite). A
request never waits for the database. While the database is unreachable the writer holds what
it took and the buffer keeps the rest, up to ``capacity`` records together (beyond that the
oldest records not yet taken by the writer are dropped, and counted in ``dropped``). The writer
survives any exception (logged, counted in ``writer_errors``; what it held is written at the
next flush), and says whether it is alive (``writer_up``, ``/health``, ``/metrics``).
Triggers refuse UPDATE and DELETE on the table (SQLite and PostgreSQL), so rows cannot be
edited through SQL without dropping the triggers first.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    func,
    select,
    text,
)
from sqlalchemy.exc import DataError, IntegrityError, SQLAlchemyError

from infra.read_model_db import is_postgres, utc_row

log = logging.getLogger("obsledger.request_audit")

metadata = MetaData()
request_audit = Table(
    "request_audit", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("principal", String(120)),
    Column("method", String(10), nullable=False),
    Column("route", String(300), nullable=False),
    Column("path", String(1000), nullable=False),
    Column("resource_id", String(200)),
    Column("client", String(100)),
    Column("status", Integer, nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("command_id", String(200)),
    Index("ix_request_audit_at", "at"),
    Index("ix_request_audit_principal", "principal", "at"),
    Index("ix_request_audit_command", "command_id"),
)
COLUMNS = ("at", "principal", "method", "route", "path", "resource_id", "client", "status",
           "duration_ms", "command_id")

_PG_COPY = f"COPY request_audit ({', '.join(COLUMNS)}) FROM STDIN"

_PG_APPEND_ONLY = """
CREATE OR REPLACE FUNCTION obsledger_request_audit_append_only() RETURNS trigger AS $$
BEGIN RAISE EXCEPTION 'request_audit is append-only'; END $$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS request_audit_append_only ON request_audit;
CREATE TRIGGER request_audit_append_only BEFORE UPDATE OR DELETE ON request_audit
FOR EACH ROW EXECUTE FUNCTION obsledger_request_audit_append_only();
"""
_SQLITE_APPEND_ONLY = [
    "CREATE TRIGGER IF NOT EXISTS request_audit_no_update BEFORE UPDATE ON request_audit "
    "BEGIN SELECT RAISE(ABORT, 'request_audit is append-only'); END",
    "CREATE TRIGGER IF NOT EXISTS request_audit_no_delete BEFORE DELETE ON request_audit "
    "BEGIN SELECT RAISE(ABORT, 'request_audit is append-only'); END",
]


#: The database refuses the data of a row (COPY raises psycopg's errors, not SQLAlchemy's).
_REFUSED = (DataError, IntegrityError, psycopg.DataError, psycopg.IntegrityError)
#: Anything else that leaves the buffer unwritten (the database unreachable, …).
_UNWRITTEN = (SQLAlchemyError, psycopg.Error)


#: Each column's length (None: not text), from the table.
_LENGTHS = tuple(getattr(request_audit.c[name].type, "length", None) for name in COLUMNS)


def _storable(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with its text cut to its column, NUL and unencodable characters (lone
    surrogates: undecodable bytes of a path) replaced."""
    return tuple(v if length is None or v is None else _text(v, length)
                 for v, length in zip(row, _LENGTHS, strict=True))


def _text(value: str, limit: int) -> str:
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value[:limit].replace("\x00", "\ufffd")


class RequestAuditLog:
    def __init__(self, engine: Engine, flush_s: float = 0.5, capacity: int = 100_000) -> None:
        self.engine = engine
        self.flush_s = flush_s
        # record() appends on the right; only the writer pops, on the left, into _held
        self._buffer: deque[tuple[Any, ...]] = deque()
        self._held: list[tuple[Any, ...]] = []  # taken by the writer, storable, not written
        self.capacity = capacity
        self.dropped = 0
        self.refused = 0  # records the database refused (left out)
        self.failing = False  # the last write failed (logged once per outage)
        self.written = 0
        self.writer_errors = 0  # unexpected exceptions the writer survived
        self.last_error: str | None = None
        self.last_flush_at: float | None = None  # time.time() of the last successful write
        self._drop_lock = threading.Lock()
        self._ready = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._flush_lock = threading.Lock()
        self._create_lock = threading.Lock()

    def record(self, at: datetime, principal: str | None, method: str, route: str, path: str,
               resource_id: str | None, client: str | None, status: int, duration_ms: float,
               command_id: str | None) -> None:
        """Hold one request for the next batch (never blocks on the writer)."""
        if len(self._buffer) + len(self._held) >= self.capacity:
            self._drop_oldest()
        self._buffer.append((at, principal, method, route, path, resource_id, client, status,
                             duration_ms, command_id))

    def _drop_oldest(self) -> None:
        with self._drop_lock:
            try:
                self._buffer.popleft()  # the writer may have taken it first: then none
            except IndexError:
                return
            self.dropped += 1

    # -- the writer ------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="request-audit",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.flush()
        except Exception as e:  # the last flush of a stopping process: say so, go on stopping
            self._writer_failed(e)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            try:
                self.flush()
            except Exception as e:  # never the end of the writer: what it holds stays held
                self._writer_failed(e)

    def _writer_failed(self, error: Exception) -> None:
        self.writer_errors += 1
        self.last_error = f"{type(error).__name__}: {error}"
        log.error("request audit writer: flush failed (%d held), going on: %s",
                  self.pending, self.last_error, exc_info=error)

    @property
    def writer_up(self) -> bool:
        """Whether the writer thread is alive (False before start() and after stop())."""
        return self._thread is not None and self._thread.is_alive()

    def report(self) -> dict[str, Any]:
        """The writer's state for ``/health``."""
        return {
            "writer": "running" if self.writer_up else
            "stopped" if self._thread is None else "dead",
            "pending": self.pending, "written": self.written, "dropped": self.dropped,
            "refused": self.refused, "failing": self.failing,
            "writer_errors": self.writer_errors, "last_error": self.last_error,
            "last_written_at": datetime.fromtimestamp(self.last_flush_at, UTC).isoformat()
            if self.last_flush_at is not None else None,
        }

    def create_table(self) -> None:
        if self._ready:
            return
        with self._create_lock:
            if not self._ready:
                self._create_table()

    def _create_table(self) -> None:
        try:
            metadata.create_all(self.engine, checkfirst=True)
        except SQLAlchemyError:  # another process created it at the same moment
            metadata.create_all(self.engine, checkfirst=True)
        with self.engine.begin() as conn:
            if is_postgres(self.engine):
                conn.execute(text("SELECT pg_advisory_xact_lock(4242001)"))
                conn.exec_driver_sql(_PG_APPEND_ONLY)
            else:
                for statement in _SQLITE_APPEND_ONLY:
                    conn.exec_driver_sql(statement)
        self._ready = True

    def flush(self) -> int:
        """Write what is buffered; returns the number of rows written (0 if the database is
        unreachable: the rows stay held). The buffer is never iterated: the records there now
        are popped from its left (requests append on its right meanwhile) into the writer's
        own list. Text is made storable here, in the writer, not on the request's path (a
        5,000-character path, a made-up method or a ``%00`` in a path must not make
        PostgreSQL refuse the whole batch, again and again); a row the database still refuses
        is counted in ``refused`` and left out."""
        with self._flush_lock:
            self._take()
            batch = self._held
            if not batch:
                return 0
            try:
                self.create_table()
                try:
                    self._insert(batch)
                    done = written = len(batch)
                except _REFUSED:  # one row at a time, leaving out what is refused
                    done, written = self._insert_each(batch)
            except _UNWRITTEN as e:
                if not self.failing:
                    log.warning("request audit log not written (%d held): %s", len(batch), e)
                self.failing = True
                return 0
            self.failing = done < len(batch)  # the database went away part way
            del batch[:done]
            self.written += written
            self.last_flush_at = time.time()
            return written

    def _take(self) -> None:
        """Move the records buffered now into the writer's list, made storable."""
        for _ in range(len(self._buffer)):
            try:
                row = self._buffer.popleft()
            except IndexError:  # record() dropped the oldest meanwhile (buffer full)
                return
            try:
                self._held.append(_storable(row))
            except Exception as e:  # a record no column can take: left out, counted
                self.refused += 1
                log.warning("request audit record left out (%s): %r", e, row[:5])

    def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        with self.engine.begin() as conn:
            if is_postgres(self.engine):  # COPY: far less CPU than an executemany
                raw: Any = conn.connection.driver_connection
                with raw.cursor() as cur, cur.copy(_PG_COPY) as copy:
                    for row in rows:
                        copy.write_row(row)
            else:
                conn.execute(request_audit.insert(),
                             [dict(zip(COLUMNS, row, strict=True)) for row in rows])

    def _insert_each(self, rows: list[tuple[Any, ...]]) -> tuple[int, int]:
        """(rows handled, rows written), stopping at the first error that is not a refusal
        of the row itself (the database gone: the rest stays buffered)."""
        written = 0
        for i, row in enumerate(rows):
            try:
                self._insert([row])
                written += 1
            except _REFUSED as e:
                self.refused += 1
                log.warning("request audit record refused by the database, left out: %s %s "
                            "(%s)", row[2], row[4][:200], e)
            except _UNWRITTEN:
                return i, written
        return len(rows), written

    @property
    def pending(self) -> int:
        """Records not yet written (buffered, or held by the writer)."""
        return len(self._buffer) + len(self._held)

    # -- the auditors' query ---------------------------------------------------------------
    def query(self, *, principal: str | None = None, method: str | None = None,
              route: str | None = None, status: int | None = None,
              resource_id: str | None = None, command_id: str | None = None,
              since: datetime | None = None, until: datetime | None = None,
              skip: int = 0, limit: int = 100) -> tuple[list[dict[str, Any]], int]:
        """Matching records, newest first, and how many match."""
        self.create_table()
        t = request_audit
        conditions = [c for c in (
            t.c.principal == principal if principal is not None else None,
            t.c.method == method.upper() if method is not None else None,
            t.c.route == route if route is not None else None,
            t.c.status == status if status is not None else None,
            t.c.resource_id == resource_id if resource_id is not None else None,
            t.c.command_id == command_id if command_id is not None else None,
            t.c.at >= since if since is not None else None,
            t.c.at < until if until is not None else None,
        ) if c is not None]
        with self.engine.connect() as conn:
            total = conn.execute(select(func.count()).select_from(t).where(*conditions)
                                 ).scalar_one()
            rows = conn.execute(select(t).where(*conditions).order_by(t.c.id.desc())
                                .offset(skip).limit(limit)).mappings().all()
        return [utc_row(r) for r in rows], int(total)
