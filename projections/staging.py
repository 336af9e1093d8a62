"""How staging-request events change the ``staging_requests`` read model."""

from __future__ import annotations

from projections.rows import Handler, Rows

#: The aggregates whose events this feature maps.
AGGREGATES = ("StagingRequest",)


def handlers(rows: Rows) -> dict[str, Handler]:
    """Event (its type's qualified name, as in its topic) → the rows it changes."""
    s = rows.tables.staging_requests
    return {
        "StagingRequest.Requested": rows.insert(s, lambda e: {
            "package_ids": [str(i) for i in e.package_ids], "destination": e.destination,
            "status": "pending", "bytes_total": e.bytes_total,
            "files_total": e.files_total, "bytes_transferred": 0, "files_transferred": 0,
            "message": None}),
        "StagingRequest.ProgressReported": rows.update(s, lambda e: {
            "status": e.status, "bytes_transferred": e.bytes_transferred,
            "files_transferred": e.files_transferred, "message": e.message}),
        "StagingRequest.Cancelled": rows.update(s, lambda e: {
            "status": "cancelled", "message": e.reason}),
        "StagingRequest.Retried": rows.update(s, lambda e: {
            "status": "pending", "bytes_transferred": 0, "files_transferred": 0,
            "message": e.reason}),
    }
