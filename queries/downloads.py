"""Smart queries of MAST download jobs: the read model (jobs, files, progress, speed, ETA)
merged with the journal's not-yet-projected download commands (``pending: true``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import func, select

from domain.downloads import download_file_id
from infra.journal import JournalEntry
from queries.overlay import mark_pending
from queries.service import PENDING_SCAN_LIMIT, QueryService

COMMAND_TYPES = tuple(f"download_job.{c}" for c in (
    "request", "start_file", "checkpoint", "complete_file", "fail", "pause", "resume",
    "cancel", "purge_partials"))
ACTIVE = ("requested", "running")
RESUMABLE = ("paused", "failed")
#: What a pending people's command will make of the job's status (if the domain allows it).
_CONTROL = {"download_job.pause": ({"requested", "running"}, "paused"),
            "download_job.resume": ({"paused", "failed"}, "running"),
            "download_job.cancel": ({"requested", "running", "paused", "failed"}, "cancelled")}


def file_view(r: dict[str, Any]) -> dict[str, Any]:
    size, done, speed = r["size"], r["bytes_done"], r["bytes_per_s"]
    return {
        "id": r["id"], "index": r["file_index"], "filename": r["filename"], "url": r["url"],
        "data_uri": r["data_uri"], "obs_id": r["obs_id"], "obsid": r["obsid"],
        "product_type": r["product_type"], "instrument": r["instrument"],
        "status": r["status"], "size": size, "bytes_done": done,
        "percent": round(100.0 * done / size, 2) if size else None,
        "bytes_per_s": speed,
        "eta_s": round((size - done) / speed, 1) if size is not None and speed else None,
        "etag": r["etag"], "last_modified": r["last_modified"], "sha256": r["sha256"],
        "fits": r["fits"], "restarts": r["restarts"], "started_at": r["started_at"],
        "checkpoint_at": r["checkpoint_at"], "completed_at": r["completed_at"],
    }


def job_view(r: dict[str, Any]) -> dict[str, Any]:
    total, done = r["bytes_total"], r["bytes_done"]
    return {
        "id": r["id"], "status": r["status"], "destination": r["destination"],
        "mode": r["mode"], "chunk_size": r["chunk_size"], "register_files": r["register_files"],
        "file_count": r["file_count"], "files_completed": r["files_completed"],
        "bytes_total": total, "bytes_done": done,
        "percent": round(100.0 * done / total, 2) if total else None,
        "bytes_per_s": None, "eta_s": None, "reason": r["reason"],
        "partials_purged": r["partials_purged"], "requested_at": r["requested_at"],
        "finished_at": r["finished_at"], "updated_at": r["updated_at"],
        "last_position": r["last_position"], "pending": False, "command_status": None,
        "pending_command_ids": [],
    }


def _with_speed(job: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's speed is the sum of its downloading files' speeds (last checkpoints)."""
    speeds = [f["bytes_per_s"] for f in files if f["status"] == "downloading"
              and f["bytes_per_s"]]
    if job["status"] == "running" and speeds:
        job["bytes_per_s"] = round(sum(speeds), 1)
        if job["bytes_total"] is not None:
            job["eta_s"] = round((job["bytes_total"] - job["bytes_done"]) / job["bytes_per_s"],
                                 1)
    return job


def _pending_job(e: JournalEntry) -> dict[str, Any]:
    p = e.payload
    sizes = [f.get("size") for f in p["files"]]
    job = job_view({
        "id": p["id"], "status": "requested", "destination": p["destination"],
        "mode": p["mode"], "chunk_size": p["chunk_size"],
        "register_files": p["register_files"], "file_count": len(p["files"]),
        "files_completed": 0,
        "bytes_total": None if None in sizes else sum(s for s in sizes if s is not None),
        "bytes_done": 0, "reason": None, "partials_purged": False,
        "requested_at": e.received_at, "finished_at": None, "updated_at": e.received_at,
        "last_position": None})
    job["files"] = [file_view({
        "id": str(download_file_id(UUID(str(p["id"])), i)), "file_index": i,
        "filename": f["filename"], "url": f["url"], "data_uri": f.get("data_uri"),
        "obs_id": f.get("obs_id"), "obsid": f.get("obsid"),
        "product_type": f.get("product_type"), "instrument": f.get("instrument"),
        "status": "pending", "size": f.get("size"), "bytes_done": 0, "bytes_per_s": None,
        "etag": None, "last_modified": None, "sha256": None, "fits": None, "restarts": 0,
        "started_at": None, "checkpoint_at": None, "completed_at": None})
        for i, f in enumerate(p["files"])]
    return job


