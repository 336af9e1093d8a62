"""The declaration of one critical command type (:class:`CommandSpec`), and what its handler is
given beyond the command (:class:`Policy`).

A feature module (``commands/obs_units.py``, ``raw_data.py``, …) declares each of its command
types once, as a ``CommandSpec``: the journaled model, the handler, the journal subjects, the
quick check before acceptance (``target``/``creates``), the ids a client gets back, and how a
pending command shows in smart queries (``overlay``). ``commands/registry.py`` lists them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol, TypeVar
from uuid import UUID

from eventsourcing.domain import Aggregate

from commands.models import CommandModel, utcnow
from commands.unit_of_work import UnitOfWork
from domain.provenance import Provenance
from infra.journal import JournalEntry
from infra.settings import Settings

#: A read-model row in the shape of a ``queries.models`` view.
Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Policy:
    """What handlers apply beyond the command: configured limits and delays, and the clock."""

    package_size_limit: int
    result_debounce: timedelta = timedelta(seconds=60)
    run_retry_limit: int = 3
    run_retry_base: timedelta = timedelta(seconds=60)
    clock: Callable[[], datetime] = utcnow

    @classmethod
    def from_settings(cls, settings: Settings,
                      clock: Callable[[], datetime] | None = None) -> Policy:
        return cls(package_size_limit=settings.package_size_limit_bytes,
                   result_debounce=timedelta(seconds=settings.result_debounce_s),
                   run_retry_limit=settings.processing_retry_limit,
                   run_retry_base=timedelta(seconds=settings.processing_retry_base_s),
                   clock=clock or utcnow)


Handler = Callable[[Any, UnitOfWork, Provenance, Policy], list[UUID]]
E = TypeVar("E", bound=Aggregate)
#: What a command does to the entity it changes: ``(entity, command, provenance, policy)``.
Change = Callable[[E, Any, Provenance, Policy], object]


def changes(kind: type[E], what: str) -> Callable[[Change[E]], Handler]:
    """The handler of a command that changes one existing entity, the command's ``id``,
    from the function that changes it: the entity is loaded for update (a missing one is
    refused naming ``id``, as ``what``) and its id is what the handler returns."""
    def handler(change: Change[E]) -> Handler:
        def handle(cmd: Any, uow: UnitOfWork, prov: Provenance, policy: Policy) -> list[UUID]:
            entity = uow.for_update(kind, cmd.id, what, "id")
            change(entity, cmd, prov, policy)
            return [entity.id]
        return handle
    return handler


class PendingRows(Protocol):
    """The read-model rows a pending command changes (``queries.overlay.Overlay``)."""

    def base(self, kind: str, entity_id: str) -> Row | None:
        """The entity's row: projected, else what the journal alone makes of it."""

    def create(self, kind: str, entity_id: str, row: Row, entry: JournalEntry) -> None:
        """Show ``row``, created by ``entry``, unless the read model has it already."""

    def patch(self, kind: str, entity_id: str, entry: JournalEntry,
              change: Callable[[Row], None]) -> None:
        """Apply ``change`` to the entity's row, unless the read model shows ``entry``."""


#: How a pending command shows in smart queries: ``(rows, entry, payload)``.
OverlayChange = Callable[[PendingRows, JournalEntry, dict[str, Any]], None]


@dataclass(frozen=True, slots=True)
class Target:
    """The existing entity a command changes, for the quick check before acceptance."""

    kind: str  # the subject prefix: "staging", "raw_data_package", …
    what: str  # its name in answers: "staging request", "raw data package", …
    final_statuses: frozenset[str] = frozenset()
    one_pending: bool = True  # a second such command while one is pending is refused


@dataclass(frozen=True, slots=True)
class CommandSpec:
    """One kind of critical command, declared once."""

    name: StrEnum  # a member of its feature module's command types
    model: type[CommandModel]
    handle: Handler
    subjects: Callable[[Any], list[str]]
    generated: tuple[str, ...] = ("id",)  # ids the server pre-generates when absent
    #: the entity changed: checked (exists, not final, not already pending) before acceptance
    target: Target | None = None
    #: the kind of entity this command creates (a pending one counts as existing)
    creates: str | None = None
    #: the pre-generated ids a client gets back; default ``{"<kind>_id": cmd.id}``
    ids: Callable[[Any], dict[str, Any]] | None = None
    #: how a pending command changes the rows of smart queries, and which kinds of rows
    overlay: OverlayChange | None = None
    shows: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return self.name.split(".")[0]

    def response_ids(self, cmd: Any) -> dict[str, Any]:
        """The pre-generated ids a client gets back, so it can refer to what it created."""
        if self.ids is not None:
            return self.ids(cmd)
        return {f"{self.kind}_id": str(cmd.id)}
