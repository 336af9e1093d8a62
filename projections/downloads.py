"""How download-job events change the downloads read models (``download_jobs``,
``download_files``). Included by ``projections.projector._Ops``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID

from sqlalchemy import Table, case, update

from domain.downloads import download_file_id

Op = tuple[Any, Any, dict[str, Any]]
Handler = Callable[[Any, int], list[Op]]


def _file_key(e: Any) -> UUID | None:
    return None if getattr(e, "index", None) is None else download_file_id(
        e.originator_id, e.index)


def download_handlers(ops: Any, jobs: Table, files: Table,
                      each: Callable[..., Handler]) -> dict[str, Handler]:
    insert_file = ops._dialect_insert(files).on_conflict_do_nothing()
    job_insert = ops._insert(jobs, lambda e: {
        "status": "requested", "destination": e.destination, "mode": e.mode,
        "chunk_size": e.chunk_size, "register_files": e.register_files,
        "file_count": len(e.files), "files_completed": 0,
        "bytes_total": None if any(f.get("size") is None for f in e.files)
        else sum(int(f["size"]) for f in e.files),
        "bytes_done": 0, "reason": None, "partials_purged": False,
        "requested_at": e.requested_at, "finished_at": None})

    def requested(e: Any, position: int) -> list[Op]:
        out = job_insert(e, position)
        for i, f in enumerate(e.files):
            out.append((files.name, insert_file, {
                "id": str(download_file_id(e.originator_id, i)), "job_id": str(e.originator_id),
                "file_index": i, "filename": f["filename"], "url": f["url"],
                "data_uri": f.get("data_uri"), "obs_id": f.get("obs_id"),
                "obsid": f.get("obsid"), "product_type": f.get("product_type"),
                "instrument": f.get("instrument"), "status": "pending", "size": f.get("size"),
                "bytes_done": 0, "bytes_per_s": None, "etag": None, "last_modified": None,
                "sha256": None, "fits": None, "restarts": 0, "started_at": None,
                "checkpoint_at": None, "completed_at": None,
                "created_position": position, "last_position": position,
                "last_command_id": e.command_id, "last_actor": e.actor,
                "recorded_at": e.timestamp, "updated_at": e.timestamp}))
        return out

    def resumed_files(e: Any, position: int) -> list[Op]:
        stmt = (update(files).where(files.c.job_id == str(e.originator_id),
                                    files.c.status == "failed",
                                    files.c.last_position < position)
                .values(status=case((files.c.bytes_done > 0, "downloading"),
                                    (files.c.etag.is_not(None), "downloading"),
                                    else_="pending"),
                        bytes_per_s=None, last_position=position,
                        last_command_id=e.command_id, last_actor=e.actor,
                        updated_at=e.timestamp))
        return [((files.name, "expr", id(stmt)), stmt, {})]

    def purged_files(e: Any, position: int) -> list[Op]:
        stmt = (update(files).where(files.c.job_id == str(e.originator_id),
                                    files.c.status != "complete",
                                    files.c.last_position < position)
                .values(bytes_done=0, bytes_per_s=None, last_position=position,
                        last_command_id=e.command_id, last_actor=e.actor,
                        updated_at=e.timestamp))
        return [((files.name, "expr", id(stmt)), stmt, {})]

    def stalled_files(e: Any, position: int) -> list[Op]:  # paused, cancelled: no speed
        stmt = (update(files).where(files.c.job_id == str(e.originator_id),
                                    files.c.last_position < position)
                .values(bytes_per_s=None, last_position=position,
                        last_command_id=e.command_id, last_actor=e.actor,
                        updated_at=e.timestamp))
        return [((files.name, "expr", id(stmt)), stmt, {})]

    upd = ops._update
    return {
        "DownloadJob.Requested": requested,
        "DownloadJob.FileStarted": each(
            upd(jobs, lambda e: {"status": e.job_status, "bytes_done": e.job_bytes_done,
                                 "bytes_total": e.job_bytes_total}),
            upd(files, lambda e: {
                "status": "downloading", "size": e.size, "bytes_done": 0, "bytes_per_s": None,
                "etag": e.etag, "last_modified": e.last_modified, "started_at": e.started_at,
                "restarts": files.c.restarts + (1 if e.restart_reason else 0)},
                key_extra=("restarts",), key=_file_key)),
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
