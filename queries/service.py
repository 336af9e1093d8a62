"""Smart queries: read-model rows merged with the journal's not-yet-projected commands.

While the read-model database does not answer, a smart query is answered from the journal
alone (:class:`Reading` without a snapshot): what commands accepted by this process, and not
yet in the read models as it last saw them, will create or change. Rows so answered say
``pending: true`` and ``read_models: "unavailable"``; a query the journal cannot answer
raises ``ReadModelsUnavailable`` (HTTP 503).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, Table, func, select

from commands.obs_units import ObsUnitCommand
from commands.registry import SHOWN_IN
from commands.results import ResultCommand
from infra.availability import READ_MODEL_DB, Availability, note_unavailable, unavailable_part
from infra.journal import Journal, JournalEntry
from infra.read_model_db import ReadModelsUnavailable, is_postgres
from projections.tables import build_positions, build_tables
from queries.listing import (
    as_time,
    equal_to,
    ordering,
    registered_filters,
    time_range,
    within,
)
from queries.overlay import Overlay
from queries.rows import (
    ExecutedObsUnitRow,
    ObservationResultRow,
    ProcessingRunRow,
    RawDataFileRow,
    RawDataPackageRow,
    ResultCountsRow,
    ResultTaskRow,
    StagingRequestRow,
    changeable,
)

#: entity kind → the command types whose pending commands change its rows
COMMAND_TYPES = SHOWN_IN
PENDING_SCAN_LIMIT = 10_000


def _aware(v: Any) -> Any:
    if isinstance(v, datetime) and v.tzinfo is None:
        return v.replace(tzinfo=UTC)
    return v


T = TypeVar("T")
#: Journal entries applied beyond this position are not in the read models as seen: with no
#: position seen yet, only commands still waiting to be applied are certainly not there.
NOTHING_SEEN = sys.maxsize
UNAVAILABLE = "unavailable"


class Reading:
    """What one smart query reads: the read models in one snapshot (``conn``), or — while
    they do not answer — nothing (``conn`` None, ``available`` False): no rows, and
    ``position`` is the last one this process saw in them (None if none)."""

    def __init__(self, q: QueryService, conn: Connection | None, position: int | None) -> None:
        self.q = q
        self.conn = conn
        self.position = position

    @property
    def available(self) -> bool:
        return self.conn is not None

    def rows(self, stmt: Any) -> list[dict[str, Any]]:
        return [] if self.conn is None else self.q.fetch_rows(self.conn, stmt)

    def count(self, stmt: Any) -> int | None:
        return None if self.conn is None else int(self.conn.execute(stmt).scalar() or 0)

    def unprojected(self, subject: str | None = None,
                    command_types: Sequence[str] = ()) -> list[JournalEntry]:
        """Journal entries not (certainly) in the rows read, oldest first."""
        after = NOTHING_SEEN if self.position is None else self.position
        return self.q.journal.unprojected(after, subject, command_types)

    def loader(self) -> Callable[[str, str], dict[str, Any] | None]:
        return self.q.row_loader(self.conn) if self.conn is not None else lambda _k, _i: None

    def pending_row(self, kind: str, entity_id: str) -> dict[str, Any] | None:
        """What this entity's pending commands alone make of it (None if nothing)."""
        overlay = Overlay(lambda _k, _i: None)
        for entry in self.unprojected(f"{kind}:{entity_id}")[-PENDING_SCAN_LIMIT:]:
            overlay.apply(entry)
        return overlay.rows[kind].get(entity_id)

    def entity(self, row: dict[str, Any] | None, what: str) -> dict[str, Any] | None:
        """The answer for one entity. Without the read models: the journal's row, marked,
        or 503 — the journal knowing nothing of it does not make it unknown."""
        if self.conn is not None:
            return row
        if row is None:
            raise ReadModelsUnavailable(
                f"the read models do not answer, and this server's journal holds no pending "
                f"command that creates {what}")
        row["read_models"] = UNAVAILABLE
        return row

    def listing(self, rows: list[dict[str, Any]], offset: int = 0,
                limit: int | None = None) -> list[dict[str, Any]]:
        """The rows of a list. Without the read models: the pending rows the journal knows,
        on the first page only and at most ``limit`` of them (the newest), marked; 503 when
        it knows none."""
        if self.conn is not None:
            return rows
        if offset or not rows:
            raise ReadModelsUnavailable(
                "the read models do not answer, and this server's journal holds no pending "
                "command for this list" + (" (only its first page has them)" if offset else ""))
        rows = rows[:limit]
        for row in rows:
            row["read_models"] = UNAVAILABLE
        return rows


