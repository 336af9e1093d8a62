"""The unit tests' tools: a command runner over the in-memory event store, a clock."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar
from uuid import UUID, uuid4

import pytest
from eventsourcing.domain import Aggregate

from commands.registry import COMMANDS
from commands.spec import Policy
from commands.unit_of_work import UnitOfWork
from domain.errors import DomainRejection
from domain.provenance import Provenance
from infra.event_store import EventStore

A = TypeVar("A", bound=Aggregate)

#: The package size limit of these tests: small, so a few files reach it.
PACKAGE_LIMIT = 1000
NIGHT = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


@dataclass
class Clock:
    """The handlers' clock (``Policy.clock``), moved by the test."""

    now: datetime = NIGHT

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


@dataclass
class Applied:
    """What one applied command left in the store."""

    ids: list[UUID]
    events: list[Any]
    positions: list[int] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        """The events' classes, e.g. ``ExecutedObsUnit.Started``, in the order saved."""
        return [type(e).__qualname__ for e in self.events]


class CommandRunner:
    """Applies one command the way the dispatcher does, without the journal: the handler its
    ``CommandSpec`` declares, on a fresh unit of work over the store, then one atomic save."""

    def __init__(self, store: EventStore, policy: Policy, actor: str = "night-operator") -> None:
        self.store = store
        self.policy = policy
        self.actor = actor

    def provenance(self) -> Provenance:
        return Provenance(actor=self.actor, command_id=str(uuid4()),
                          correlation_id=str(uuid4()))

    def __call__(self, command_type: str, **fields: Any) -> Applied:
        spec = COMMANDS[command_type]
        command = spec.model.model_validate(fields)
        uow = UnitOfWork(self.store)
        ids = spec.handle(command, uow, self.provenance(), self.policy)
        events = uow.collect()
        recordings = self.store.save(*events)
        return Applied(ids, events, [r.notification.id for r in recordings])

    def refused(self, command_type: str, **fields: Any) -> DomainRejection:
        """Run a command the domain must refuse; nothing may reach the store."""
        head = self.store.max_position()
        with pytest.raises(DomainRejection) as caught:
            self(command_type, **fields)
        assert self.store.max_position() == head
        return caught.value

    def load(self, cls: type[A], aggregate_id: UUID) -> A:
        """The aggregate as the store replays it (not the handler's copy)."""
        agg = self.store.get(aggregate_id)
        assert isinstance(agg, cls), f"{aggregate_id} is {type(agg).__name__}, not {cls}"
        return agg

    def history(self, aggregate_id: UUID) -> list[str]:
        """The stored events of one aggregate, by class name (``Started``, ``Finished``…)."""
        return [t.rsplit(".", 1)[-1] for _, t in self.store.topics_since(aggregate_id, 0)]



def file_fields(name: str, size: int = 100, instrument: str = "HARPS",
                executed_obs_unit_id: UUID | None = None) -> dict[str, Any]:
    """One raw data file as a registration command gives it."""
    return {"name": name, "relative_path": f"2026-11-21/{name}", "size": size,
            "checksum": {"algorithm": "md5", "value": "0f343b0931126a20f133d67c2b018a3b"},
            "instrument": instrument, "file_type": "raw_science",
            "created_at": NIGHT, "executed_obs_unit_id": executed_obs_unit_id}
