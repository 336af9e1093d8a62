"""The batched projector: a page of events and the position, in one read-model transaction.

Pages of notifications are read from the event store's log, decoded with the application's
mapper and turned into row operations by the feature modules' mappings
(``projections.registry``: ``obs_units``, ``raw_data``, ``staging``, ``results``,
``downloads``, ``processing``); runs of the same statement become one ``executemany``
(``projections.rows``). The new position is written in the same transaction, so each event
is applied exactly once. Every statement is guarded by the row's ``last_position``
(``projections.rows``), which the Kafka projector (``projections.kafka_projector``) relies on
to drop the duplicates that at-least-once delivery brings.

This module keeps the live loop and the rebuild/check of read models (fresh tables filled
by ``execute_grouped``, with ``COPY`` on PostgreSQL, then switched).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Connection, Engine, inspect, select, update
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.schema import CreateTable

from infra.event_store import EventStore
from infra.prefetch import prefetched
from infra.read_model_db import insert_missing, is_postgres, write_transaction
from projections.parallel_decode import parallel_pages
from projections.registry import Projections
from projections.rows import Op, execute_ops
from projections.tables import READ_MODELS, ReadModelTables, build_positions, build_tables

log = logging.getLogger("obsledger.projector")

MAIN = "read_models"
#: Bookkeeping columns left out of the changes the live stream publishes.
_NOT_CHANGES = frozenset({"_id", "_position", "id", "last_command_id", "last_actor",
                          "created_position", "updated_at", "recorded_at"})

#: Notifications per transaction while a rebuild fills fresh tables (at least).
REBUILD_PAGE = 5000

def execute_grouped(conn: Connection, ops: Iterator[Op], fresh: bool = False) -> None:
    """Execute a page's operations as few statements as possible (rebuilds): operations on
    one row keep their order, rows are independent of each other, so the page is split into
    levels (a row's n-th operation is on level n) and each level's runs of one statement
    become one ``executemany``. An expression update (values inline, no parameters) is a
    barrier: its table's later operations come after it. ``fresh`` (tables a rebuild fills,
    on PostgreSQL): runs of inserts are sent by COPY."""
    groups: dict[tuple[int, Any], tuple[Any, list[dict[str, Any]]]] = {}
    row_level: dict[tuple[str, Any], int] = {}
    floor: dict[str, int] = {}
    top: dict[str, int] = {}
    for key, stmt, params in ops:
        table = key if isinstance(key, str) else key[0]
        if params:
            row = (table, params.get("_id", params.get("id")))
            level = max(row_level.get(row, 0), floor.get(table, 0)) + 1
            row_level[row] = level
        else:
            level = max(top.get(table, 0), floor.get(table, 0)) + 1
            floor[table] = level
        top[table] = max(top.get(table, 0), level)
        group = groups.get((level, key))
        if group is None:
            groups[(level, key)] = (stmt, [params] if params else [])
        else:
            group[1].append(params)
    copy = fresh and is_postgres_conn(conn)
    for (_, key), (stmt, rows) in sorted(groups.items(), key=lambda g: g[0][0]):
        if copy and isinstance(key, str) and len(rows) > 10:
            _copy_rows(conn, stmt, rows)
        elif rows:
            conn.execute(stmt, rows)
        else:
            conn.execute(stmt)


def is_postgres_conn(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def _copy_rows(conn: Connection, stmt: Any, rows: list[dict[str, Any]]) -> None:
    """Inserts into a fresh table by COPY (PostgreSQL); a row that exists already (which a
    rebuild from the log never sends) makes it fall back to the statement, which skips it."""
    from psycopg.types.json import Jsonb

    table = stmt.table
    cols = list(rows[0])
    wrap = [isinstance(table.c[c].type, JSON) for c in cols]
    names = ", ".join(f'"{c}"' for c in cols)
    try:
        with conn.begin_nested():
            cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
            with cursor.copy(f'COPY "{table.name}" ({names}) FROM STDIN') as copy:
                for row in rows:
                    copy.write_row([Jsonb(v) if w and v is not None else v
                                    for v, w in zip(row.values(), wrap, strict=True)])
    except IntegrityError:
        conn.execute(stmt, rows)


class _Writer:
    """Executes pages of operations (``execute_grouped``, a transaction each) in its own
    thread, in order, while the caller reads and decodes the next page."""

    def __init__(self, engine: Engine, progress: Callable[[int, int], None] | None,
                 head: int) -> None:
        self.engine = engine
        self.progress = progress
        self.head = head
        self.queue: queue.Queue[tuple[list[Op], int] | None] = queue.Queue(2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="rebuild-writer", daemon=True)

    def __enter__(self) -> _Writer:
        self.thread.start()
        return self

    def put(self, ops: list[Op], position: int) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put((ops, position), timeout=0.1)
                return
            except queue.Full:
                continue

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is None:
            self.queue.put(None)
        else:  # the caller failed: the writer stops after its current page
            self.error = self.error or RuntimeError("rebuild stopped")
            while True:
                try:
                    self.queue.put_nowait(None)
                    break
                except queue.Full:
                    self.queue.get_nowait()
        self.thread.join()
        if kind is None and self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            ops, position = item
            try:
                with self.engine.begin() as conn:
                    execute_grouped(conn, iter(ops), fresh=True)
            except BaseException as e:
                self.error = e
                continue
            if self.progress:
                self.progress(position, max(self.head, position))


class Projector:
    """Follows the event log and keeps the read models; one instance per process."""

    #: Decoder processes of a rebuild (None: one per CPU but one; 1: decode in this process).
    rebuild_workers: int | None = None

    def __init__(self, store: EventStore, engine: Engine, page_size: int = 1000,
                 poll_interval: float = 0.5) -> None:
        self.store = store
        self.engine = engine
        self.page_size = page_size
        self.poll_interval = poll_interval
        self.positions = build_positions()
        self.tables = build_tables()
        self._ops = Projections(self.tables, engine.dialect.name)
        self.position = 0
        self.last_error: str | None = None
        self.caught_up_at: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._advanced = threading.Condition()
        self._listeners: list[Callable[[int], None]] = []
        self._threads: list[threading.Thread] = []
        self.setup()

    # -- schema --------------------------------------------------------------------------
    def setup(self) -> None:
        with self.engine.begin() as conn:
            self.positions.create(conn, checkfirst=True)
            self.tables.metadata.create_all(conn, checkfirst=True)
            row = conn.execute(select(self.positions.c.position)
                               .where(self.positions.c.name == MAIN)).first()
            if row is None:
                insert_missing(conn, self.positions, {
                    "name": MAIN, "position": 0, "generation": "live",
                    "updated_at": datetime.now(UTC)})
                self.position = 0
            else:
                self.position = int(row[0])

    # -- running -------------------------------------------------------------------------
    def wake(self, _position: int | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        t = threading.Thread(target=self.run_forever, name="projector", daemon=True)
        t.start()
        self._threads.append(t)
        if self.store.notify_channel:
            lt = threading.Thread(target=self._listen, name="projector-listen", daemon=True)
            lt.start()
            self._threads.append(lt)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=10)

    def run_forever(self) -> None:
        while not self._stop.is_set():
            try:
                n = self.project_once()
                self.last_error = None
            except Exception as e:  # store or read-model database down: retry
                self.last_error = str(e)
                log.warning("projection failed, retrying: %s", e)
                self._stop.wait(1.0)
                continue
            if n == 0:
                self.caught_up_at = time.time()
                self._wake.wait(self.poll_interval)
                self._wake.clear()

    def _listen(self) -> None:
        """Wake on PostgreSQL NOTIFY; the polling in run_forever covers a lost notification."""
        import psycopg

        s = self.store.settings
        while not self._stop.is_set():
            try:
                with psycopg.connect(
                    host=s.postgres_host, port=s.postgres_port, user=s.postgres_user,
                    password=s.postgres_password or None, dbname=s.postgres_dbname,
                    autocommit=True, connect_timeout=s.postgres_connect_timeout,
                    application_name="obsledger-listen",
                ) as conn:
                    conn.execute(f'LISTEN "{self.store.notify_channel}"')
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=1.0):
                            self._wake.set()
            except Exception as e:
                log.debug("LISTEN connection lost: %s", e)
                self._stop.wait(1.0)

    # -- one page ------------------------------------------------------------------------
    def project_once(self) -> int:
        """Apply the next page of events; return how many notifications were consumed."""
        with write_transaction(self.engine) as conn:
            pos = self._lock_position(conn, MAIN)
            notifications = self.store.select_notifications(pos, self.page_size)
            if not notifications:
                self.position = pos
                return 0
            self._apply(conn, self._ops, notifications)
            new_pos = notifications[-1].id
            conn.execute(update(self.positions).where(self.positions.c.name == MAIN)
                         .values(position=new_pos, updated_at=datetime.now(UTC)))
        self._advance(new_pos)
        return len(notifications)

    def _apply(self, conn: Connection, ops: Projections, notifications: Any,
               only: frozenset[str] | None = None, grouped: bool = False) -> None:
        """Apply ``notifications`` through ``ops``; with ``only``, just the statements on
        those tables (a rebuild of some read models); ``grouped``: ``execute_grouped``."""
        (execute_grouped if grouped else execute_ops)(
            conn, self._page_ops(ops, notifications, only))

    def _page_ops(self, ops: Projections, notifications: Any,
                  only: frozenset[str] | None = None) -> Iterator[Op]:
        decode = self.store.decode
        handled = ops.handlers
        for n in notifications:
            if n.topic.rpartition(":")[2] not in handled:
                continue  # no read model changes (receipts): not even decoded
            for op in ops.ops(decode(n), n.id):
                if only is None or (op[0] if isinstance(op[0], str) else op[0][0]) in only:
                    yield op

    def _pages(self, after: int, head: int | None = None) -> Generator[Any, None, None]:
        """Pages of notifications after ``after`` (up to ``head`` if given), read ahead."""
        size = max(self.page_size, REBUILD_PAGE)

        def pages() -> Iterator[Any]:
            pos = after
            while head is None or pos < head:
                page = self.store.select_notifications(pos, size)
                if not page:
                    return
                yield page
                pos = page[-1].id

        return prefetched(pages())

    def _lock_position(self, conn: Connection, name: str) -> int:
        q = select(self.positions.c.position).where(self.positions.c.name == name)
        if is_postgres(self.engine):
            q = q.with_for_update()
        row = conn.execute(q).first()
        return int(row[0]) if row else 0

    def _advance(self, position: int) -> None:
        with self._advanced:
            self.position = max(self.position, position)
            self._advanced.notify_all()
        for listener in self._listeners:
            listener(self.position)

    def on_advance(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(position)`` whenever the read models reach a new position (the
        live stream follows them)."""
        self._listeners.append(callback)

    def changes(self, event: Any, position: int) -> list[dict[str, Any]]:
        """What ``event`` (at ``position``) changes in the read models, per row:
        ``{read_model, op: insert|update, id, values}``; ``id`` and ``values`` are None
        where the statement is an expression (a counter incremented, every file of a job).
        """
        out: list[dict[str, Any]] = []
        for key, _stmt, params in self._ops.ops(event, position):
            insert = isinstance(key, str)  # inserts are keyed by their table's name
            table = key if insert else key[0]
            row_id = params.get("_id", params.get("id")) if params else None
            out.append({"read_model": table, "op": "insert" if insert else "update",
                        "id": None if row_id is None else str(row_id),
                        "values": {k: v for k, v in params.items() if k not in _NOT_CHANGES}
                        if params else None})
        return out

    def handles(self, topic: str) -> bool:
        """Whether events of ``topic`` change a read model."""
        return topic.rpartition(":")[2] in self._ops.handlers

    def catch_up(self, timeout: float = 60.0,
                 progress: Callable[[int], None] | None = None) -> int:
        """Project until the log's head as it is now (tests, command line); ``progress`` is
        told each position reached."""
        deadline = time.monotonic() + timeout
        while self.project_once():
            if progress is not None:
                progress(self.position)
            if time.monotonic() > deadline:
                raise TimeoutError("projection did not catch up in time")
        return self.position

    def read_position(self) -> int:
        with self.engine.connect() as conn:
            row = conn.execute(select(self.positions.c.position)
                               .where(self.positions.c.name == MAIN)).first()
        return int(row[0]) if row else 0

    # -- rebuild -------------------------------------------------------------------------
    def build_fresh(self, progress: Callable[[int, int], None] | None = None,
                    models: Sequence[str] | None = None) -> tuple[ReadModelTables, int]:
        """A new set of read-model tables (``<model>_r<hex>``) built from position 0 up to the
        log's head as it was when this started; return them and the position they reached.
        With ``models``, only those tables are created and filled."""
        chosen = _chosen(models)
        generation = "r" + uuid.uuid4().hex[:12]
        shadow = build_tables(generation=generation, table_suffix="_" + generation)
        ops = Projections(shadow, self.engine.dialect.name)
        only = None if models is None else _shadow_names(chosen, generation)
        tables = [t for m, t in zip(READ_MODELS, shadow.all(), strict=True) if m in chosen]
        with self.engine.begin() as conn:  # indexes after the fill (keys and unique now)
            for table in tables:
                conn.execute(CreateTable(table))
        pos = 0
        head = self.store.max_position()
        try:
            with _Writer(self.engine, progress, head) as writer, \
                    closing(self._pages(0, head)) as pages, \
                    parallel_pages(self, ops, Projections, generation, pages, head, only) as built:
                for page_ops, last in built:
                    writer.put(page_ops, last)
                    pos = last
            with self.engine.begin() as conn:
                for table in tables:
                    for index in table.indexes:
                        index.create(conn)
        except BaseException:
            self.drop(shadow)
            raise
        return shadow, pos

    def check(self, progress: Callable[[int, int], None] | None = None,
              compared: Callable[[str], None] | None = None,
              ) -> tuple[int, dict[str, dict[str, Any]]]:
        """Compare every live read model with a fresh build from the log; return the build's
        position and, per read model, the ids of rows missing, extra or different in the live
        one. Rows the live projector changed after the build's position are not compared, so
        this can run while commands keep arriving. ``progress`` follows the build,
        ``compared`` is told each read model compared."""
        fresh, position = self.build_fresh(progress)
        report: dict[str, dict[str, Any]] = {}
        try:
            with self.engine.connect() as conn:
                for model, live_t, fresh_t in zip(READ_MODELS, self.tables.all(), fresh.all(),
                                                  strict=True):
                    live = {r["id"]: dict(r) for r in conn.execute(select(live_t)).mappings()}
                    built = {r["id"]: dict(r) for r in conn.execute(select(fresh_t)).mappings()}
                    missing = sorted(i for i in built if i not in live)
                    extra = sorted(i for i, r in live.items()
                                   if i not in built and r["created_position"] <= position)
                    different = sorted(i for i, r in built.items()
                                       if i in live and live[i]["last_position"] <= position
                                       and live[i] != r)
                    report[model] = {"rows": len(built), "missing": missing, "extra": extra,
                                     "different": different}
                    if compared is not None:
                        compared(model)
        finally:
            self.drop(fresh)
        return position, report

    def drop(self, tables: ReadModelTables) -> None:
        """Drop a set built by ``build_fresh`` (never the live one)."""
        if not tables.generation.startswith("r"):
            raise ValueError("refusing to drop the live read models")
        with self.engine.begin() as conn:
            tables.metadata.drop_all(conn)

    def rebuild(self, progress: Callable[[int, int], None] | None = None,
                models: Sequence[str] | None = None, switch_attempts: int = 50) -> int:
        """Build fresh tables from position 0 (every read model, or ``models``), then switch
        to them atomically; return the position the switched tables reflect.

        The live tables keep serving queries and the live projector keeps running while the
        fresh ones are built and brought close to the log's head. The switch is one short
        transaction: lock the projector's position row (the live projector waits), apply the
        last events to the fresh tables, drop the live tables and rename the fresh ones.
        Rebuilding every model moves the position to the log's head; rebuilding some brings
        them to the live position (the others' position), and events they already reflect
        beyond it are no-ops when the projector re-applies them (guarded statements).
        On PostgreSQL the switch waits at most 500 ms for locks (a query holding a read
        model); it is then rolled back and retried, so queries wait briefly but never fail.
        """
        chosen = _chosen(models)
        every = set(chosen) == set(READ_MODELS)
        shadow, pos = self.build_fresh(progress, None if every else chosen)
        ops = Projections(shadow, self.engine.dialect.name)
        generation = shadow.generation
        only = None if every else _shadow_names(chosen, generation)
        try:
            while True:  # close the gap outside the switch
                notifications = self.store.select_notifications(pos, REBUILD_PAGE)
                if notifications:
                    with self.engine.begin() as conn:
                        self._apply(conn, ops, notifications, only, grouped=True)
                    pos = notifications[-1].id
                    if progress:
                        progress(pos, max(pos, self.store.max_position()))
                if len(notifications) < self.page_size:
                    break
            for attempt in range(switch_attempts):
                try:
                    pos = self._switch(ops, only, chosen, generation, pos, every)
                    break
                except OperationalError as e:
                    if not _lock_timeout(e) or attempt == switch_attempts - 1:
                        raise
                    log.info("rebuild switch waited too long for a lock; retrying")
                    time.sleep(0.05 * (1 + attempt % 5))
        except BaseException:
            self.drop(shadow)
            raise
        if every:
            self._advance(pos)
        return pos

    def _switch(self, ops: Projections, only: frozenset[str] | None, chosen: tuple[str, ...],
                generation: str, pos: int, every: bool) -> int:
        with write_transaction(self.engine) as conn:
            postgres = is_postgres(self.engine)
            if postgres:
                conn.exec_driver_sql("SET LOCAL lock_timeout = '500ms'")
            live = self._lock_position(conn, MAIN)
            while True:  # the last events, inside the switching transaction
                notifications = self.store.select_notifications(pos, self.page_size)
                if not every:  # up to the live position only
                    notifications = [n for n in notifications if n.id <= live]
                if not notifications:
                    break
                self._apply(conn, ops, notifications, only, grouped=True)
                pos = notifications[-1].id
            if postgres:  # every lock at once, in one order: no deadlock with a query
                names = ", ".join(f'"{m}"' for m in chosen)
                conn.exec_driver_sql(f"LOCK TABLE {names} IN ACCESS EXCLUSIVE MODE")
            existing = set(inspect(conn).get_table_names())
            for name in chosen:
                if name in existing:
                    conn.exec_driver_sql(f'DROP TABLE "{name}"')
                conn.exec_driver_sql(f'ALTER TABLE "{name}_{generation}" RENAME TO "{name}"')
            if every:
                conn.execute(update(self.positions).where(self.positions.c.name == MAIN)
                             .values(position=pos, generation=generation,
                                     updated_at=datetime.now(UTC)))
            else:
                pos = max(pos, live)
        return pos

    # -- waiting -------------------------------------------------------------------------
    def wait_for(self, position: int, timeout: float) -> bool:
        """Block until this process's projector reached ``position`` (embedded use)."""
        deadline = time.monotonic() + timeout
        with self._advanced:
            while self.position < position:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._advanced.wait(remaining)
        return True


def _chosen(models: Sequence[str] | None) -> tuple[str, ...]:
    """The read models named (all of them by default), in ``READ_MODELS`` order."""
    if models is None:
        return READ_MODELS
    unknown = sorted(set(models) - set(READ_MODELS))
    if unknown or not models:
        raise ValueError(f"unknown read model(s) {', '.join(unknown) or '(none given)'}; "
                         f"known: {', '.join(READ_MODELS)}")
    return tuple(m for m in READ_MODELS if m in set(models))


def _shadow_names(models: tuple[str, ...], generation: str) -> frozenset[str]:
    return frozenset(f"{m}_{generation}" for m in models)


def _lock_timeout(e: OperationalError) -> bool:
    import psycopg

    return isinstance(e.orig, psycopg.errors.LockNotAvailable)
