"""The aggregates one dispatcher batch works on, so later commands see earlier ones' effects."""

from __future__ import annotations

from typing import Any, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import DuplicateEntity, TargetNotFound
from infra.event_store import EventStore

A = TypeVar("A", bound=Aggregate)


class UnitOfWork:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._aggregates: dict[UUID, Aggregate] = {}
        self._missing: set[UUID] = set()
        self._dirty: list[Aggregate] = []

    def find(self, cls: type[A], aggregate_id: UUID) -> A | None:
        agg = self._aggregates.get(aggregate_id)
        if agg is None and aggregate_id not in self._missing:
            agg = self.store.get(aggregate_id)
            if agg is None:
                self._missing.add(aggregate_id)
            else:
                self._aggregates[aggregate_id] = agg
        if agg is None or not isinstance(agg, cls):
            return None
        return agg

    def absent(self, aggregate_ids: list[UUID]) -> list[UUID]:
        """Which of ``aggregate_ids`` exist neither here nor in the store (one query per
        thousand ids, not one load per id: for commands that create thousands at once)."""
        unknown = [a for a in aggregate_ids
                   if a not in self._aggregates and a not in self._missing]
        stored = self.store.existing(unknown) if unknown else set()
        self._missing.update(a for a in unknown if a not in stored)
        return [a for a in aggregate_ids if a in self._missing]

    def get(self, cls: type[A], aggregate_id: UUID, what: str, field: str | None = None) -> A:
        """Load an aggregate that must exist (or fail with ``TargetNotFound``)."""
        agg = self.find(cls, aggregate_id)
        if agg is None:
            raise TargetNotFound(f"{what} {aggregate_id} not found", field=field)
        return agg

    def for_update(self, cls: type[A], aggregate_id: UUID, what: str,
                   field: str | None = None) -> A:
        agg = self.get(cls, aggregate_id, what, field)
        self._dirty.append(agg)
        return agg

    def add(self, agg: Aggregate, what: str = "entity") -> None:
        if agg.id in self._aggregates:
            raise DuplicateEntity(f"{what} {agg.id} already exists")
        self._missing.discard(agg.id)
        self._aggregates[agg.id] = agg
        self._dirty.append(agg)

    def collect(self) -> list[Any]:
        """The events raised since the last call, in the order they were raised."""
        events: list[Any] = []
        for agg in self._dirty:
            events.extend(agg.collect_events())
        self._dirty.clear()
        return events