class QueryService:
    def __init__(self, engine: Engine, journal: Journal,
                 availability: Availability | None = None) -> None:
        self.engine = engine
        self.journal = journal
        self.availability = availability or Availability()
        self.t = build_tables()
        self.positions = build_positions()
        self.seen_position: int | None = None  # the read models' position as last read

    # -- plumbing ------------------------------------------------------------------------
    def read(self, query: Callable[[Reading], T]) -> T:
        """``query`` on one snapshot of the read models; when they do not answer (now, or
        known to be down), on none: ``query`` then answers from the journal alone."""
        if self.availability.up(READ_MODEL_DB):
            try:
                with self.connect() as conn, conn.begin():
                    result = query(Reading(self, conn, self.read_position(conn)))
            except Exception as e:
                if unavailable_part(e) != READ_MODEL_DB:
                    raise
                self.availability.failed(READ_MODEL_DB, e)
            else:
                self.availability.succeeded(READ_MODEL_DB)
                return result
        note_unavailable(READ_MODEL_DB)
        return query(Reading(self, None, self.seen_position))

    def connect(self) -> Connection:
        """A read-model connection (one snapshot on PostgreSQL); ReadModelsUnavailable at
        once while the database is known to be down."""
        if self.availability.down(READ_MODEL_DB):  # a request does not wait for a dead server
            note_unavailable(READ_MODEL_DB)
            raise ReadModelsUnavailable("the read-model database does not answer")
        conn = self.engine.connect()
        if is_postgres(self.engine):  # one snapshot for the position and the rows
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        return conn

    def read_position(self, conn: Connection) -> int:
        """The log position the read models include, in ``conn``'s snapshot."""
        row = conn.execute(select(self.positions.c.position)
                           .where(self.positions.c.name == "read_models")).first()
        position = int(row[0]) if row else 0
        if self.seen_position is None or position > self.seen_position:
            self.seen_position = position
        return position

    def read_model_position(self) -> int:
        with self.engine.connect() as conn:
            return self.read_position(conn)

    def fetch_rows(self, conn: Connection, q: Any) -> list[dict[str, Any]]:
        """The rows of ``q`` as dicts, times aware (UTC)."""
        return [{k: _aware(v) for k, v in r._mapping.items()} for r in conn.execute(q)]

    def row_loader(self, conn: Connection) -> Callable[[str, str], dict[str, Any] | None]:
        """(kind, id) → the projected row as a view, for the pending-command overlay."""
        tables: dict[str, tuple[Table, Callable[[dict[str, Any]], Mapping[str, Any]]]] = {
            "executed_obs_unit": (self.t.executed_obs_units, unit_view),
            "raw_data_file": (self.t.raw_data_files, file_view),
            "raw_data_package": (self.t.raw_data_packages, package_view),
            "staging": (self.t.staging_requests, staging_view),
            "observation_result": (self.t.observation_results, result_view),
        }

        def load(kind: str, entity_id: str) -> dict[str, Any] | None:
            table, view = tables[kind]
            rows = self.fetch_rows(conn, select(table).where(table.c.id == entity_id))
            return changeable(view(rows[0])) if rows else None

        return load

    def _overlay(self, r: Reading, subject: str | None,
                 command_types: tuple[str, ...] = ()) -> Overlay:
        # one entity's commands: one it changes that was created apart (a package's files
        # registered by other commands) is taken from its own pending commands
        overlay = Overlay(r.loader(), r.pending_row)
        for entry in r.unprojected(subject, command_types)[-PENDING_SCAN_LIMIT:]:
            overlay.apply(entry)
        return overlay

    def _one(self, kind: str, entity_id: str) -> dict[str, Any] | None:
        def query(r: Reading) -> dict[str, Any] | None:
            row = self._overlay(r, f"{kind}:{entity_id}").row(kind, entity_id)
            return r.entity(row, f"{kind.replace('_', ' ')} {entity_id}")
        return self.read(query)

    # -- executed obs units --------------------------------------------------------------
    def execution(self, execution_id: str) -> dict[str, Any] | None:
        return self._one("executed_obs_unit", execution_id)

    def executions_of(self, obs_unit_id: str) -> tuple[int | None, list[dict[str, Any]]]:
        u = self.t.executed_obs_units

        def query(r: Reading) -> tuple[int | None, list[dict[str, Any]]]:
            rows = [changeable(unit_view(x)) for x in r.rows(
                select(u).where(u.c.obs_unit_id == obs_unit_id).order_by(u.c.start_time))]
            overlay = Overlay(r.loader())
            for row in rows:
                overlay.rows["executed_obs_unit"][str(row["id"])] = row
            for entry in r.unprojected(f"obs_unit:{obs_unit_id}"):
                overlay.apply(entry)
                # finishes of those executions are indexed under the execution id
            for unit in [x for x in overlay.rows["executed_obs_unit"].values() if x]:
                for entry in r.unprojected(f"executed_obs_unit:{unit['id']}"):
                    if entry.command_type == ObsUnitCommand.EXECUTED_OBS_UNIT_FINISH:
                        overlay.apply(entry)
            result = [x for x in overlay.rows["executed_obs_unit"].values()
                      if x is not None and x["obs_unit_id"] == obs_unit_id]
            result.sort(key=lambda x: str(x["start_time"]))
            return r.position, r.listing(result)

        return self.read(query)

    def list_executions(self, *, status: str | None, instrument: str | None,
                        start_from: datetime | None, start_to: datetime | None,
                        obs_unit_id: str | None, limit: int, offset: int,
                        sort: str = "-start_time",
                        ) -> tuple[int | None, int | None, list[dict[str, Any]], int]:
        u = self.t.executed_obs_units
        conds = [*equal_to(u, {"status": status or None, "instrument": instrument or None,
                               "obs_unit_id": obs_unit_id or None}),
                 *time_range(u.c.start_time, start_from or None, start_to or None)]

        def matches(r: dict[str, Any]) -> bool:
            st = as_time(r["start_time"])
            return ((not status or r["status"] == status)
                    and (not instrument or r["instrument"] == instrument)
                    and (not obs_unit_id or r["obs_unit_id"] == obs_unit_id)
                    and (not start_from or st >= start_from)
                    and (not start_to or st < start_to))

        order = ordering(u, sort, UNIT_SORTS)
        return self.page(u, conds, order, unit_view, "executed_obs_unit", matches,
                         limit, offset)

    # -- raw data files ------------------------------------------------------------------
    def file(self, file_id: str) -> dict[str, Any] | None:
        return self._one("raw_data_file", file_id)

    def list_files(self, *, executed_obs_unit_id: str | None, package_id: str | None,
                   instrument: str | None, file_type: str | None, name: str | None,
                   limit: int, offset: int, created_from: datetime | None = None,
                   created_to: datetime | None = None, registered_from: datetime | None = None,
                   registered_to: datetime | None = None, sort: str = "-created_at",
                   ) -> tuple[int | None, int | None, list[dict[str, Any]], int]:
        f = self.t.raw_data_files
        conds, registered = registered_filters(
            f, {"executed_obs_unit_id": executed_obs_unit_id, "package_id": package_id,
                "instrument": instrument, "file_type": file_type, "name": name},
            registered_from, registered_to)
        conds += time_range(f.c.created_at, created_from, created_to)

        def matches(r: dict[str, Any]) -> bool:
            return registered(r) and within(r["created_at"], created_from, created_to)

        order = ordering(f, sort, FILE_SORTS)
        return self.page(f, conds, order, file_view, "raw_data_file", matches, limit, offset)

    def page(self, table: Table, conds: list[Any], order: tuple[Any, ...],
             view: Callable[[dict[str, Any]], Mapping[str, Any]], kind: str,
             matches: Callable[[dict[str, Any]], bool], limit: int, offset: int,
             command_types: Sequence[str] | None = None,
             ) -> tuple[int | None, int | None, list[dict[str, Any]], int]:
        """One page of a read model's rows (``conds``, ``order``), merged with the pending
        commands (``command_types``, default those of ``kind``): entities they create lead
        the first page (if they ``match``), rows they change show the change. Answers
        (read-model position, total or None, rows, pending rows on the page)."""
        types = tuple(command_types if command_types is not None else COMMAND_TYPES[kind])

        def query(r: Reading) -> tuple[int | None, int | None, list[dict[str, Any]], int]:
            total = r.count(select(func.count()).select_from(table).where(*conds))
            rows = [changeable(view(x)) for x in r.rows(
                select(table).where(*conds).order_by(*order).limit(limit).offset(offset))]
            overlay = Overlay(r.loader())
            for row in rows:
                overlay.rows[kind][str(row["id"])] = row
            for entry in r.unprojected(None, types)[-PENDING_SCAN_LIMIT:]:
                overlay.apply(entry)
            on_page = {str(x["id"]) for x in rows}
            merged = [overlay.rows[kind][str(x["id"])] or x for x in rows]
            new: list[dict[str, Any]] = []
            if not offset:  # entities not projected at all yet lead the first page, newest first
                for i in reversed(overlay.touched[kind]):
                    touched = overlay.rows[kind][i]
                    if i not in on_page and touched is not None and \
                            touched.get("last_position") is None:
                        new.append(touched)
            items = r.listing([x for x in new + merged if matches(x)], offset, limit)
            return r.position, total, items, sum(1 for x in items if x.get("pending"))

        return self.read(query)

    # -- packages and staging ------------------------------------------------------------
    def package(self, package_id: str) -> dict[str, Any] | None:
        f = self.t.raw_data_files

        def query(r: Reading) -> dict[str, Any] | None:
            overlay = self._overlay(r, f"raw_data_package:{package_id}")
            pkg = r.entity(overlay.row("raw_data_package", package_id),
                           f"raw data package {package_id}")
            if pkg is None:
                return None
            files = {str(x["id"]): changeable(file_view(x)) for x in r.rows(
                select(f).where(f.c.package_id == package_id).order_by(f.c.name))}
            for fid, x in overlay.rows["raw_data_file"].items():
                if x is not None and str(x.get("package_id")) == package_id:
                    files[fid] = x
            pkg["files"] = sorted(files.values(), key=lambda x: x["name"])
            if not r.available:
                for x in pkg["files"]:
                    x["read_models"] = UNAVAILABLE
            return pkg

        return self.read(query)

    def staging(self, staging_id: str) -> dict[str, Any] | None:
        row = self._one("staging", staging_id)
        return None if row is None else with_progress(row)


    # -- observation results -------------------------------------------------------------
    def result(self, result_id: str) -> dict[str, Any] | None:
        """One result with its tasks and processing runs (outputs included)."""
        tk, rn = self.t.observation_result_tasks, self.t.processing_runs

        def query(r: Reading) -> dict[str, Any] | None:
            pending = r.unprojected(f"observation_result:{result_id}")
            overlay = Overlay(r.loader())
            for entry in pending[-PENDING_SCAN_LIMIT:]:
                overlay.apply(entry)
            row = r.entity(overlay.row("observation_result", result_id),
                           f"observation result {result_id}")
            if row is None:
                return None
            tasks: dict[str, ResultTaskRow] = {x["id"]: task_view(x) for x in r.rows(
                select(tk).where(tk.c.result_id == result_id).order_by(tk.c.attempt))}
            runs: dict[str, ProcessingRunRow] = {x["id"]: run_view(x) for x in r.rows(
                select(rn).where(rn.c.result_id == result_id).order_by(rn.c.started_at))}
            for entry in pending:  # tasks and runs not projected yet
                p = entry.payload
                if entry.command_type == ResultCommand.OBSERVATION_RESULT_DISPATCH and \
                        str(p["task_id"]) not in tasks:
                    tasks[str(p["task_id"])] = {
                        "id": str(p["task_id"]), "attempt": None, "status": "open",
                        "instrument_id": p.get("instrument_id"),
                        "executed_obs_unit_id": p.get("executed_obs_unit_id"),
                        "dispatched_at": None, "finished_at": None, "pending": True}
                elif entry.command_type == ResultCommand.OBSERVATION_RESULT_START_RUN and \
                        str(p["run_id"]) not in runs:
                    runs[str(p["run_id"])] = {
                        "id": str(p["run_id"]), "revision": None, "status": "running",
                        "started_at": None, "finished_at": None, "outputs": [],
                        "error": None, "pending": True}
            row["tasks"] = list(tasks.values())
            row["runs"] = list(runs.values())
            return row

        return self.read(query)

    def list_results(self, *, observation_id: int | None, request_id: int | None,
                     instrument_id: str | None, fulfillment_status: str | None,
                     data_product_status: str | None, dirty: bool | None, limit: int,
                     offset: int) -> tuple[int | None, int | None, list[dict[str, Any]], int]:
        r = self.t.observation_results
        filters = {"observation_id": observation_id, "request_id": request_id,
                   "instrument_id": instrument_id, "fulfillment_status": fulfillment_status,
                   "data_product_status": data_product_status}
        conds = equal_to(r, filters)
        if dirty is not None:
            conds.append(r.c.dirty_from_revision.isnot(None) if dirty
                         else r.c.dirty_from_revision.is_(None))

        def matches(row: dict[str, Any]) -> bool:
            return (all(v is None or row.get(k) == v for k, v in filters.items())
                    and (dirty is None or row["dirty"] == dirty))

        order = (r.c.request_id, r.c.epoch_index, r.c.sample_index, r.c.copy_index, r.c.id)
        return self.page(r, conds, order, result_view, "observation_result", matches, limit,
                         offset)

    def due_results(self, now: datetime, limit: int) -> list[ObservationResultRow]:
        """Dirty results with no run in progress, soonest first: what the scheduler builds
        next and when (``due`` says whether now)."""
        r = self.t.observation_results
        with self.connect() as conn, conn.begin():
            position = self.read_position(conn)
            rows = self.fetch_rows(conn, select(r).where(
                r.c.next_eligible_run_at.isnot(None), r.c.dirty_from_revision.isnot(None),
                r.c.current_processing_run_id.is_(None),
            ).order_by(r.c.next_eligible_run_at, r.c.id).limit(limit))
        # a run started but not projected yet is in progress too
        starting = {str(e.payload["id"]) for e in self.journal.unprojected(
            position, None, (ResultCommand.OBSERVATION_RESULT_START_RUN,))}
        out: list[ObservationResultRow] = []
        for row in rows:
            if str(row["id"]) in starting:
                continue
            view = result_view(row)
            view["due"] = _aware(row["next_eligible_run_at"]) <= now
            out.append(view)
        return out

    def result_counts(self) -> ResultCountsRow:
        """Projected results by fulfillment and by data-product status (dashboards)."""
        r = self.t.observation_results
        with self.connect() as conn, conn.begin():
            position = self.read_position(conn)
            by_status = {column: {k: int(n) for k, n in conn.execute(
                select(r.c[column], func.count()).group_by(r.c[column]))}
                for column in ("fulfillment_status", "data_product_status")}
            dirty = int(conn.execute(select(func.count()).select_from(r).where(
                r.c.dirty_from_revision.isnot(None))).scalar() or 0)
            total = int(conn.execute(select(func.count()).select_from(r)).scalar() or 0)
        return {"read_model_position": position,
                "fulfillment_status": by_status["fulfillment_status"],
                "data_product_status": by_status["data_product_status"],
                "dirty": dirty, "total": total,
                "pending_commands": len(self.journal.unprojected(
                    position, None, COMMAND_TYPES["observation_result"]))}

    def status_counts(self, read_model: str) -> dict[str, int]:
        """Projected rows of a read model with a ``status`` column, by status (metrics: no
        overlay of pending commands)."""
        t: Table = getattr(self.t, read_model)
        with self.engine.connect() as conn:
            return {str(k): int(n) for k, n in conn.execute(
                select(t.c.status, func.count()).group_by(t.c.status))}


