"""Smart queries of MAST download jobs: the read model (jobs, files, progress, speed, ETA)
merged with the journal's not-yet-projected download commands (``pending: true``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import func, select

from commands.downloads import DownloadCommand
from domain.downloads import download_file_id
from infra.journal import JournalEntry
from queries.jobs import JobQueries, JobReads
from queries.rows import DownloadFileRow, DownloadJobRow, changeable
from queries.service import QueryService, Reading

COMMAND_TYPES = tuple(f"download_job.{c}" for c in (
    "request", "start_file", "checkpoint", "complete_file", "fail", "pause", "resume",
    "cancel", "purge_partials"))
ACTIVE = ("requested", "running")
RESUMABLE = ("paused", "failed")
#: Jobs that may still write their files (a failed or paused one can be resumed).
CLAIMING = (*ACTIVE, *RESUMABLE)
#: What a pending people's command will make of the job's status (if the domain allows it).
_CONTROL: dict[str, tuple[set[str], str]] = {
    DownloadCommand.DOWNLOAD_JOB_PAUSE: ({"requested", "running"}, "paused"),
    DownloadCommand.DOWNLOAD_JOB_RESUME: ({"paused", "failed"}, "running"),
    DownloadCommand.DOWNLOAD_JOB_CANCEL: (
        {"requested", "running", "paused", "failed"}, "cancelled")}


def file_view(r: dict[str, Any]) -> DownloadFileRow:
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


def job_view(r: dict[str, Any]) -> DownloadJobRow:
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


#: What a file the read model still shows downloading is while its job is not running: it
#: waits for a resume from its checkpoint (paused, failed) or never will (cancelled).
STOPPED_FILE = {"paused": "paused", "failed": "stopped", "cancelled": "cancelled"}


def _with_speed(job: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """The job's speed is the sum of its downloading files' speeds (last checkpoints); a
    stopped job's files in progress say so (``STOPPED_FILE``), without speed or ETA."""
    stopped = STOPPED_FILE.get(job["status"])
    if stopped is not None:
        for f in files:
            if f["status"] == "downloading":
                f.update(status=stopped, bytes_per_s=None, eta_s=None)
    speeds = [f["bytes_per_s"] for f in files if f["status"] == "downloading"
              and f["bytes_per_s"]]
    if job["status"] == "running" and speeds:
        job["bytes_per_s"] = round(sum(speeds), 1)
        if job["bytes_total"] is not None:
            job["eta_s"] = round((job["bytes_total"] - job["bytes_done"]) / job["bytes_per_s"],
                                 1)
    return job


def with_live(job: dict[str, Any], live: dict[str, Any] | None) -> dict[str, Any]:
    """A job view with the downloader's in-memory figures (``LiveProgress.job``: bytes
    received ahead of the last checkpoint, speed, ETA) for the files the read model shows
    downloading in a running job; the checkpoints stay the durable record. ``live: true``
    says which figures are."""
    if live is None or job["status"] != "running":
        return job
    files = {f["index"]: f for f in job.get("files", [])}
    ahead = 0
    for lf in live["files"]:
        f = files.get(lf["index"])
        if f is None or f["status"] != "downloading" or lf["bytes_done"] < f["bytes_done"]:
            continue
        ahead += lf["bytes_done"] - f["bytes_done"]
        f.update(bytes_done=lf["bytes_done"], bytes_per_s=lf["bytes_per_s"], live=True,
                 eta_s=lf["eta_s"])
        f["percent"] = round(100.0 * f["bytes_done"] / f["size"], 2) if f["size"] else None
    if any(f.get("live") for f in files.values()):
        total = job["bytes_total"]
        speeds = [f["bytes_per_s"] for f in files.values()
                  if f["status"] == "downloading" and f["bytes_per_s"]]
        speed = round(sum(speeds), 1) if speeds else None
        done = job["bytes_done"] + ahead
        job.update(bytes_done=done, live=True, bytes_per_s=speed,
                   percent=round(100.0 * done / total, 2) if total else None,
                   eta_s=round((total - done) / speed, 1) if total is not None and speed
                   else None)
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
    return changeable(job)


