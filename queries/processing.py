"""Smart queries of processing jobs and data products: the read models merged with the
journal's not-yet-projected processing commands (``pending: true``), and what workers poll."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, or_, select

from commands.processing import ProcessingCommand
from infra.journal import JournalEntry
from queries.jobs import JobQueries, JobReads
from queries.listing import equal_to
from queries.rows import (
    DataProductRow,
    JobInputRow,
    LeaseRow,
    ProcessingJobRow,
    ProductInputRow,
    StepRow,
    changeable,
)
from queries.service import QueryService, Reading

COMMAND_TYPES = tuple(f"processing_job.{c}" for c in (
    "request", "claim", "renew", "start_step", "complete_step", "progress", "succeed", "fail",
    "cancel", "confirm_cancel"))


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def step_view(r: dict[str, Any]) -> StepRow:
    return {"name": r["name"], "attempt": r["attempt"], "status": r["status"],
            "started_at": r["started_at"], "completed_at": r["completed_at"],
            "duration_s": r["duration_s"]}


def _input_view(i: dict[str, Any]) -> JobInputRow:
    return {"file_id": i["file_id"], "name": i["name"], "instrument": i["instrument"],
            "relative_path": i["relative_path"], "size": i["size"],
            "checksum": {"algorithm": i["checksum_algorithm"], "value": i["checksum_value"]},
            "file_type": i["file_type"], "executed_obs_unit_id": i.get("executed_obs_unit_id")}


def job_view(r: dict[str, Any]) -> ProcessingJobRow:
    lease: LeaseRow | None = None
    if r["lease_worker"] is not None:
        lease = {"worker": r["lease_worker"], "attempt": r["attempts"],
                 "expires_at": r["lease_expires_at"]}
    return {
        "id": r["id"], "kind": r["kind"], "status": r["status"],
        "algorithm": r["algorithm"], "algorithm_version": r["algorithm_version"],
        "parameters": r["parameters"], "inputs": [_input_view(i) for i in r["inputs"]],
        "product_ids": r["product_ids"], "input_count": r["input_count"],
        "input_bytes": r["input_bytes"], "result_id": r["result_id"], "run_id": r["run_id"],
        "catalog": r["catalog"], "publish": r["publish"], "archive": r["archive"],
        "attempts": r["attempts"], "max_attempts": r["max_attempts"], "lease": lease,
        "cancel_requested": r["cancel_requested"], "progress": r["progress"],
        "current_step": r["current_step"], "steps": [], "outputs": r["outputs"],
        "software": r["software"], "reason": r["reason"],
        "requested_by": r["requested_by"], "completed_by": r["completed_by"],
        "requested_at": r["requested_at"], "started_at": r["started_at"],
        "finished_at": r["finished_at"],
        "duration_s": _seconds(r["started_at"], r["finished_at"]),
        "updated_at": r["updated_at"], "last_position": r["last_position"],
        "pending": False, "command_status": None, "pending_command_ids": [],
    }


def product_view(r: dict[str, Any]) -> DataProductRow:
    return {
        "id": r["id"], "job_id": r["job_id"], "kind": r["kind"], "name": r["name"],
        "status": r["status"], "published": r["published"], "archived": r["archived"],
        "media_type": r["media_type"], "size": r["size"],
        "checksum": {"algorithm": "sha256", "value": r["sha256"]},
        "area": r["area"], "key": r["key"], "uri": r["uri"], "metrics": r["metrics"],
        "algorithm": r["algorithm"], "algorithm_version": r["algorithm_version"],
        "parameters": r["parameters"], "software": r["software"],
        "result_id": r["result_id"], "run_id": r["run_id"], "built_at": r["built_at"],
        "catalogued_at": r["catalogued_at"], "metadata": r["metadata"],
        "last_position": r["last_position"],
    }


def _pending_job(e: JournalEntry) -> dict[str, Any]:
    p = e.payload
    return changeable(job_view({
        "id": str(p["id"]), "kind": p["kind"], "status": "requested",
        "algorithm": p.get("algorithm"), "algorithm_version": p.get("algorithm_version"),
        "parameters": p.get("parameters") or {}, "inputs": [],
        "product_ids": [str(x) for x in p.get("product_ids") or []],
        "input_count": len(p.get("file_ids") or p.get("product_ids") or []),
        "input_bytes": 0, "result_id": p.get("result_id"), "run_id": p.get("run_id"),
        "catalog": p.get("catalog", False), "publish": p.get("publish", False),
        "archive": p.get("archive", False), "attempts": 0,
        "max_attempts": p.get("max_attempts", 0), "lease_worker": None,
        "lease_expires_at": None, "cancel_requested": False, "progress": 0.0,
        "current_step": None, "outputs": [], "software": {}, "reason": None,
        "requested_by": e.actor, "completed_by": None, "requested_at": e.received_at,
        "started_at": None, "finished_at": None,
        "updated_at": e.received_at, "last_position": None}))


def _control(job: dict[str, Any], e: JournalEntry) -> bool:
    """Only what people ask (request, cancel) is shown ahead; the workers' reports show once
    applied."""
    if e.command_type != ProcessingCommand.PROCESSING_JOB_CANCEL or e.status == "rejected":
        return False
    if job["status"] == "requested":
        job["status"] = "cancelled"
    elif job["status"] == "running":
        job["cancel_requested"] = True
    return True


class ProcessingQueries(JobQueries):
    """Reads of the processing read models, through the core query service's plumbing; ``job``
    gives one job with its steps, progress, timings and outputs (smart query)."""

    def __init__(self, queries: QueryService) -> None:
        self.steps = queries.t.processing_job_steps
        self.products = queries.t.data_products
        self.inputs = queries.t.product_inputs
        super().__init__(queries, JobReads(
            kind="processing_job", jobs=queries.t.processing_jobs, view=job_view,
            parts_key="steps", parts=self.steps, part_view=step_view,
            part_order="created_position", request_type=ProcessingCommand.PROCESSING_JOB_REQUEST,
            pending_job=_pending_job, control=_control))

    # -- jobs ------------------------------------------------------------------------------
    def list_jobs(self, status: str | None, kind: str | None, limit: int, offset: int,
                  ) -> tuple[int | None, int | None, list[dict[str, Any]]]:
        """Jobs, newest first; jobs not projected yet lead the first page."""
        j = self.jobs
        conds = [c for c in (j.c.status == status if status else None,
                             j.c.kind == kind if kind else None) if c is not None]

        def query(r: Reading) -> tuple[int | None, int | None, list[dict[str, Any]]]:
            total = r.count(select(func.count()).select_from(j).where(*conds))
            jobs = {x["id"]: changeable(job_view(x)) for x in r.rows(
                select(j).where(*conds).order_by(j.c.requested_at.desc(), j.c.id)
                .limit(limit).offset(offset))}
            items = [*self.reads.pending(r, jobs, (ProcessingCommand.PROCESSING_JOB_REQUEST,
                                                    ProcessingCommand.PROCESSING_JOB_CANCEL),
                                         offset), *jobs.values()]
            items = [i for i in items if (not status or i["status"] == status)
                     and (not kind or i["kind"] == kind)]
            return r.position, total, r.listing(items, offset, limit)

        return self.q.read(query)

    def claimable(self, now: datetime, limit: int = 20) -> list[str]:
        """Jobs a worker may claim now: requested ones, and running ones whose lease
        expired (their worker died or hangs), oldest first."""
        j = self.jobs
        with self.q.engine.connect() as conn:
            return [str(r[0]) for r in conn.execute(select(j.c.id).where(or_(
                j.c.status == "requested",
                (j.c.status == "running") & (j.c.lease_expires_at < now)))
                .order_by(j.c.requested_at, j.c.id).limit(limit))]

    def cancel_asked(self, job_id: str) -> bool:
        """Whether a cancel of the job was asked: in the read model, or journaled and not yet
        projected (cheap enough for a worker to ask between chunks; the event store would
        replay the job's events)."""
        j = self.jobs
        with self.q.engine.connect() as conn:
            position = self.q.read_position(conn)
            row = conn.execute(select(j.c.cancel_requested, j.c.status)
                               .where(j.c.id == job_id)).first()
        if row is not None and (row[0] or row[1] == "cancelled"):
            return True
        return bool(self.q.journal.unprojected(position, f"processing_job:{job_id}",
                                               (ProcessingCommand.PROCESSING_JOB_CANCEL,)))

    def active_count(self) -> int:
        j = self.jobs
        with self.q.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(j).where(
                j.c.status.in_(("requested", "running")))).scalar() or 0)

    def counts(self) -> dict[str, int]:
        j = self.jobs
        with self.q.engine.connect() as conn:
            return {str(k): int(n) for k, n in conn.execute(
                select(j.c.status, func.count()).group_by(j.c.status))}

    # -- products --------------------------------------------------------------------------
    def product(self, product_id: str) -> DataProductRow | None:
        p = self.products
        with self.q.connect() as conn, conn.begin():
            rows = self.q.fetch_rows(conn, select(p).where(p.c.id == product_id))
            if not rows:
                return None
            view = product_view(rows[0])
            view["inputs"] = self._inputs(conn, product_id)
        return view

    def _inputs(self, conn: Any, product_id: str) -> list[ProductInputRow]:
        i = self.inputs
        return [{"file_id": r["file_id"], "name": r["name"], "instrument": r["instrument"],
                 "relative_path": r["relative_path"], "size": r["size"],
                 "checksum": {"algorithm": r["checksum_algorithm"],
                              "value": r["checksum_value"]},
                 "file_type": r["file_type"], "executed_obs_unit_id": r["executed_obs_unit_id"],
                 "role": r["role"], "classified_from": r["classified_from"]}
                for r in self.q.fetch_rows(conn, select(i).where(i.c.product_id == product_id)
                                      .order_by(i.c.name))]

    def list_products(self, *, status: str | None, kind: str | None, job_id: str | None,
                      result_id: str | None, catalogued_only: bool, limit: int, offset: int,
                      ) -> tuple[int, int, list[DataProductRow]]:
        p = self.products
        conds = equal_to(p, {"status": status or None, "kind": kind or None,
                             "job_id": job_id or None, "result_id": result_id or None})
        if not status and catalogued_only:
            conds.append(p.c.status != "built")
        with self.q.connect() as conn, conn.begin():
            position = self.q.read_position(conn)
            total = int(conn.execute(select(func.count()).select_from(p).where(*conds))
                        .scalar() or 0)
            items = [product_view(r) for r in self.q.fetch_rows(conn, select(p).where(*conds)
                     .order_by(p.c.built_at.desc(), p.c.id).limit(limit).offset(offset))]
        return position, total, items