def _overlay(job: dict[str, Any] | None, e: JournalEntry) -> dict[str, Any] | None:
    """Apply one pending command to a job view (None: the job is not known yet)."""
    if e.command_type == "download_job.request":
        if job is not None and not job["pending"]:
            return job  # projected already
        job = _pending_job(e)
    elif job is None:
        return None
    elif e.status == "applied" and (job["last_position"] or 0) >= (e.position or 0):
        return job  # the read model shows it already
    else:
        control = _CONTROL.get(e.command_type)
        if control is not None and job["status"] in control[0]:
            job["status"] = control[1]
    return mark_pending(job, e)


class DownloadQueries:
    """Reads of the downloads read model, through the core query service's plumbing."""

    def __init__(self, queries: QueryService) -> None:
        self.q = queries
        self.jobs = queries.t.download_jobs
        self.files = queries.t.download_files

    def job(self, job_id: str) -> dict[str, Any] | None:
        """One job with its files, progress, speed and ETA (smart query)."""
        j, f = self.jobs, self.files
        with self.q._connect() as conn, conn.begin():
            position = self.q._position(conn)
            rows = self.q._rows(conn, select(j).where(j.c.id == job_id))
            job = job_view(rows[0]) if rows else None
            if job is not None:
                job["files"] = [file_view(r) for r in self.q._rows(
                    conn, select(f).where(f.c.job_id == job_id).order_by(f.c.file_index))]
        for e in self.q.journal.unprojected(position, f"download_job:{job_id}")[
                -PENDING_SCAN_LIMIT:]:
            job = _overlay(job, e)
        if job is None:
            return None
        job["read_model_position"] = position
        return _with_speed(job, job["files"])

    def list_jobs(self, statuses: tuple[str, ...] | None, limit: int, offset: int,
                  ) -> tuple[int, int, list[dict[str, Any]]]:
        """Jobs, newest first; jobs not projected yet lead the first page."""
        j, f = self.jobs, self.files
        conds = [j.c.status.in_(statuses)] if statuses else []
        with self.q._connect() as conn, conn.begin():
            position = self.q._position(conn)
            total = int(conn.execute(select(func.count()).select_from(j).where(*conds))
                        .scalar() or 0)
            jobs = {r["id"]: job_view(r) for r in self.q._rows(conn, select(j).where(*conds)
                    .order_by(j.c.requested_at.desc(), j.c.id).limit(limit).offset(offset))}
            files: dict[str, list[dict[str, Any]]] = {i: [] for i in jobs}
            if jobs:
                for r in self.q._rows(conn, select(f).where(f.c.job_id.in_(list(jobs)))
                                      .order_by(f.c.file_index)):
                    files[r["job_id"]].append(file_view(r))
        new: dict[str, dict[str, Any]] = {}
        for e in self.q.journal.unprojected(position, None, COMMAND_TYPES)[-PENDING_SCAN_LIMIT:]:
            jid = str(e.payload["id"])
            if jid in jobs:
                jobs[jid] = _overlay(jobs[jid], e) or jobs[jid]
            elif e.command_type == "download_job.request" and not offset:
                row = _overlay(None, e)
                if row is not None:
                    new[jid] = row
            elif jid in new:
                new[jid] = _overlay(new[jid], e) or new[jid]
        items = [*reversed(new.values())]
        for jid, job in jobs.items():
            job["files"] = files[jid]
            items.append(_with_speed(job, files[jid]))
        if statuses:
            items = [i for i in items if i["status"] in statuses]
        return position, total, items

    # -- for the downloader ----------------------------------------------------------------
    def active_jobs(self) -> list[str]:
        """Ids of the jobs the downloader should be running (requested or running)."""
        j = self.jobs
        with self.q.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(
                select(j.c.id).where(j.c.status.in_(ACTIVE)).order_by(j.c.requested_at))]

    def purgeable_jobs(self, before: datetime) -> list[str]:
        """Cancelled or failed jobs, unchanged since ``before``, whose partials remain."""
        j = self.jobs
        with self.q.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(select(j.c.id).where(
                j.c.status.in_(("cancelled", "failed")), j.c.partials_purged.is_(False),
                j.c.updated_at < before))]

    def counts(self) -> dict[str, int]:
        j = self.jobs
        with self.q.engine.connect() as conn:
            return {str(k): int(n) for k, n in conn.execute(
                select(j.c.status, func.count()).group_by(j.c.status))}
