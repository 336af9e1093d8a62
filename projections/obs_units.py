"""How executed-obs-unit events change the ``executed_obs_units`` read model."""

from __future__ import annotations

from projections.rows import Handler, Rows

#: The aggregates whose events this feature maps.
AGGREGATES = ("ExecutedObsUnit",)


def handlers(rows: Rows) -> dict[str, Handler]:
    """Event (its type's qualified name, as in its topic) → the rows it changes."""
    u = rows.tables.executed_obs_units
    return {
        "ExecutedObsUnit.Started": rows.insert(u, lambda e: {
            "obs_unit_id": e.obs_unit_id, "instrument": e.instrument,
            "status": "running", "start_time": e.start_time, "end_time": None,
            "metadata": e.metadata, "finish_metadata": None, "started_by": e.actor,
            "finished_by": None}),
        "ExecutedObsUnit.Finished": rows.update(u, lambda e: {
            "status": e.status, "end_time": e.end_time, "finish_metadata": e.metadata,
            "finished_by": e.actor}),
    }
