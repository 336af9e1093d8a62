"""The batched projector: a page of events and the position, in one read-model transaction.

Pages of notifications are read from the event store's log, decoded with the application's
mapper and turned into SQL; runs of the same statement become one ``executemany``. The new
position is written in the same transaction, so each event is applied exactly once.

Every statement is also guarded by the row's ``last_position``: an insert of a row that exists
and an update by an event the row already reflects change nothing. The log projector never
sends such events; the Kafka projector (``projections.kafka_projector``) relies on the guard to
drop the duplicates that at-least-once delivery brings.
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

from sqlalchemy import JSON, Connection, Engine, Table, bindparam, inspect, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.schema import CreateTable

from infra.event_store import EventStore
from infra.prefetch import prefetched
from infra.read_model_db import insert_missing, is_postgres, write_transaction
from projections.downloads import download_handlers
from projections.processing import processing_handlers
from projections.tables import READ_MODELS, ReadModelTables, build_positions, build_tables

log = logging.getLogger("obsledger.projector")

MAIN = "read_models"

#: Notifications per transaction while a rebuild fills fresh tables (at least).
REBUILD_PAGE = 5000

Op = tuple[Any, Any, dict[str, Any]]  # (statement key, statement, parameters)


def _s(value: Any) -> str | None:
    return None if value is None else str(value)


def _originator(e: Any) -> Any:
    return e.originator_id


def _each(*handlers: Callable[[Any, int], list[Op]]) -> Callable[[Any, int], list[Op]]:
    """One event changing several rows (a result and its task or run)."""
    def ops(e: Any, position: int) -> list[Op]:
        return [op for h in handlers for op in h(e, position)]
    return ops


class _Ops:
    """Translates events into SQL operations against one set of tables."""

    def __init__(self, t: ReadModelTables, dialect: str) -> None:
        self.t = t
        self._dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        u, f, p, s = t.executed_obs_units, t.raw_data_files, t.raw_data_packages, t.staging_requests
        r, tk, run = t.observation_results, t.observation_result_tasks, t.processing_runs
        self.handlers: dict[str, Callable[[Any, int], list[Op]]] = {
            "ExecutedObsUnit.Started": self._insert(u, lambda e: {
                "obs_unit_id": e.obs_unit_id, "instrument": e.instrument,
                "status": "running", "start_time": e.start_time, "end_time": None,
                "metadata": e.metadata, "finish_metadata": None, "started_by": e.actor,
                "finished_by": None}),
            "ExecutedObsUnit.Finished": self._update(u, lambda e: {
                "status": e.status, "end_time": e.end_time, "finish_metadata": e.metadata,
                "finished_by": e.actor}),
            "RawDataFile.Registered": self._insert(f, lambda e: {
                "name": e.name, "instrument": e.instrument, "relative_path": e.relative_path,
                "size": e.size, "checksum_algorithm": e.checksum_algorithm,
                "checksum_value": e.checksum_value,
                "executed_obs_unit_id": _s(e.executed_obs_unit_id),
                "package_id": _s(e.package_id), "file_type": e.file_type,
                "created_at": e.created_at}),
            "RawDataFile.AssignedToPackage": self._update(f, lambda e: {
                "package_id": str(e.package_id)}),
            "RawDataPackage.Created": self._insert(p, lambda e: {
                "name": e.name, "executed_obs_unit_id": _s(e.executed_obs_unit_id),
                "status": "building", "total_size": e.total_size,
                "file_count": len(e.file_ids), "finalized_at": None}),
            "RawDataPackage.FilesAdded": self._update(p, lambda e: {
                "total_size": p.c.total_size + e.added_size,
                "file_count": p.c.file_count + len(e.file_ids)}, key_extra=("inc",)),
            "RawDataPackage.Finalized": self._update(p, lambda e: {
                "status": "complete", "total_size": e.total_size, "file_count": e.file_count,
                "finalized_at": e.timestamp}),
            "StagingRequest.Requested": self._insert(s, lambda e: {
                "package_ids": [str(i) for i in e.package_ids], "destination": e.destination,
                "status": "pending", "bytes_total": e.bytes_total,
                "files_total": e.files_total, "bytes_transferred": 0, "files_transferred": 0,
                "message": None}),
            "StagingRequest.ProgressReported": self._update(s, lambda e: {
                "status": e.status, "bytes_transferred": e.bytes_transferred,
                "files_transferred": e.files_transferred, "message": e.message}),
            "StagingRequest.Cancelled": self._update(s, lambda e: {
                "status": "cancelled", "message": e.reason}),
            "ObservationResult.Materialized": self._insert(r, lambda e: {
                "observation_id": e.observation_id, "request_id": e.request_id,
                "epoch_index": e.epoch_index, "sample_index": e.sample_index,
                "copy_index": e.copy_index, "instrument_id": e.instrument_id,
                "copies_mode": e.copies_mode, "not_before": e.not_before,
                "spec_snapshot": e.spec_snapshot, "fulfillment_status": "pending_dispatch",
                "fulfilled_on": None, "task_count": 0, "data_product_status": "PENDING",
                "assets_revision": 0, "dirty_from_revision": None, "next_eligible_run_at": None,
                "last_built_revision": None, "current_processing_run_id": None,
                "failed_runs": 0}),
            "ObservationResult.Dispatched": _each(
                self._update(r, lambda e: {"fulfillment_status": "dispatched",
                                           "task_count": e.attempt}),
                self._insert(tk, lambda e: {
                    "result_id": str(e.originator_id), "attempt": e.attempt,
                    "instrument_id": e.instrument_id,
                    "executed_obs_unit_id": _s(e.executed_obs_unit_id), "status": "open",
                    "dispatched_at": e.dispatched_at, "finished_at": None},
                    key=lambda e: e.task_id)),
            "ObservationResult.TaskEnded": _each(
                self._update(r, lambda e: {"fulfillment_status": e.fulfillment_status,
                                           "fulfilled_on": e.fulfilled_on}),
                self._update(tk, lambda e: {
                    "status": e.outcome, "finished_at": e.finished_at,
                    "executed_obs_unit_id": _s(e.executed_obs_unit_id)},
                    key=lambda e: e.task_id)),
            "ObservationResult.Canceled": _each(
                self._update(r, lambda e: {"fulfillment_status": "canceled"}),
                self._update(tk, lambda e: {"status": "canceled",
                                            "finished_at": e.canceled_at},
                             key=lambda e: e.task_id)),
            "ObservationResult.AssetContributed": self._update(r, lambda e: {
                "assets_revision": e.revision, "dirty_from_revision": e.dirty_from_revision,
                "next_eligible_run_at": e.next_eligible_run_at,
                "data_product_status": e.data_product_status, "failed_runs": 0}),
            "ObservationResult.RunStarted": _each(
                self._update(r, lambda e: {"data_product_status": "BUILDING",
                                           "current_processing_run_id": str(e.run_id)}),
                self._insert(run, lambda e: {
                    "result_id": str(e.originator_id), "revision": e.revision,
                    "status": "running", "started_at": e.started_at, "finished_at": None,
                    "outputs": [], "error": None}, key=lambda e: e.run_id)),
            "ObservationResult.RunEnded": _each(
                self._update(r, lambda e: {
                    "data_product_status": e.data_product_status,
                    "dirty_from_revision": e.dirty_from_revision,
                    "next_eligible_run_at": e.next_eligible_run_at,
                    "last_built_revision": e.last_built_revision,
                    "current_processing_run_id": None, "failed_runs": e.failed_runs}),
                self._update(run, lambda e: {
                    "status": e.end, "finished_at": e.finished_at, "outputs": e.outputs,
                    "error": e.error}, key=lambda e: e.run_id)),
        }

        self.handlers.update(download_handlers(self, t.download_jobs, t.download_files, _each))
        self.handlers.update(processing_handlers(self, t.processing_jobs,
                                                 t.processing_job_steps, t.data_products,
                                                 t.product_inputs, _each))

    def _insert(self, table: Table, values: Callable[[Any], dict[str, Any]],
                key: Callable[[Any], Any] = _originator) -> Callable[[Any, int], list[Op]]:
        """Insert the row ``key(event)`` (the aggregate's own row unless given)."""
        stmt = self._dialect_insert(table).on_conflict_do_nothing()

        def op(e: Any, position: int) -> list[Op]:
            row = values(e)
            row.update(id=str(key(e)), created_position=position,
                       last_position=position, last_command_id=e.command_id,
                       last_actor=e.actor, recorded_at=e.timestamp, updated_at=e.timestamp)
            return [(table.name, stmt, row)]

        return op

    @staticmethod
    def _update(table: Table, values: Callable[[Any], dict[str, Any]],
                key_extra: tuple[str, ...] = (),
                key: Callable[[Any], Any] = _originator) -> Callable[[Any, int], list[Op]]:
        """Update the row ``key(event)``; an event the row already reflects changes nothing,
        and an event without a key (``None``) changes no row of this table."""
        statements: dict[tuple[str, ...], Any] = {}  # one statement per set of columns

        def op(e: Any, position: int) -> list[Op]:
            row_id = key(e)
            if row_id is None:
                return []
            vals = values(e)
            vals.update(last_position=position, last_command_id=e.command_id,
                        last_actor=e.actor, updated_at=e.timestamp)
            if key_extra:  # expressions: no executemany, one statement per event
                stmt = (update(table).where(table.c.id == str(row_id),
                                            table.c.last_position < position).values(**vals))
                return [((table.name, "expr", id(stmt)), stmt, {})]
            cols = tuple(sorted(vals))
            cached = statements.get(cols)
            if cached is None:
                cached = statements[cols] = (
                    update(table).where(table.c.id == bindparam("_id"),
                                        table.c.last_position < bindparam("_position"))
                    .values({c: bindparam(c) for c in cols}))
            vals["_id"] = str(row_id)
            vals["_position"] = position
            return [((table.name, "upd", cols), cached, vals)]

        return op

    def ops(self, event: Any, position: int) -> list[Op]:
        handler = self.handlers.get(type(event).__qualname__)
        return handler(event, position) if handler else []


def execute_ops(conn: Connection, ops: Iterator[Op]) -> None:
    """Execute operations in order, grouping runs of the same statement into executemany."""
    run_key: Any = None
    run_stmt: Any = None
    run: list[dict[str, Any]] = []
    for key, stmt, params in ops:
        if key != run_key:
            if run_stmt is not None:
                conn.execute(run_stmt, run) if run else conn.execute(run_stmt)
            run_key, run_stmt, run = key, stmt, []
        if params:
            run.append(params)
    if run_stmt is not None:
        conn.execute(run_stmt, run) if run else conn.execute(run_stmt)


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

    def __init__(self, store: EventStore, engine: Engine, page_size: int = 1000,
                 poll_interval: float = 0.5) -> None:
        self.store = store
        self.engine = engine
        self.page_size = page_size
        self.poll_interval = poll_interval
        self.positions = build_positions()
        self.tables = build_tables()
        self._ops = _Ops(self.tables, engine.dialect.name)
        self.position = 0
        self.last_error: str | None = None
        self.caught_up_at: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._advanced = threading.Condition()
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

    def _apply(self, conn: Connection, ops: _Ops, notifications: Any,
               only: frozenset[str] | None = None, grouped: bool = False) -> None:
        """Apply ``notifications`` through ``ops``; with ``only``, just the statements on
        those tables (a rebuild of some read models); ``grouped``: ``execute_grouped``."""
        (execute_grouped if grouped else execute_ops)(
            conn, self._page_ops(ops, notifications, only))

    def _page_ops(self, ops: _Ops, notifications: Any,
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

    def catch_up(self, timeout: float = 60.0) -> int:
        """Project until the log's head as it is now (tests, command line)."""
        deadline = time.monotonic() + timeout
        while self.project_once():
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
        ops = _Ops(shadow, self.engine.dialect.name)
        only = None if models is None else _shadow_names(chosen, generation)
        tables = [t for m, t in zip(READ_MODELS, shadow.all(), strict=True) if m in chosen]
        with self.engine.begin() as conn:  # indexes after the fill (keys and unique now)
            for table in tables:
                conn.execute(CreateTable(table))
        pos = 0
        head = self.store.max_position()
        try:
            with _Writer(self.engine, progress, head) as writer, \
                    closing(self._pages(0, head)) as pages:
                for notifications in pages:
                    writer.put(list(self._page_ops(ops, notifications, only)),
                               notifications[-1].id)
                    pos = notifications[-1].id
            with self.engine.begin() as conn:
                for table in tables:
                    for index in table.indexes:
                        index.create(conn)
        except BaseException:
            self.drop(shadow)
            raise
        return shadow, pos

    def check(self, progress: Callable[[int, int], None] | None = None,
              ) -> tuple[int, dict[str, dict[str, Any]]]:
        """Compare every live read model with a fresh build from the log; return the build's
        position and, per read model, the ids of rows missing, extra or different in the live
        one. Rows the live projector changed after the build's position are not compared, so
        this can run while commands keep arriving."""
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
        ops = _Ops(shadow, self.engine.dialect.name)
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

    def _switch(self, ops: _Ops, only: frozenset[str] | None, chosen: tuple[str, ...],
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
