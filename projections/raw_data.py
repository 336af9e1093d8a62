"""How raw-data-file and raw-data-package events change their read models
(``raw_data_files``, ``raw_data_packages``)."""

from __future__ import annotations

from projections.rows import Handler, Rows, text_or_none

#: The aggregates whose events this feature maps.
AGGREGATES = ("RawDataFile", "RawDataPackage")


def handlers(rows: Rows) -> dict[str, Handler]:
    """Event (its type's qualified name, as in its topic) → the rows it changes."""
    f, p = rows.tables.raw_data_files, rows.tables.raw_data_packages
    return {
        "RawDataFile.Registered": rows.insert(f, lambda e: {
            "name": e.name, "instrument": e.instrument, "relative_path": e.relative_path,
            "size": e.size, "checksum_algorithm": e.checksum_algorithm,
            "checksum_value": e.checksum_value,
            "executed_obs_unit_id": text_or_none(e.executed_obs_unit_id),
            "package_id": text_or_none(e.package_id), "file_type": e.file_type,
            "created_at": e.created_at}),
        "RawDataFile.AssignedToPackage": rows.update(f, lambda e: {
            "package_id": str(e.package_id)}),
        "RawDataPackage.Created": rows.insert(p, lambda e: {
            "name": e.name, "executed_obs_unit_id": text_or_none(e.executed_obs_unit_id),
            "status": "building", "total_size": e.total_size,
            "file_count": len(e.file_ids), "finalized_at": None}),
        "RawDataPackage.FilesAdded": rows.update(p, lambda e: {
            "total_size": p.c.total_size + e.added_size,
            "file_count": p.c.file_count + len(e.file_ids)}, expressions=True),
        "RawDataPackage.Finalized": rows.update(p, lambda e: {
            "status": "complete", "total_size": e.total_size, "file_count": e.file_count,
            "finalized_at": e.timestamp}),
    }
