"""How download-job events change the downloads read models (``download_jobs``,
``download_files``)."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from sqlalchemy import case

from domain.downloads import download_file_id
from projections.rows import Handler, Rows, each

#: The aggregates whose events this feature maps.
AGGREGATES = ("DownloadJob",)


def _file_key(e: Any) -> UUID | None:
    return None if getattr(e, "index", None) is None else download_file_id(
        e.originator_id, e.index)


def handlers(rows: Rows) -> dict[str, Handler]:
    """Event (its type's qualified name, as in its topic) → the rows it changes."""
    jobs, files = rows.tables.download_jobs, rows.tables.download_files
    upd = rows.update

    def job_files(e: Any) -> list[dict[str, Any]]:
        return [{
            "id": str(download_file_id(e.originator_id, i)), "job_id": str(e.originator_id),
            "file_index": i, "filename": f["filename"], "url": f["url"],
            "data_uri": f.get("data_uri"), "obs_id": f.get("obs_id"),
            "obsid": f.get("obsid"), "product_type": f.get("product_type"),
            "instrument": f.get("instrument"), "status": "pending", "size": f.get("size"),
            "bytes_done": 0, "bytes_per_s": None, "etag": None, "last_modified": None,
            "sha256": None, "fits": None, "restarts": 0, "started_at": None,
            "checkpoint_at": None, "completed_at": None} for i, f in enumerate(e.files)]

    resumed_files = rows.update_where(  # failed files start again
        files, lambda e: (files.c.job_id == str(e.originator_id), files.c.status == "failed"),
        lambda e: {"status": case((files.c.bytes_done > 0, "downloading"),
                                  (files.c.etag.is_not(None), "downloading"),
                                  else_="pending"),
                   "bytes_per_s": None})
    purged_files = rows.update_where(
        files, lambda e: (files.c.job_id == str(e.originator_id),
                          files.c.status != "complete"),
        lambda e: {"bytes_done": 0, "bytes_per_s": None})
    stalled_files = rows.update_where(  # paused, cancelled: no speed
        files, lambda e: (files.c.job_id == str(e.originator_id),),
        lambda e: {"bytes_per_s": None})

    return {
        "DownloadJob.Requested": each(
            rows.insert(jobs, lambda e: {
                "status": "requested", "destination": e.destination, "mode": e.mode,
                "chunk_size": e.chunk_size, "register_files": e.register_files,
                "file_count": len(e.files), "files_completed": 0,
                "bytes_total": None if any(f.get("size") is None for f in e.files)
                else sum(int(f["size"]) for f in e.files),
                "bytes_done": 0, "reason": None, "partials_purged": False,
                "requested_at": e.requested_at, "finished_at": None}),
            rows.insert_rows(files, job_files)),
        "DownloadJob.FileStarted": each(
            upd(jobs, lambda e: {"status": e.job_status, "bytes_done": e.job_bytes_done,
                                 "bytes_total": e.job_bytes_total}),
            upd(files, lambda e: {
                "status": "downloading", "size": e.size, "bytes_done": 0, "bytes_per_s": None,
                "etag": e.etag, "last_modified": e.last_modified, "started_at": e.started_at,
                "restarts": files.c.restarts + (1 if e.restart_reason else 0)},
                expressions=True, key=_file_key)),
        "DownloadJob.Checkpointed": each(
            upd(jobs, lambda e: {"bytes_done": e.job_bytes_done}),
            upd(files, lambda e: {"bytes_done": e.bytes_done, "bytes_per_s": e.bytes_per_s,
                                  "checkpoint_at": e.at}, key=_file_key)),
        "DownloadJob.FileCompleted": each(
            upd(jobs, lambda e: {"bytes_done": e.job_bytes_done,
                                 "bytes_total": e.job_bytes_total,
                                 "files_completed": e.files_completed}),
            upd(files, lambda e: {"status": "complete", "size": e.size, "bytes_done": e.size,
                                  "bytes_per_s": None, "sha256": e.sha256, "fits": e.fits,
                                  "completed_at": e.completed_at}, key=_file_key)),
        "DownloadJob.Completed": upd(jobs, lambda e: {"status": "completed",
                                                      "finished_at": e.completed_at}),
        "DownloadJob.Failed": each(
            upd(jobs, lambda e: {"status": "failed", "reason": e.reason,
                                 "finished_at": e.failed_at}),
            upd(files, lambda e: {"status": "failed", "bytes_per_s": None}, key=_file_key),
            stalled_files),
        "DownloadJob.Paused": each(upd(jobs, lambda e: {"status": "paused"}), stalled_files),
        "DownloadJob.Resumed": each(
            upd(jobs, lambda e: {"status": "running", "reason": None, "finished_at": None}),
            resumed_files),
        "DownloadJob.Cancelled": each(
            upd(jobs, lambda e: {"status": "cancelled", "reason": e.reason,
                                 "finished_at": e.cancelled_at}), stalled_files),
        "DownloadJob.PartialsPurged": each(
            upd(jobs, lambda e: {"partials_purged": True, "bytes_done": e.job_bytes_done}),
            purged_files),
    }