#: The sort keys of the lists (``-`` first: descending) and their columns.
UNIT_SORTS = {"start_time": "start_time"}
FILE_SORTS = {"created_at": "created_at", "registered_at": "recorded_at", "name": "name",
              "size": "size"}


def with_progress(row: dict[str, Any]) -> dict[str, Any]:
    """A staging request's row with its ``progress_percent`` (once its size is known)."""
    if row.get("bytes_total"):
        row["progress_percent"] = round(100.0 * row["bytes_transferred"] / row["bytes_total"], 2)
    return row


def unit_view(r: dict[str, Any]) -> ExecutedObsUnitRow:
    return {
        "id": r["id"], "obs_unit_id": r["obs_unit_id"], "instrument": r["instrument"],
        "status": r["status"], "start_time": r["start_time"], "end_time": r["end_time"],
        "metadata": {**(r["metadata"] or {}), **(r["finish_metadata"] or {})},
        "started_by": r["started_by"], "finished_by": r["finished_by"],
        "last_position": r["last_position"], "pending": False,
    }


def file_view(r: dict[str, Any]) -> RawDataFileRow:
    return {
        "id": r["id"], "name": r["name"], "instrument": r["instrument"],
        "relative_path": r["relative_path"], "size": r["size"],
        "checksum": {"algorithm": r["checksum_algorithm"], "value": r["checksum_value"]},
        "executed_obs_unit_id": r["executed_obs_unit_id"], "package_id": r["package_id"],
        "file_type": r["file_type"], "created_at": r["created_at"],
        "registered_at": _aware(r["recorded_at"]),
        "last_position": r["last_position"], "pending": False,
    }


