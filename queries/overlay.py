"""What a pending command will change: journal entries replayed onto read-model rows.

Rows are plain dicts in the shape of ``queries.models`` views. ``Overlay`` starts from the
projected rows (loaded on demand) and applies each not-yet-projected command in journal order,
as its ``CommandSpec.overlay`` (in its feature module, ``commands/<feature>.py``) says.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from commands.registry import COMMANDS, SHOWN_IN
from infra.journal import JournalEntry

Kind = str  # "executed_obs_unit" | "raw_data_file" | "raw_data_package" | "staging" | …
Loader = Callable[[Kind, str], dict[str, Any] | None]


def mark_pending(row: dict[str, Any], entry: JournalEntry) -> dict[str, Any]:
    """``row`` as changed by ``entry``, a command not yet visible in the read model."""
    row["pending"] = True
    row["command_status"] = entry.status
    ids = row.setdefault("pending_command_ids", [])
    if entry.command_id not in ids:
        ids.append(entry.command_id)
    return row


class Overlay:
    """``load`` gives an entity's projected row (None: not in the read models).
    ``pending_row`` (optional) gives what the journal alone makes of an entity that is not:
    the base a pending command changes when the entity was created by another pending
    command that this overlay does not replay (a package's files registered apart)."""

    def __init__(self, load: Loader, pending_row: Loader | None = None) -> None:
        self._load = load
        self._pending_row = pending_row
        self.rows: dict[Kind, dict[str, dict[str, Any] | None]] = {k: {} for k in SHOWN_IN}
        # entities changed, in the order first changed (a dict: membership in O(1))
        self.touched: dict[Kind, dict[str, None]] = {k: {} for k in self.rows}

    def row(self, kind: Kind, entity_id: str) -> dict[str, Any] | None:
        cache = self.rows[kind]
        if entity_id not in cache:
            cache[entity_id] = self._load(kind, entity_id)
        return cache[entity_id]

    def base(self, kind: Kind, entity_id: str) -> dict[str, Any] | None:
        """The entity's row: projected, else what the journal alone makes of it."""
        row = self.row(kind, entity_id)
        if row is None and self._pending_row is not None:
            row = self.rows[kind][entity_id] = self._pending_row(kind, entity_id)
        return row

    def _mark(self, kind: Kind, entity_id: str, row: dict[str, Any], entry: JournalEntry) -> None:
        mark_pending(row, entry)
        self.rows[kind][entity_id] = row
        self.touched[kind].setdefault(entity_id)

    def create(self, kind: Kind, entity_id: str, row: dict[str, Any],
                entry: JournalEntry) -> None:
        current = self.row(kind, entity_id)
        if current is not None and not current.get("pending"):
            return  # already projected (the query read it after the projector caught up)
        row.setdefault("last_position", None)
        self._mark(kind, entity_id, row, entry)

    def patch(self, kind: Kind, entity_id: str, entry: JournalEntry,
               change: Callable[[dict[str, Any]], None]) -> None:
        row = self.base(kind, entity_id)
        if row is None:
            return
        if entry.status == "applied" and (row.get("last_position") or 0) >= (entry.position or 0):
            return  # the read model already shows this command
        change(row)
        self._mark(kind, entity_id, row, entry)

    def apply(self, entry: JournalEntry) -> None:
        spec = COMMANDS.get(entry.command_type)
        if spec is not None and spec.overlay is not None:
            spec.overlay(self, entry, entry.payload)
