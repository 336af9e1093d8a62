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
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, bindparam, inspect, select, update
from sqlalchemy.dialects import postgresql, sqlite

from infra.event_store import EventStore
from infra.read_model_db import insert_missing, is_postgres, write_transaction
from projections.downloads import download_handlers
from projections.tables import READ_MODELS, ReadModelTables, build_positions, build_tables

log = logging.getLogger("obsledger.projector")

MAIN = "read_models"

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
            stmt = (update(table).where(table.c.id == bindparam("_id"),
                                        table.c.last_position < bindparam("_position"))
                    .values({c: bindparam(c) for c in cols}))
            vals["_id"] = str(row_id)
            vals["_position"] = position
            return [((table.name, "upd", cols), stmt, vals)]

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

    def _apply(self, conn: Connection, ops: _Ops, notifications: Any) -> None:
        decode = self.store.decode

        def gen() -> Iterator[Op]:
            for n in notifications:
                yield from ops.ops(decode(n), n.id)

        execute_ops(conn, gen())

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
                    ) -> tuple[ReadModelTables, int]:
        """A new set of read-model tables (``<model>_r<hex>``) built from position 0 up to the
        log's head as it was when this started; return them and the position they reached."""
        generation = "r" + uuid.uuid4().hex[:12]
        shadow = build_tables(generation=generation, table_suffix="_" + generation)
        ops = _Ops(shadow, self.engine.dialect.name)
        with self.engine.begin() as conn:
            shadow.metadata.create_all(conn)
        pos = 0
        head = self.store.max_position()
        while pos < head:
            notifications = self.store.select_notifications(pos, self.page_size)
            if not notifications:
                break
            with self.engine.begin() as conn:
                self._apply(conn, ops, notifications)
            pos = notifications[-1].id
            if progress:
                progress(pos, max(head, pos))
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

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Build a fresh set of tables from position 0, then switch to it atomically.

        The live tables keep serving queries (and the live projector keeps running) until the
        switch, which happens in one transaction that also catches up the last events.
        """
        shadow, pos = self.build_fresh(progress)
        ops = _Ops(shadow, self.engine.dialect.name)
        generation = shadow.generation
        with write_transaction(self.engine) as conn:
            self._lock_position(conn, MAIN)
            while True:  # the last events, inside the switching transaction
                notifications = self.store.select_notifications(pos, self.page_size)
                if not notifications:
                    break
                self._apply(conn, ops, notifications)
                pos = notifications[-1].id
            existing = set(inspect(conn).get_table_names())
            for name in READ_MODELS:
                if name in existing:
                    conn.exec_driver_sql(f'DROP TABLE "{name}"')
                conn.exec_driver_sql(f'ALTER TABLE "{name}_{generation}" RENAME TO "{name}"')
            conn.execute(update(self.positions).where(self.positions.c.name == MAIN)
                         .values(position=pos, generation=generation,
                                 updated_at=datetime.now(UTC)))
        self._advance(pos)
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