def package_view(r: dict[str, Any]) -> RawDataPackageRow:
    return {
        "id": r["id"], "name": r["name"], "executed_obs_unit_id": r["executed_obs_unit_id"],
        "status": r["status"], "total_size": r["total_size"], "file_count": r["file_count"],
        "finalized_at": r["finalized_at"], "registered_at": _aware(r["recorded_at"]),
        "last_position": r["last_position"], "pending": False,
    }


def staging_view(r: dict[str, Any]) -> StagingRequestRow:
    return {
        "id": r["id"], "package_ids": r["package_ids"], "destination": r["destination"],
        "status": r["status"], "bytes_total": r["bytes_total"], "files_total": r["files_total"],
        "bytes_transferred": r["bytes_transferred"], "files_transferred": r["files_transferred"],
        "message": r["message"], "registered_at": _aware(r["recorded_at"]),
        "updated_at": _aware(r["updated_at"]), "last_position": r["last_position"],
        "pending": False,
    }


def result_view(r: dict[str, Any]) -> ObservationResultRow:
    return {
        "id": r["id"], "observation_id": r["observation_id"], "request_id": r["request_id"],
        "epoch_index": r["epoch_index"], "sample_index": r["sample_index"],
        "copy_index": r["copy_index"], "instrument_id": r["instrument_id"],
        "copies_mode": r["copies_mode"], "not_before": r["not_before"],
        "spec_snapshot": r["spec_snapshot"], "fulfillment_status": r["fulfillment_status"],
        "fulfilled_on": r["fulfilled_on"], "task_count": r["task_count"],
        "data_product_status": r["data_product_status"],
        "assets_revision": r["assets_revision"],
        "dirty_from_revision": r["dirty_from_revision"],
        "next_eligible_run_at": r["next_eligible_run_at"],
        "last_built_revision": r["last_built_revision"],
        "current_processing_run_id": r["current_processing_run_id"],
        "failed_runs": r["failed_runs"], "last_position": r["last_position"],
        "short_id": r["created_position"],  # the Materialized event's log position
        "dirty": r["dirty_from_revision"] is not None, "pending": False,
    }


def task_view(r: dict[str, Any]) -> ResultTaskRow:
    return {"id": r["id"], "attempt": r["attempt"], "status": r["status"],
            "instrument_id": r["instrument_id"], "executed_obs_unit_id": r["executed_obs_unit_id"],
            "dispatched_at": r["dispatched_at"], "finished_at": r["finished_at"],
            "pending": False}


def run_view(r: dict[str, Any]) -> ProcessingRunRow:
    return {"id": r["id"], "revision": r["revision"], "status": r["status"],
            "started_at": r["started_at"], "finished_at": r["finished_at"],
            "outputs": r["outputs"], "error": r["error"], "pending": False}
