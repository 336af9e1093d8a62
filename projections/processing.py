"""How processing-job and data-product events change their read models (``processing_jobs``,
``processing_job_steps``, ``data_products``, ``product_inputs``)."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from domain.processing import JobKind
from projections.rows import Handler, Rows, each, text_or_none

#: The aggregates whose events this feature maps.
AGGREGATES = ("ProcessingJob", "DataProduct")


def step_row_id(job_id: UUID | str, attempt: int, name: str) -> str:
    """The id of a step's row: one per job, attempt and step name."""
    return str(uuid5(UUID(str(job_id)), f"step/{attempt}/{name}"))


def product_input_id(product_id: UUID | str, file_id: UUID | str) -> str:
    return str(uuid5(UUID(str(product_id)), f"input/{file_id}"))


def handlers(rows: Rows) -> dict[str, Handler]:
    """Event (its type's qualified name, as in its topic) → the rows it changes."""
    t = rows.tables
    jobs, steps = t.processing_jobs, t.processing_job_steps
    products, inputs = t.data_products, t.product_inputs
    upd = rows.update

    def product_inputs(e: Any) -> list[dict[str, Any]]:
        return [{
            "id": product_input_id(e.originator_id, i["file_id"]),
            "product_id": str(e.originator_id), "file_id": str(i["file_id"]),
            "name": i["name"], "instrument": i["instrument"],
            "relative_path": i["relative_path"], "size": i["size"],
            "checksum_algorithm": i["checksum_algorithm"],
            "checksum_value": i["checksum_value"], "file_type": i["file_type"],
            "executed_obs_unit_id": i.get("executed_obs_unit_id"),
            "role": i.get("role"), "classified_from": i.get("classified_from")}
            for i in e.inputs]

    # a lease expired, the job was released or cancelled: its running steps stop
    interrupted_steps = rows.update_where(
        steps, lambda e: (steps.c.job_id == str(e.originator_id), steps.c.status == "running"),
        lambda e: {"status": "interrupted"})

    def step_key(e: Any) -> str:
        return step_row_id(e.originator_id, e.attempt, e.name)

    no_lease = {"lease_worker": None, "lease_expires_at": None}
    return {
        "ProcessingJob.Requested": rows.insert(jobs, lambda e: {
            "kind": e.kind, "status": "requested", "algorithm": e.algorithm,
            "algorithm_version": e.algorithm_version, "parameters": e.parameters,
            "inputs": e.inputs, "product_ids": e.product_ids,
            "input_count": len(e.inputs) if e.kind != JobKind.CATALOG else len(e.product_ids),
            "input_bytes": sum(int(i["size"]) for i in e.inputs),
            "result_id": text_or_none(e.result_id), "run_id": text_or_none(e.run_id),
            "catalog": e.catalog, "publish": e.publish, "archive": e.archive, "attempts": 0,
            "max_attempts": e.max_attempts, "lease_worker": None, "lease_expires_at": None,
            "cancel_requested": False, "progress": 0.0, "current_step": None, "outputs": [],
            "software": {}, "reason": None, "requested_by": e.actor, "completed_by": None,
            "requested_at": e.requested_at, "started_at": None, "finished_at": None}),
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
            rows.insert(steps, lambda e: {
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
            "finished_at": e.finished_at, **no_lease}),
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
        "DataProduct.Built": each(
            rows.insert(products, lambda e: {
                "job_id": str(e.job_id), "kind": e.kind, "name": e.name, "area": e.area,
                "key": e.key, "uri": e.uri, "size": e.size, "sha256": e.sha256,
                "media_type": e.media_type, "metrics": e.metrics, "algorithm": e.algorithm,
                "algorithm_version": e.algorithm_version, "parameters": e.parameters,
                "software": e.software, "result_id": text_or_none(e.result_id),
                "run_id": text_or_none(e.run_id), "status": "built", "published": False,
                "archived": False, "built_at": e.built_at, "catalogued_at": None,
                "metadata": {}}),
            rows.insert_rows(inputs, product_inputs)),
        "DataProduct.Catalogued": upd(products, lambda e: {
            "status": e.status, "published": e.published, "archived": e.archived,
            "catalogued_at": e.catalogued_at, "metadata": e.metadata}),
    }
