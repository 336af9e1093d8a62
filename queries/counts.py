"""Counts for dashboards: a read model's rows by status (or another column), from one
snapshot, beside the commands accepted for it that the read models do not show yet."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Table, func, select

from infra.read_model_db import ReadModelsUnavailable, byte_sum
from queries import downloads, processing
from queries.listing import time_range
from queries.service import COMMAND_TYPES, QueryService, Reading


def counts_by(q: QueryService, table: Table, columns: Sequence[str],
              command_types: Sequence[str], conds: Sequence[Any] = (),
              size: Column[Any] | None = None,
              subsets: dict[str, Any] | None = None) -> dict[str, Any]:
    """``{read_model_position, total, <column>: {value: rows}…, pending_commands}`` of the
    rows matching ``conds`` (with ``size``: ``bytes``, its sum; with ``subsets``: the rows
    meeting each named condition too). Counts need the read
    models: without them, 503 (the journal alone cannot count what exists)."""

    def query(r: Reading) -> dict[str, Any]:
        if r.conn is None:
            raise ReadModelsUnavailable(
                "the read-model database does not answer: counts come from it alone")
        out: dict[str, Any] = {"read_model_position": r.position}
        for column in columns:
            out[column] = {str(k): int(n) for k, n in r.conn.execute(
                select(table.c[column], func.count()).where(*conds)
                .group_by(table.c[column]))}
        out["total"] = r.count(select(func.count()).select_from(table).where(*conds))
        if size is not None:
            out["bytes"] = int(r.conn.execute(select(func.coalesce(byte_sum(q.engine, size), 0))
                                              .select_from(table).where(*conds)).scalar() or 0)
        for name, cond in (subsets or {}).items():
            out[name] = r.count(select(func.count()).select_from(table).where(*conds, cond))
        out["pending_commands"] = len(r.unprojected(None, tuple(command_types)))
        return out

    return q.read(query)


def registered_counts(q: QueryService, table: Table, command_types: Sequence[str],
                      registered_from: datetime | None, registered_to: datetime | None,
                      size: Column[Any]) -> dict[str, Any]:
    """Rows (registered in the range) by status, with their bytes (``size``)."""
    return counts_by(q, table, ("status",), command_types,
                     time_range(table.c.recorded_at, registered_from, registered_to), size=size)


def unit_counts(q: QueryService, start_from: datetime | None,
                start_to: datetime | None) -> dict[str, Any]:
    """Executed obs units (started in the range) by status and by instrument."""
    u = q.t.executed_obs_units
    return counts_by(q, u, ("status", "instrument"), COMMAND_TYPES["executed_obs_unit"],
                     time_range(u.c.start_time, start_from, start_to))


def file_counts(q: QueryService, registered_from: datetime | None,
                registered_to: datetime | None) -> dict[str, Any]:
    """Raw data files (registered in the range) by instrument and by file type, with their
    bytes and how many are in a package."""
    f = q.t.raw_data_files
    conds = time_range(f.c.recorded_at, registered_from, registered_to)
    return counts_by(q, f, ("instrument", "file_type"), COMMAND_TYPES["raw_data_file"], conds,
                     size=f.c.size, subsets={"packaged": f.c.package_id.isnot(None)})


def download_counts(q: QueryService, requested_from: datetime | None,
                    requested_to: datetime | None) -> dict[str, Any]:
    """MAST download jobs (requested in the range) by status, with their total bytes."""
    j = q.t.download_jobs
    return counts_by(q, j, ("status",), downloads.COMMAND_TYPES,
                     time_range(j.c.requested_at, requested_from, requested_to),
                     size=j.c.bytes_total)


def job_counts(q: QueryService, requested_from: datetime | None,
               requested_to: datetime | None) -> dict[str, Any]:
    """Processing jobs (requested in the range) by status and by kind."""
    j = q.t.processing_jobs
    return counts_by(q, j, ("status", "kind"), processing.COMMAND_TYPES,
                     time_range(j.c.requested_at, requested_from, requested_to))


def product_counts(q: QueryService, built_from: datetime | None,
                   built_to: datetime | None) -> dict[str, Any]:
    """Data products (built in the range) by status (built, catalogued, published, archived)
    and by kind, with their bytes."""
    p = q.t.data_products
    return counts_by(q, p, ("status", "kind"), processing.COMMAND_TYPES,
                     time_range(p.c.built_at, built_from, built_to), size=p.c.size)
