"""How processing-job and data-product events change their read models (``processing_jobs``,
``processing_job_steps``, ``data_products``, ``product_inputs``). Included by
``projections.projector._Ops``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from uuid import UUID, uuid5

from sqlalchemy import Table, update

from domain.processing import JobKind

Op = tuple[Any, Any, dict[str, Any]]
Handler = Callable[[Any, int], list[Op]]


def step_row_id(job_id: UUID | str, attempt: int, name: str) -> str:
    """The id of a step's row: one per job, attempt and step name."""
    return str(uuid5(UUID(str(job_id)), f"step/{attempt}/{name}"))


def product_input_id(product_id: UUID | str, file_id: UUID | str) -> str:
    return str(uuid5(UUID(str(product_id)), f"input/{file_id}"))


def _s(v: Any) -> str | None:
    return None if v is None else str(v)


def processing_handlers(ops: Any, jobs: Table, steps: Table, products: Table,
                        inputs: Table, each: Callable[..., Handler]) -> dict[str, Handler]:
    insert_input = ops._dialect_insert(inputs).on_conflict_do_nothing()
    job_insert = ops._insert(jobs, lambda e: {
        "kind": e.kind, "status": "requested", "algorithm": e.algorithm,
        "algorithm_version": e.algorithm_version, "parameters": e.parameters,
        "inputs": e.inputs, "product_ids": e.product_ids,
        "input_count": len(e.inputs) if e.kind != JobKind.CATALOG else len(e.product_ids),
        "input_bytes": sum(int(i["size"]) for i in e.inputs),
        "result_id": _s(e.result_id), "run_id": _s(e.run_id), "catalog": e.catalog,
        "publish": e.publish, "archive": e.archive, "attempts": 0,
        "max_attempts": e.max_attempts, "lease_worker": None, "lease_expires_at": None,
        "cancel_requested": False, "progress": 0.0, "current_step": None, "outputs": [],
        "software": {}, "reason": None, "requested_by": e.actor, "completed_by": None,
        "requested_at": e.requested_at, "started_at": None, "finished_at": None})
    product_insert = ops._insert(products, lambda e: {
        "job_id": str(e.job_id), "kind": e.kind, "name": e.name, "area": e.area,
        "key": e.key, "uri": e.uri, "size": e.size, "sha256": e.sha256,
        "media_type": e.media_type, "metrics": e.metrics, "algorithm": e.algorithm,
        "algorithm_version": e.algorithm_version, "parameters": e.parameters,
        "software": e.software, "result_id": _s(e.result_id), "run_id": _s(e.run_id),
        "status": "built", "published": False, "archived": False, "built_at": e.built_at,
        "catalogued_at": None})

    def built(e: Any, position: int) -> list[Op]:
        out = product_insert(e, position)
        for i in e.inputs:
            out.append((inputs.name, insert_input, {
                "id": product_input_id(e.originator_id, i["file_id"]),
                "product_id": str(e.originator_id), "file_id": str(i["file_id"]),
                "name": i["name"], "instrument": i["instrument"],
                "relative_path": i["relative_path"], "size": i["size"],
                "checksum_algorithm": i["checksum_algorithm"],
                "checksum_value": i["checksum_value"], "file_type": i["file_type"],
                "executed_obs_unit_id": i.get("executed_obs_unit_id"),
                "created_position": position, "last_position": position,
                "last_command_id": e.command_id, "last_actor": e.actor,
                "recorded_at": e.timestamp, "updated_at": e.timestamp}))
        return out

    def interrupted_steps(e: Any, position: int) -> list[Op]:
        """A lease expired, the job was released or cancelled: its running steps stop."""
        stmt = (update(steps).where(steps.c.job_id == str(e.originator_id),
                                    steps.c.status == "running",
                                    steps.c.last_position < position)
                .values(status="interrupted", last_position=position,
                        last_command_id=e.command_id, last_actor=e.actor,
                        updated_at=e.timestamp))
        return [((steps.name, "expr", id(stmt)), stmt, {})]

    def step_key(e: Any) -> str:
        return step_row_id(e.originator_id, e.attempt, e.name)

    upd = ops._update
    no_lease = {"lease_worker": None, "lease_expires_at": None}
    return {
        "ProcessingJob.Requested": job_insert,
        "ProcessingJob.LeaseAcquired": upd(jobs, lambda e: {
            "status": "running", "attempts": e.attempt, "lease_worker": e.worker,
            "lease_expires_at": e.expires_at, "reason": None, "current_step": None,
            **({"started_at": e.acquired_at} if e.attempt == 1 else {})}),
        "ProcessingJob.LeaseRenewed": upd(jobs, lambda e: {"lease_expires_at": e.expires_at}),
        "ProcessingJob.LeaseExpired": each(
            upd(jobs, lambda e: {"status": "requested", "current_step": None, **no_lease}),
            interrupted_steps),
        "ProcessingJob.StepStarted": each(
            upd(jobs, lambda e: {"current_step": e.name}),
            ops._insert(steps, lambda e: {
                "job_id": str(e.originator_id), "attempt": e.attempt, "name": e.name,
                "status": "running", "started_at": e.started_at, "completed_at": None,
                "duration_s": None}, key=step_key)),
        "ProcessingJob.StepCompleted": each(
            upd(jobs, lambda e: {"current_step": None}),
            upd(steps, lambda e: {"status": "completed", "completed_at": e.completed_at,
                                  "duration_s": e.duration_s}, key=step_key)),
        "ProcessingJob.Progressed": upd(jobs, lambda e: {"progress": e.fraction}),
        "ProcessingJob.Succeeded": upd(jobs, lambda e: {
            "status": "succeeded", "outputs": e.outputs, "software": e.software,
            "completed_by": e.worker, "progress": 1.0, "current_step": None,
            "finished_at": e.finished_at,
            **no_lease}),
        "ProcessingJob.Released": each(
            upd(jobs, lambda e: {"status": "requested", "reason": e.reason,
                                 "current_step": None, **no_lease}),
            interrupted_steps),
        "ProcessingJob.Failed": each(
            upd(jobs, lambda e: {"status": "failed", "reason": e.reason,
                                 "current_step": None, "finished_at": e.failed_at,
                                 **no_lease}),
            interrupted_steps),
        "ProcessingJob.CancelRequested": upd(jobs, lambda e: {
            "cancel_requested": True, "reason": e.reason}),
        "ProcessingJob.Cancelled": each(
            upd(jobs, lambda e: {"status": "cancelled", "reason": e.reason,
                                 "current_step": None, "finished_at": e.cancelled_at,
                                 **no_lease}),
            interrupted_steps),
        "DataProduct.Built": built,
        "DataProduct.Catalogued": upd(products, lambda e: {
            "status": e.status, "published": e.published, "archived": e.archived,
            "catalogued_at": e.catalogued_at}),
    }
