"""Staging requests for dashboards (the staging queue): the list (filters, time range, sort)
merged with pending commands, and counts by status."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from commands.staging import StagingCommand
from queries.counts import counts_by
from queries.listing import equal_to, ordering, time_range, within
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
        filters = {"status": status, "destination": destination}
        conds = equal_to(s, filters)
        conds += time_range(s.c.recorded_at, registered_from, registered_to)

        def matches(r: dict[str, Any]) -> bool:
            return (all(v is None or str(r.get(k)) == v for k, v in filters.items())
                    and within(r.get("registered_at"), registered_from, registered_to))

        position, total, items, pending = self.q.page(
            s, conds, ordering(s, sort, SORTS), staging_view, "staging", matches, limit,
            offset, COMMAND_TYPES)
        return position, total, [with_progress(x) for x in items], pending

    def counts(self, registered_from: datetime | None,
               registered_to: datetime | None) -> dict[str, Any]:
        s = self.table
        return counts_by(self.q, s, ("status",), COMMAND_TYPES,
                         time_range(s.c.recorded_at, registered_from, registered_to),
                         size=s.c.bytes_total)