def _control(job: dict[str, Any], e: JournalEntry) -> bool:
    """Every pending command shows (as pending); pause, resume and cancel also show the
    status they will give the job."""
    control = _CONTROL.get(e.command_type)
    if control is not None and job["status"] in control[0]:
        job["status"] = control[1]
    return True


class DownloadQueries(JobQueries):
    """Reads of the downloads read model, through the core query service's plumbing; ``job``
    gives one job with its files, progress, speed and ETA (smart query)."""

    def __init__(self, queries: QueryService) -> None:
        self.files = queries.t.download_files
        super().__init__(queries, JobReads(
            kind="download_job", jobs=queries.t.download_jobs, view=job_view,
            parts_key="files", parts=self.files, part_view=file_view, part_order="file_index",
            request_type=DownloadCommand.DOWNLOAD_JOB_REQUEST, pending_job=_pending_job,
            control=_control, shown=lambda job: _with_speed(job, job["files"])))

    def list_jobs(self, statuses: tuple[str, ...] | None, limit: int, offset: int,
                  ) -> tuple[int | None, int | None, list[dict[str, Any]]]:
        """Jobs, newest first; jobs not projected yet lead the first page."""
        j, f = self.jobs, self.files
        conds = [j.c.status.in_(statuses)] if statuses else []

        def query(r: Reading) -> tuple[int | None, int | None, list[dict[str, Any]]]:
            total = r.count(select(func.count()).select_from(j).where(*conds))
            jobs = {x["id"]: changeable(job_view(x)) for x in r.rows(
                select(j).where(*conds).order_by(j.c.requested_at.desc(), j.c.id)
                .limit(limit).offset(offset))}
            files: dict[str, list[dict[str, Any]]] = {i: [] for i in jobs}
            if jobs:
                for x in r.rows(select(f).where(f.c.job_id.in_(list(jobs)))
                                .order_by(f.c.file_index)):
                    files[x["job_id"]].append(changeable(file_view(x)))
            items = self.reads.pending(r, jobs, COMMAND_TYPES, offset)
            for jid, job in jobs.items():
                job["files"] = files[jid]
                items.append(_with_speed(job, files[jid]))
            if statuses:
                items = [i for i in items if i["status"] in statuses]
            return r.position, total, r.listing(items, offset, limit)

        return self.q.read(query)

    # -- for the downloader ----------------------------------------------------------------
    def active_jobs(self) -> list[str]:
        """Ids of the jobs the downloader should be running (requested or running)."""
        j = self.jobs
        with self.q.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(
                select(j.c.id).where(j.c.status.in_(ACTIVE)).order_by(j.c.requested_at))]

    def claimants(self, destination: str, filenames: list[str]) -> dict[str, tuple[str, str]]:
        """filename → (job id, status) of the jobs that may still write ``filenames`` into
        ``destination``: not completed or cancelled, in the read model or not yet in it."""
        j, f = self.jobs, self.files
        found: dict[str, tuple[str, str]] = {}
        with self.q.connect() as conn, conn.begin():
            position = self.q.read_position(conn)
            for name, job_id, status in conn.execute(
                    select(f.c.filename, j.c.id, j.c.status).join(j, j.c.id == f.c.job_id)
                    .where(j.c.destination == destination, j.c.status.in_(CLAIMING),
                           f.c.filename.in_(filenames))):
                found.setdefault(str(name), (str(job_id), str(status)))
        wanted = set(filenames)
        requests = (DownloadCommand.DOWNLOAD_JOB_REQUEST,)
        for e in self.q.journal.unprojected(position, None, requests):
            if e.payload.get("destination") == destination:
                for spec in e.payload.get("files", ()):
                    if spec.get("filename") in wanted:
                        found.setdefault(spec["filename"], (str(e.payload["id"]), "requested"))
        return found

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
