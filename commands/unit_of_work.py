"""The aggregates one dispatcher batch works on, so later commands see earlier ones' effects."""

from __future__ import annotations

from typing import Any, TypeVar, cast
from uuid import UUID

from eventsourcing.domain import Aggregate

from domain.errors import DuplicateEntity, TargetNotFound
from infra.event_store import EventStore

A = TypeVar("A", bound=Aggregate)


class UnitOfWork:
    def __init__(self, store: EventStore) -> None:
        self.store = store
        self._aggregates: dict[UUID, Aggregate] = {}
        self._created: dict[UUID, Aggregate.Created] = {}
        self._missing: set[UUID] = set()
        self._dirty: list[Aggregate | Aggregate.Created] = []

    def find(self, cls: type[A], aggregate_id: UUID) -> A | None:
        agg = self._aggregates.get(aggregate_id)
        if agg is None and aggregate_id in self._created:  # built when first asked for
            agg = cast(Aggregate, self._created[aggregate_id].mutate(None))
            self._aggregates[aggregate_id] = agg
        elif agg is None and aggregate_id not in self._missing:
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
        unknown = [a for a in aggregate_ids if a not in self._aggregates
                   and a not in self._created and a not in self._missing]
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
        if agg.id in self._aggregates or agg.id in self._created:
            raise DuplicateEntity(f"{what} {agg.id} already exists")
        self._missing.discard(agg.id)
        self._aggregates[agg.id] = agg
        self._dirty.append(agg)

    def add_created(self, created: Aggregate.Created, what: str = "entity") -> UUID:
        """A new aggregate given by the event that creates it; the aggregate is only built
        if a later command of the batch asks for it (``find``)."""
        aggregate_id: UUID = created.originator_id
        if aggregate_id in self._aggregates or aggregate_id in self._created:
            raise DuplicateEntity(f"{what} {aggregate_id} already exists")
        self._missing.discard(aggregate_id)
        self._created[aggregate_id] = created
        self._dirty.append(created)
        return aggregate_id

    def collect(self) -> list[Any]:
        """The events raised since the last call, in the order they were raised."""
        events: list[Any] = []
        for item in self._dirty:
            if isinstance(item, Aggregate):
                events.extend(item.collect_events())
            else:
                events.append(item)
        self._dirty.clear()
        return events
