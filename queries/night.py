"""Tonight at a glance: what the dashboard (``GET /dashboard/summary``) shows on load.

Each section is one of the smart queries (pending commands merged, ``pending: true``) or a
count over one read model; a section the read models cannot answer while they are down is
answered from the journal where it can (pending rows) and is otherwise ``null`` — the
summary itself always answers, and says ``read_models: "unavailable"``.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import func, select

from infra.availability import UNAVAILABLE_ERRORS, read_models_state
from infra.read_model_db import byte_sum, is_postgres
from queries import packages, staging
from queries.downloads import DownloadQueries
from queries.overlay import Overlay
from queries.processing import ProcessingQueries
from queries.rows import changeable
from queries.service import COMMAND_TYPES, QueryService, Reading, package_view, staging_view

T = TypeVar("T")
#: Rows of each list the page shows.
RECENT = 20
#: The executions' timeline and the files-per-minute histogram cover this much of the night.
NIGHT_HOURS = 12
FILES_MINUTES = 60
STAGING_QUEUE = ("pending", "in_progress")


def _section(fn: Callable[[], T]) -> T | None:
    """A section, or None when the read models (or the store) do not answer for it."""
    try:
        return fn()
    except UNAVAILABLE_ERRORS:
        return None


def _iso(minute: Any) -> str:
    if isinstance(minute, datetime):
        return (minute if minute.tzinfo else minute.replace(tzinfo=UTC)).astimezone(
            UTC).isoformat()
    return str(minute)


class NightQueries:
    def __init__(self, queries: QueryService, downloads: DownloadQueries,
                 processing: ProcessingQueries) -> None:
        self.q = queries
        self.downloads = downloads
        self.processing = processing

    def summary(self, now: datetime | None = None) -> dict[str, Any]:
        now = now or datetime.now(UTC)
        q = self.q
        executions = _section(lambda: q.list_executions(
            status=None, instrument=None, start_from=now - timedelta(hours=NIGHT_HOURS),
            start_to=None, obs_unit_id=None, limit=500, offset=0))
        downloads = _section(lambda: self.downloads.list_jobs(None, RECENT, 0))
        jobs = _section(lambda: self.processing.list_jobs(None, None, RECENT, 0))
        counts = q.read(lambda r: self._counts(r, now))
        return {
            "at": now,
            "read_model_position": counts["position"],
            "executions": {"by_status": counts["executions"],
                           "items": executions[2] if executions else []},
            "files": counts["files"],
            "packages": counts["packages"],
            "staging": counts["staging"],
            "downloads": {"items": downloads[2] if downloads else []},
            "processing_jobs": {"by_status": counts["processing_jobs"],
                                "items": jobs[2] if jobs else []},
            "observation_results": counts["results"],
            "read_models": read_models_state(),
        }

    def _counts(self, r: Reading, now: datetime) -> dict[str, Any]:
        t = self.q.t
        u, f, p, s = t.executed_obs_units, t.raw_data_files, t.raw_data_packages, \
            t.staging_requests
        res, pj = t.observation_results, t.processing_jobs

        def by(table: Any, column: str) -> dict[str, int] | None:
            if not r.available:
                return None
            assert r.conn is not None
            return {str(k): int(n) for k, n in r.conn.execute(
                select(table.c[column], func.count()).group_by(table.c[column]))}

        since = now - timedelta(minutes=FILES_MINUTES)
        per_minute: list[dict[str, Any]] | None = None
        packages: dict[str, Any] = {"by_status": None, "bytes_by_status": None, "items": []}
        staging: dict[str, Any] = {"by_status": by(s, "status"), "queue": []}
        if r.conn is not None:
            assert r.conn is not None
            minute = (func.date_trunc("minute", f.c.recorded_at) if is_postgres(self.q.engine)
                      else func.strftime("%Y-%m-%dT%H:%M:00+00:00", f.c.recorded_at))
            per_minute = [{"minute": _iso(m), "files": int(n)} for m, n in r.conn.execute(
                select(minute.label("m"), func.count()).where(f.c.recorded_at >= since)
                .group_by("m").order_by("m"))]
            sizes = r.conn.execute(select(p.c.status, func.count(),
                                          func.coalesce(byte_sum(self.q.engine,
                                                                 p.c.total_size), 0))
                                   .group_by(p.c.status)).all()
            packages["by_status"] = {str(k): int(n) for k, n, _ in sizes}
            packages["bytes_by_status"] = {str(k): int(b) for k, _, b in sizes}
        packages["items"] = self._pending_first(
            r, "raw_data_package", [changeable(package_view(x)) for x in r.rows(
                select(p).order_by(p.c.created_position.desc()).limit(RECENT))])
        staging["queue"] = self._pending_first(
            r, "staging", [changeable(staging_view(x)) for x in r.rows(
                select(s).where(s.c.status.in_(STAGING_QUEUE))
                .order_by(s.c.created_position).limit(RECENT))])
        results = {"fulfillment_status": by(res, "fulfillment_status"),
                   "data_product_status": by(res, "data_product_status"),
                   "pending_commands": len(r.unprojected(
                       None, COMMAND_TYPES["observation_result"]))}
        total_files = r.count(select(func.count()).select_from(f))
        return {"position": r.position, "executions": by(u, "status"),
                "files": {"total": total_files, "per_minute": per_minute,
                          "since": since, "pending_commands": len(r.unprojected(
                              None, COMMAND_TYPES["raw_data_file"]))},
                "packages": packages, "staging": staging,
                "processing_jobs": by(pj, "status"), "results": results}

    def _pending_first(self, r: Reading, kind: str,
                       rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """``rows`` with the pending commands' changes, entities not projected yet first."""
        types = {"raw_data_package": packages.COMMAND_TYPES,
                 "staging": staging.COMMAND_TYPES}[kind]
        overlay = Overlay(r.loader())
        for row in rows:
            overlay.rows[kind][str(row["id"])] = row
        for entry in r.unprojected(None, types)[-1000:]:
            overlay.apply(entry)
        known = {str(x["id"]) for x in rows}
        new = [overlay.rows[kind][i] for i in reversed(overlay.touched[kind])
               if i not in known and overlay.rows[kind][i] is not None]
        merged = [overlay.rows[kind][str(x["id"])] or x for x in rows]
        return [x for x in new + merged if x is not None][:RECENT * 2]
