"""Raw data packages for dashboards: the list (filters, time range, sort) merged with pending
commands, and counts by status."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from commands.raw_data import RawDataCommand
from queries.counts import registered_counts
from queries.listing import ordering, registered_filters
from queries.service import QueryService, package_view

COMMAND_TYPES = (RawDataCommand.RAW_DATA_PACKAGE_CREATE, RawDataCommand.RAW_DATA_PACKAGE_ADD_FILES,
                 RawDataCommand.RAW_DATA_PACKAGE_FINALIZE)
#: Sort keys (``-`` first: descending) and their columns.
SORTS = {"registered_at": "recorded_at", "name": "name", "total_size": "total_size"}


class PackageQueries:
    def __init__(self, queries: QueryService) -> None:
        self.q = queries
        self.table = queries.t.raw_data_packages

    def list(self, *, status: str | None, executed_obs_unit_id: str | None,
             name: str | None, registered_from: datetime | None,
             registered_to: datetime | None, sort: str, limit: int, offset: int,
             ) -> tuple[int | None, int | None, list[dict[str, Any]], int]:
        p = self.table
        conds, matches = registered_filters(
            p, {"status": status, "executed_obs_unit_id": executed_obs_unit_id, "name": name},
            registered_from, registered_to)
        return self.q.page(p, conds, ordering(p, sort, SORTS), package_view,
                           "raw_data_package", matches, limit, offset, COMMAND_TYPES)

    def counts(self, registered_from: datetime | None,
               registered_to: datetime | None) -> dict[str, Any]:
        return registered_counts(self.q, self.table, COMMAND_TYPES, registered_from,
                                 registered_to, size=self.table.c.total_size)
