"""How observation-result events change their read models (``observation_results``,
``observation_result_tasks``, ``processing_runs``)."""

from __future__ import annotations

from projections.rows import Handler, Rows, each, text_or_none

#: The aggregates whose events this feature maps.
AGGREGATES = ("ObservationResult",)


def handlers(rows: Rows) -> dict[str, Handler]:
    """Event (its type's qualified name, as in its topic) → the rows it changes."""
    t = rows.tables
    r, tk, run = t.observation_results, t.observation_result_tasks, t.processing_runs
    return {
        "ObservationResult.Materialized": rows.insert(r, lambda e: {
            "observation_id": e.observation_id, "request_id": e.request_id,
            "epoch_index": e.epoch_index, "sample_index": e.sample_index,
            "copy_index": e.copy_index, "instrument_id": e.instrument_id,
            "copies_mode": e.copies_mode, "not_before": e.not_before,
            "spec_snapshot": e.spec_snapshot, "fulfillment_status": "pending_dispatch",
            "fulfilled_on": None, "task_count": 0, "data_product_status": "PENDING",
            "assets_revision": 0, "dirty_from_revision": None, "next_eligible_run_at": None,
            "last_built_revision": None, "current_processing_run_id": None,
            "failed_runs": 0}),
        "ObservationResult.Dispatched": each(
            rows.update(r, lambda e: {"fulfillment_status": "dispatched",
                                      "task_count": e.attempt}),
            rows.insert(tk, lambda e: {
                "result_id": str(e.originator_id), "attempt": e.attempt,
                "instrument_id": e.instrument_id,
                "executed_obs_unit_id": text_or_none(e.executed_obs_unit_id),
                "status": "open", "dispatched_at": e.dispatched_at, "finished_at": None},
                key=lambda e: e.task_id)),
        "ObservationResult.TaskEnded": each(
            rows.update(r, lambda e: {"fulfillment_status": e.fulfillment_status,
                                      "fulfilled_on": e.fulfilled_on}),
            rows.update(tk, lambda e: {
                "status": e.outcome, "finished_at": e.finished_at,
                "executed_obs_unit_id": text_or_none(e.executed_obs_unit_id)},
                key=lambda e: e.task_id)),
        "ObservationResult.Canceled": each(
            rows.update(r, lambda e: {"fulfillment_status": "canceled"}),
            rows.update(tk, lambda e: {"status": "canceled", "finished_at": e.canceled_at},
                        key=lambda e: e.task_id)),
        "ObservationResult.AssetContributed": rows.update(r, lambda e: {
            "assets_revision": e.revision, "dirty_from_revision": e.dirty_from_revision,
            "next_eligible_run_at": e.next_eligible_run_at,
            "data_product_status": e.data_product_status, "failed_runs": 0}),
        "ObservationResult.RunStarted": each(
            rows.update(r, lambda e: {"data_product_status": "BUILDING",
                                      "current_processing_run_id": str(e.run_id)}),
            rows.insert(run, lambda e: {
                "result_id": str(e.originator_id), "revision": e.revision,
                "status": "running", "started_at": e.started_at, "finished_at": None,
                "outputs": [], "error": None}, key=lambda e: e.run_id)),
        "ObservationResult.RunEnded": each(
            rows.update(r, lambda e: {
                "data_product_status": e.data_product_status,
                "dirty_from_revision": e.dirty_from_revision,
                "next_eligible_run_at": e.next_eligible_run_at,
                "last_built_revision": e.last_built_revision,
                "current_processing_run_id": None, "failed_runs": e.failed_runs}),
            rows.update(run, lambda e: {
                "status": e.end, "finished_at": e.finished_at, "outputs": e.outputs,
                "error": e.error}, key=lambda e: e.run_id)),
    }
