"""What every list of the query API shares: time ranges and sort orders, applied alike to
projected rows (in SQL) and to the rows of pending commands (in Python)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Column, Table


def as_time(v: Any) -> datetime:
    """A row's time (a datetime, or ISO 8601 text from a command's payload), aware."""
    t = v if isinstance(v, datetime) else datetime.fromisoformat(str(v).replace("Z", "+00:00"))
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t


def time_range(column: Column[Any], start: datetime | None, end: datetime | None) -> list[Any]:
    """SQL conditions: ``column`` at or after ``start`` and before ``end``."""
    return [c for c in (column >= start if start is not None else None,
                        column < end if end is not None else None) if c is not None]


def equal_to(table: Table, filters: Mapping[str, Any]) -> list[Any]:
    """SQL conditions: each of ``table``'s columns named in ``filters`` equals its value (a
    filter left out, None, matches everything)."""
    return [table.c[k] == v for k, v in filters.items() if v is not None]


def within(value: Any, start: datetime | None, end: datetime | None) -> bool:
    """Whether a row's time is in [start, end). A pending row without the time (an entity
    not recorded yet: its registration time is not known) counts as recorded now."""
    if start is None and end is None:
        return True
    t = datetime.now(UTC) if value is None else as_time(value)
    return (start is None or t >= start) and (end is None or t < end)


def ordering(table: Table, sort: str, columns: Mapping[str, str]) -> tuple[Any, ...]:
    """ORDER BY of ``sort`` (a key of ``columns``, ``-`` first for descending), the id
    breaking ties so that pages never overlap."""
    column = table.c[columns[sort.removeprefix("-")]]
    return (column.desc() if sort.startswith("-") else column.asc(), table.c.id)


def registered_filters(table: Table, filters: Mapping[str, str | None],
                       registered_from: datetime | None, registered_to: datetime | None,
                       ) -> tuple[list[Any], Callable[[Mapping[str, Any]], bool]]:
    """The SQL conditions (each of ``filters`` equals, registered in [from, to)) and the same
    test for the rows of pending commands."""
    conds = equal_to(table, filters)
    conds += time_range(table.c.recorded_at, registered_from, registered_to)

    def matches(r: Mapping[str, Any]) -> bool:
        return (all(v is None or str(r.get(k)) == v for k, v in filters.items())
                and within(r.get("registered_at"), registered_from, registered_to))

    return conds, matches
