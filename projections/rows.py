"""Row operations: what a feature's projection builds from an event, and how they are run.

An operation (``Op``) is ``(statement key, statement, parameters)``. Inserts are keyed by
their table's name, parameter-bound updates by ``(table, "upd", columns)`` and expression
updates (values computed by the database, one statement per event) by
``(table, "expr", id)``; ``execute_ops`` sends runs of one key as one ``executemany``.

Every statement is guarded by the row's ``last_position``: an insert of a row that exists
and an update by an event the row already reflects change nothing. The log projector never
sends such events; the Kafka projector relies on the guard to drop the duplicates that
at-least-once delivery brings, and a rebuild of some read models on it to re-apply events
they already hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from sqlalchemy import ColumnElement, Connection, Table, bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from projections.tables import ReadModelTables

Op = tuple[Any, Any, dict[str, Any]]  # (statement key, statement, parameters)
#: What one event changes: ``handler(event, log position)`` → its operations, in order.
Handler = Callable[[Any, int], list[Op]]


def text_or_none(value: Any) -> str | None:
    """A column's text (an id), or None."""
    return None if value is None else str(value)


def originator(e: Any) -> Any:
    """The row of the event's own aggregate (the default key)."""
    return e.originator_id


def each(*handlers: Handler) -> Handler:
    """One event changing several rows (a result and its task, a job and its files), in the
    order given."""
    def ops(e: Any, position: int) -> list[Op]:
        return [op for h in handlers for op in h(e, position)]
    return ops


def bookkeeping(e: Any, position: int) -> dict[str, Any]:
    """The columns every inserted row carries: where and by whom it was created."""
    return {"created_position": position, "last_position": position,
            "last_command_id": e.command_id, "last_actor": e.actor,
            "recorded_at": e.timestamp, "updated_at": e.timestamp}


class Rows:
    """Builds row operations against one set of read-model tables (the live ones, or the
    fresh ones a rebuild fills) in one SQL dialect."""

    def __init__(self, tables: ReadModelTables, dialect: str) -> None:
        self.tables = tables
        self._dialect_insert = postgresql.insert if dialect == "postgresql" else sqlite.insert

    def insert_statement(self, table: Table) -> Any:
        """``INSERT … ON CONFLICT DO NOTHING`` into ``table``: a row that exists is kept."""
        return self._dialect_insert(table).on_conflict_do_nothing()

    def insert(self, table: Table, values: Callable[[Any], dict[str, Any]],
               key: Callable[[Any], Any] = originator) -> Handler:
        """Insert the row ``key(event)`` (the aggregate's own row unless given)."""
        stmt = self.insert_statement(table)

        def op(e: Any, position: int) -> list[Op]:
            row = values(e)
            row.update(id=str(key(e)), created_position=position,
                       last_position=position, last_command_id=e.command_id,
                       last_actor=e.actor, recorded_at=e.timestamp, updated_at=e.timestamp)
            return [(table.name, stmt, row)]

        return op

    def insert_rows(self, table: Table,
                    rows: Callable[[Any], Iterable[dict[str, Any]]]) -> Handler:
        """Insert several rows per event (a job's files, a product's inputs), each naming its
        own ``id``."""
        stmt = self.insert_statement(table)

        def op(e: Any, position: int) -> list[Op]:
            return [(table.name, stmt, {**row, **bookkeeping(e, position)}) for row in rows(e)]

        return op

    @staticmethod
    def update(table: Table, values: Callable[[Any], dict[str, Any]],
               expressions: bool = False,
               key: Callable[[Any], Any] = originator) -> Handler:
        """Update the row ``key(event)``; an event the row already reflects changes nothing,
        and an event without a key (``None``) changes no row of this table. ``expressions``:
        some values are SQL expressions (a counter incremented), sent one statement per
        event rather than in an ``executemany``."""
        statements: dict[tuple[str, ...], Any] = {}  # one statement per set of columns

        def op(e: Any, position: int) -> list[Op]:
            row_id = key(e)
            if row_id is None:
                return []
            vals = values(e)
            vals.update(last_position=position, last_command_id=e.command_id,
                        last_actor=e.actor, updated_at=e.timestamp)
            if expressions:
                stmt = (update(table).where(table.c.id == str(row_id),
                                            table.c.last_position < position).values(**vals))
                return [((table.name, "expr", id(stmt)), stmt, {})]
            cols = tuple(sorted(vals))
            cached = statements.get(cols)
            if cached is None:
                cached = statements[cols] = (
                    update(table).where(table.c.id == bindparam("_id"),
                                        table.c.last_position < bindparam("_position"))
                    .values({c: bindparam(c) for c in cols}))
            vals["_id"] = str(row_id)
            vals["_position"] = position
            return [((table.name, "upd", cols), cached, vals)]

        return op

    @staticmethod
    def update_where(table: Table, where: Callable[[Any], Iterable[ColumnElement[bool]]],
                     values: Callable[[Any], dict[str, Any]]) -> Handler:
        """Update every row matching ``where(event)`` that the event has not changed yet
        (a job's files, its running steps): one expression statement per event."""
        def op(e: Any, position: int) -> list[Op]:
            vals = values(e)
            vals.update(last_position=position, last_command_id=e.command_id,
                        last_actor=e.actor, updated_at=e.timestamp)
            stmt = (update(table).where(*where(e), table.c.last_position < position)
                    .values(**vals))
            return [((table.name, "expr", id(stmt)), stmt, {})]

        return op


def execute_ops(conn: Connection, ops: Iterator[Op]) -> None:
    """Execute operations in order, grouping runs of the same statement into executemany."""
    run_key: Any = None
    run_stmt: Any = None
    run: list[dict[str, Any]] = []
    for key, stmt, params in ops:
        if key != run_key:
            if run_stmt is not None:
                conn.execute(run_stmt, run) if run else conn.execute(run_stmt)
            run_key, run_stmt, run = key, stmt, []
        if params:
            run.append(params)
    if run_stmt is not None:
        conn.execute(run_stmt, run) if run else conn.execute(run_stmt)
