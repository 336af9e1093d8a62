"""Every read model's event mapping, assembled from the feature modules' declarations.

A feature module (``projections/<feature>.py``) names the aggregates whose events it maps
(``AGGREGATES``) and builds, over one set of tables, what each event changes
(``handlers(rows)``: event type's qualified name → a function returning row operations). A
new event's row update is declared in its feature module; a new feature module is listed
here. Nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any

from projections import downloads, obs_units, processing, raw_data, results, staging
from projections.rows import Handler, Op, Rows
from projections.tables import ReadModelTables

FEATURES: tuple[ModuleType, ...] = (obs_units, raw_data, staging, results, downloads,
                                    processing)


def assemble(features: Sequence[ModuleType], rows: Rows) -> dict[str, Handler]:
    """The events the feature modules map (their ``handlers``): each exactly once, and only
    events of the module's own ``AGGREGATES``."""
    handlers: dict[str, Handler] = {}
    for feature in features:
        declared = feature.handlers(rows)
        elsewhere = sorted(name for name in declared
                           if name.partition(".")[0] not in feature.AGGREGATES)
        if elsewhere:
            raise ValueError(f"{feature.__name__} maps other features' events: {elsewhere}")
        twice = sorted(set(declared) & set(handlers))
        if twice:
            raise ValueError(f"events mapped twice: {twice}")
        handlers.update(declared)
    return handlers


class Projections:
    """What each event changes in one set of read-model tables (the live ones, or the fresh
    ones a rebuild fills)."""

    def __init__(self, tables: ReadModelTables, dialect: str,
                 features: Sequence[ModuleType] = FEATURES) -> None:
        self.tables = tables
        self.handlers = assemble(features, Rows(tables, dialect))

    def ops(self, event: Any, position: int) -> list[Op]:
        """The row operations of ``event`` at log ``position`` (none for an event no read
        model follows)."""
        handler = self.handlers.get(type(event).__qualname__)
        return handler(event, position) if handler else []
