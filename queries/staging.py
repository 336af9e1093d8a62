"""Staging requests for dashboards (the staging queue): the list (filters, time range, sort)
merged with pending commands, and counts by status."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from commands.staging import StagingCommand
from queries.counts import registered_counts
from queries.listing import ordering, registered_filters
from queries.service import QueryService, staging_view, with_progress

COMMAND_TYPES = (StagingCommand.STAGING_STAGE, StagingCommand.STAGING_REPORT_PROGRESS,
                 StagingCommand.STAGING_CANCEL)
#: Sort keys (``-`` first: descending) and their columns.
SORTS = {"registered_at": "recorded_at", "updated_at": "updated_at"}


class StagingQueries:
    def __init__(self, queries: QueryService) -> None:
        self.q = queries
        self.table = queries.t.staging_requests

    def list(self, *, status: str | None, destination: str | None,
             registered_from: datetime | None, registered_to: datetime | None, sort: str,
             limit: int, offset: int,
             ) -> tuple[int | None, int | None, list[dict[str, Any]], int]:
        s = self.table
        conds, matches = registered_filters(
            s, {"status": status, "destination": destination}, registered_from, registered_to)
        position, total, items, pending = self.q.page(
            s, conds, ordering(s, sort, SORTS), staging_view, "staging", matches, limit,
            offset, COMMAND_TYPES)
        return position, total, [with_progress(x) for x in items], pending

    def counts(self, registered_from: datetime | None,
               registered_to: datetime | None) -> dict[str, Any]:
        return registered_counts(self.q, self.table, COMMAND_TYPES, registered_from,
                                 registered_to, size=self.table.c.bytes_total)
