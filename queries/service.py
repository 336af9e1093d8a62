"""Smart queries: read-model rows merged with the journal's not-yet-projected commands."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, func, select

from infra.journal import Journal
from infra.read_model_db import is_postgres
from projections.tables import build_positions, build_tables
from queries.overlay import Overlay

COMMAND_TYPES = {
    "executed_obs_unit": ("executed_obs_unit.start", "executed_obs_unit.finish"),
    "raw_data_file": ("raw_data_file.register", "raw_data_file.register_bulk",
                      "raw_data_package.create", "raw_data_package.add_files"),
    "observation_result": tuple(f"observation_result.{c}" for c in (
        "materialize", "dispatch", "report_task", "cancel", "contribute_asset", "start_run",
        "end_run")),
}
PENDING_SCAN_LIMIT = 10_000


def _aware(v: Any) -> Any:
    if isinstance(v, datetime) and v.tzinfo is None:
        return v.replace(tzinfo=UTC)
    return v


class QueryService:
    def __init__(self, engine: Engine, journal: Journal) -> None:
        self.engine = engine
        self.journal = journal
        self.t = build_tables()
        self.positions = build_positions()

    # -- plumbing ------------------------------------------------------------------------
    def _connect(self) -> Connection:
        conn = self.engine.connect()
        if is_postgres(self.engine):  # one snapshot for the position and the rows
            conn = conn.execution_options(isolation_level="REPEATABLE READ")
        return conn

    def _position(self, conn: Connection) -> int:
        row = conn.execute(select(self.positions.c.position)
                           .where(self.positions.c.name == "read_models")).first()
        return int(row[0]) if row else 0

    def read_model_position(self) -> int:
        with self.engine.connect() as conn:
            return self._position(conn)

    def _rows(self, conn: Connection, q: Any) -> list[dict[str, Any]]:
        return [{k: _aware(v) for k, v in r._mapping.items()} for r in conn.execute(q)]

    def _loader(self, conn: Connection) -> Callable[[str, str], dict[str, Any] | None]:
        tables: dict[str, tuple[Table, Callable[[dict[str, Any]], dict[str, Any]]]] = {
            "executed_obs_unit": (self.t.executed_obs_units, unit_view),
            "raw_data_file": (self.t.raw_data_files, file_view),
            "raw_data_package": (self.t.raw_data_packages, package_view),
            "staging": (self.t.staging_requests, staging_view),
            "observation_result": (self.t.observation_results, result_view),
        }

        def load(kind: str, entity_id: str) -> dict[str, Any] | None:
            table, view = tables[kind]
            rows = self._rows(conn, select(table).where(table.c.id == entity_id))
            return view(rows[0]) if rows else None

        return load

    def _overlay(self, conn: Connection, position: int, subject: str | None,
                 command_types: tuple[str, ...] = ()) -> Overlay:
        overlay = Overlay(self._loader(conn))
        for entry in self.journal.unprojected(position, subject, command_types)[
                -PENDING_SCAN_LIMIT:]:
            overlay.apply(entry)
        return overlay

    def _one(self, kind: str, entity_id: str) -> dict[str, Any] | None:
        with self._connect() as conn, conn.begin():
            position = self._position(conn)
            overlay = self._overlay(conn, position, f"{kind}:{entity_id}")
            return overlay.row(kind, entity_id)

    # -- executed obs units --------------------------------------------------------------
    def execution(self, execution_id: str) -> dict[str, Any] | None:
        return self._one("executed_obs_unit", execution_id)

    def executions_of(self, obs_unit_id: str) -> tuple[int, list[dict[str, Any]]]:
        u = self.t.executed_obs_units
        with self._connect() as conn, conn.begin():
            position = self._position(conn)
            rows = [unit_view(r) for r in self._rows(
                conn, select(u).where(u.c.obs_unit_id == obs_unit_id).order_by(u.c.start_time))]
            overlay = Overlay(self._loader(conn))
            for r in rows:
                overlay.rows["executed_obs_unit"][str(r["id"])] = r
            for entry in self.journal.unprojected(position, f"obs_unit:{obs_unit_id}"):
                overlay.apply(entry)
                # finishes of those executions are indexed under the execution id
            for unit in [r for r in overlay.rows["executed_obs_unit"].values() if r]:
                for entry in self.journal.unprojected(position, f"executed_obs_unit:{unit['id']}"):
                    if entry.command_type == "executed_obs_unit.finish":
                        overlay.apply(entry)
            result = [r for r in overlay.rows["executed_obs_unit"].values()
                      if r is not None and r["obs_unit_id"] == obs_unit_id]
        result.sort(key=lambda r: str(r["start_time"]))
        return position, result

    def list_executions(self, *, status: str | None, instrument: str | None,
                        start_from: datetime | None, start_to: datetime | None,
                        obs_unit_id: str | None, limit: int, offset: int
                        ) -> tuple[int, int, list[dict[str, Any]], int]:
        u = self.t.executed_obs_units
        conds = []
        if status:
            conds.append(u.c.status == status)
        if instrument:
            conds.append(u.c.instrument == instrument)
        if obs_unit_id:
            conds.append(u.c.obs_unit_id == obs_unit_id)
        if start_from:
            conds.append(u.c.start_time >= start_from)
        if start_to:
            conds.append(u.c.start_time < start_to)

        def matches(r: dict[str, Any]) -> bool:
            st = _parse_dt(r["start_time"])
            return ((not status or r["status"] == status)
                    and (not instrument or r["instrument"] == instrument)
                    and (not obs_unit_id or r["obs_unit_id"] == obs_unit_id)
                    and (not start_from or st >= start_from)
                    and (not start_to or st < start_to))

        order = (u.c.start_time.desc(), u.c.id)
        return self._page(u, conds, order, unit_view, "executed_obs_unit", matches,
                          limit, offset)

    # -- raw data files ------------------------------------------------------------------
    def file(self, file_id: str) -> dict[str, Any] | None:
        return self._one("raw_data_file", file_id)

    def list_files(self, *, executed_obs_unit_id: str | None, package_id: str | None,
                   instrument: str | None, file_type: str | None, name: str | None,
                   limit: int, offset: int) -> tuple[int, int, list[dict[str, Any]], int]:
        f = self.t.raw_data_files
        filters = {"executed_obs_unit_id": executed_obs_unit_id, "package_id": package_id,
                   "instrument": instrument, "file_type": file_type, "name": name}
        conds = [f.c[k] == v for k, v in filters.items() if v is not None]

        def matches(r: dict[str, Any]) -> bool:
            return all(v is None or str(r.get(k)) == v for k, v in filters.items())

        order = (f.c.created_at.desc(), f.c.id)
        return self._page(f, conds, order, file_view, "raw_data_file", matches, limit, offset)

    def _page(self, table: Table, conds: list[Any], order: tuple[Any, ...],
              view: Callable[[dict[str, Any]], dict[str, Any]], kind: str,
              matches: Callable[[dict[str, Any]], bool], limit: int, offset: int
              ) -> tuple[int, int, list[dict[str, Any]], int]:
        with self._connect() as conn, conn.begin():
            position = self._position(conn)
            total = conn.execute(select(func.count()).select_from(table).where(*conds)).scalar()
            rows = [view(r) for r in self._rows(
                conn, select(table).where(*conds).order_by(*order).limit(limit).offset(offset))]
            overlay = Overlay(self._loader(conn))
            for r in rows:
                overlay.rows[kind][str(r["id"])] = r
            for entry in self.journal.unprojected(position, None, COMMAND_TYPES[kind])[
                    -PENDING_SCAN_LIMIT:]:
                overlay.apply(entry)
        on_page = {str(r["id"]) for r in rows}
        merged = [overlay.rows[kind][str(r["id"])] or r for r in rows]
        new: list[dict[str, Any]] = []
        if not offset:  # entities not projected at all yet lead the first page, newest first
            for i in reversed(overlay.touched[kind]):
                row = overlay.rows[kind][i]
                if i not in on_page and row is not None and row.get("last_position") is None:
                    new.append(row)
        items = [r for r in new + merged if matches(r)]
        return position, int(total or 0), items, sum(1 for r in items if r.get("pending"))

    # -- packages and staging ------------------------------------------------------------
    def package(self, package_id: str) -> dict[str, Any] | None:
        f = self.t.raw_data_files
        with self._connect() as conn, conn.begin():
            position = self._position(conn)
            overlay = self._overlay(conn, position, f"raw_data_package:{package_id}")
            pkg = overlay.row("raw_data_package", package_id)
            if pkg is None:
                return None
            files = {str(r["id"]): file_view(r) for r in self._rows(
                conn, select(f).where(f.c.package_id == package_id).order_by(f.c.name))}
            for fid, r in overlay.rows["raw_data_file"].items():
                if r is not None and str(r.get("package_id")) == package_id:
                    files[fid] = r
        pkg["files"] = sorted(files.values(), key=lambda r: r["name"])
        return pkg

    def staging(self, staging_id: str) -> dict[str, Any] | None:
        row = self._one("staging", staging_id)
        if row is not None and row.get("bytes_total"):
            row["progress_percent"] = round(100.0 * row["bytes_transferred"] / row["bytes_total"],
                                            2)
        return row


    # -- observation results -------------------------------------------------------------
    def result(self, result_id: str) -> dict[str, Any] | None:
        """One result with its tasks and processing runs (outputs included)."""
        tk, rn = self.t.observation_result_tasks, self.t.processing_runs
        with self._connect() as conn, conn.begin():
            position = self._position(conn)
            pending = self.journal.unprojected(position, f"observation_result:{result_id}")
            overlay = Overlay(self._loader(conn))
            for entry in pending[-PENDING_SCAN_LIMIT:]:
                overlay.apply(entry)
            row = overlay.row("observation_result", result_id)
            if row is None:
                return None
            tasks = {r["id"]: task_view(r) for r in self._rows(
                conn, select(tk).where(tk.c.result_id == result_id).order_by(tk.c.attempt))}
            runs = {r["id"]: run_view(r) for r in self._rows(
                conn, select(rn).where(rn.c.result_id == result_id).order_by(rn.c.started_at))}
        for entry in pending:  # tasks and runs not projected yet
            p = entry.payload
            if entry.command_type == "observation_result.dispatch" and \
                    str(p["task_id"]) not in tasks:
                tasks[str(p["task_id"])] = {
                    "id": str(p["task_id"]), "attempt": None, "status": "open",
                    "instrument_id": p.get("instrument_id"),
                    "executed_obs_unit_id": p.get("executed_obs_unit_id"),
                    "dispatched_at": None, "finished_at": None, "pending": True}
            elif entry.command_type == "observation_result.start_run" and \
                    str(p["run_id"]) not in runs:
                runs[str(p["run_id"])] = {
                    "id": str(p["run_id"]), "revision": None, "status": "running",
                    "started_at": None, "finished_at": None, "outputs": [], "error": None,
                    "pending": True}
        row["tasks"] = list(tasks.values())
        row["runs"] = list(runs.values())
        return row

    def list_results(self, *, observation_id: int | None, request_id: int | None,
                     instrument_id: str | None, fulfillment_status: str | None,
                     data_product_status: str | None, dirty: bool | None, limit: int,
                     offset: int) -> tuple[int, int, list[dict[str, Any]], int]:
        r = self.t.observation_results
        filters = {"observation_id": observation_id, "request_id": request_id,
                   "instrument_id": instrument_id, "fulfillment_status": fulfillment_status,
                   "data_product_status": data_product_status}
        conds = [r.c[k] == v for k, v in filters.items() if v is not None]
        if dirty is not None:
            conds.append(r.c.dirty_from_revision.isnot(None) if dirty
                         else r.c.dirty_from_revision.is_(None))

        def matches(row: dict[str, Any]) -> bool:
            return (all(v is None or row.get(k) == v for k, v in filters.items())
                    and (dirty is None or row["dirty"] == dirty))

        order = (r.c.request_id, r.c.epoch_index, r.c.sample_index, r.c.copy_index, r.c.id)
        return self._page(r, conds, order, result_view, "observation_result", matches, limit,
                          offset)

    def due_results(self, now: datetime, limit: int) -> list[dict[str, Any]]:
        """Dirty results with no run in progress, soonest first: what the scheduler builds
        next and when (``due`` says whether now)."""
        r = self.t.observation_results
        with self._connect() as conn, conn.begin():
            position = self._position(conn)
            rows = self._rows(conn, select(r).where(
                r.c.next_eligible_run_at.isnot(None), r.c.dirty_from_revision.isnot(None),
                r.c.current_processing_run_id.is_(None),
            ).order_by(r.c.next_eligible_run_at, r.c.id).limit(limit))
        # a run started but not projected yet is in progress too
        starting = {str(e.payload["id"]) for e in self.journal.unprojected(
            position, None, ("observation_result.start_run",))}
        out = []
        for row in rows:
            if str(row["id"]) in starting:
                continue
            view = result_view(row)
            view["due"] = _aware(row["next_eligible_run_at"]) <= now
            out.append(view)
        return out

    def result_counts(self) -> dict[str, Any]:
        """Projected results by fulfillment and by data-product status (dashboards)."""
        r = self.t.observation_results
        with self._connect() as conn, conn.begin():
            position = self._position(conn)
            counts: dict[str, Any] = {"read_model_position": position}
            for column in ("fulfillment_status", "data_product_status"):
                counts[column] = {k: int(n) for k, n in conn.execute(
                    select(r.c[column], func.count()).group_by(r.c[column]))}
            counts["dirty"] = int(conn.execute(select(func.count()).select_from(r).where(
                r.c.dirty_from_revision.isnot(None))).scalar() or 0)
            counts["total"] = int(conn.execute(select(func.count()).select_from(r)).scalar()
                                  or 0)
        counts["pending_commands"] = len(self.journal.unprojected(
            position, None, COMMAND_TYPES["observation_result"]))
        return counts


def _parse_dt(v: Any) -> datetime:
    if isinstance(v, datetime):
        return _aware(v)  # type: ignore[no-any-return]
    return _aware(datetime.fromisoformat(str(v).replace("Z", "+00:00")))  # type: ignore[no-any-return]


def unit_view(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["id"], "obs_unit_id": r["obs_unit_id"], "instrument": r["instrument"],
        "status": r["status"], "start_time": r["start_time"], "end_time": r["end_time"],
        "metadata": {**(r["metadata"] or {}), **(r["finish_metadata"] or {})},
        "started_by": r["started_by"], "finished_by": r["finished_by"],
        "last_position": r["last_position"], "pending": False,
    }


def file_view(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["id"], "name": r["name"], "instrument": r["instrument"],
        "relative_path": r["relative_path"], "size": r["size"],
        "checksum": {"algorithm": r["checksum_algorithm"], "value": r["checksum_value"]},
        "executed_obs_unit_id": r["executed_obs_unit_id"], "package_id": r["package_id"],
        "file_type": r["file_type"], "created_at": r["created_at"],
        "last_position": r["last_position"], "pending": False,
    }


def package_view(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["id"], "name": r["name"], "executed_obs_unit_id": r["executed_obs_unit_id"],
        "status": r["status"], "total_size": r["total_size"], "file_count": r["file_count"],
        "finalized_at": r["finalized_at"], "last_position": r["last_position"], "pending": False,
    }


def staging_view(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": r["id"], "package_ids": r["package_ids"], "destination": r["destination"],
        "status": r["status"], "bytes_total": r["bytes_total"], "files_total": r["files_total"],
        "bytes_transferred": r["bytes_transferred"], "files_transferred": r["files_transferred"],
        "message": r["message"], "last_position": r["last_position"], "pending": False,
    }


def result_view(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "observation_id", "request_id", "epoch_index", "sample_index", "copy_index",
            "instrument_id", "copies_mode", "not_before", "spec_snapshot", "fulfillment_status",
            "fulfilled_on", "task_count", "data_product_status", "assets_revision",
            "dirty_from_revision", "next_eligible_run_at", "last_built_revision",
            "current_processing_run_id", "failed_runs", "last_position")
    view = {k: r[k] for k in keys}
    view["short_id"] = r["created_position"]  # the Materialized event's log position
    view["dirty"] = r["dirty_from_revision"] is not None
    view["pending"] = False
    return view


def task_view(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("id", "attempt", "status", "instrument_id",
                              "executed_obs_unit_id", "dispatched_at", "finished_at")
            } | {"pending": False}


def run_view(r: dict[str, Any]) -> dict[str, Any]:
    return {k: r[k] for k in ("id", "revision", "status", "started_at", "finished_at",
                              "outputs", "error")} | {"pending": False}
