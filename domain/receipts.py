"""Command receipts: proof, inside the event store, that a command was applied once."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, event

from domain.provenance import Provenance, with_provenance

COMMAND_RECEIPT_NAMESPACE = UUID("0b8f3c52-64c5-4c39-b5a8-2f0f6f3c9d11")


def receipt_id(command_id: str) -> UUID:
    """The receipt id of a command: replaying the command collides on this primary key."""
    return uuid5(COMMAND_RECEIPT_NAMESPACE, command_id)


class CommandReceipt(Aggregate):
    """Saved in the same transaction as the command's events."""

    @event("Recorded")
    @with_provenance
    def __init__(
        self,
        id: UUID,
        command_type: str,
        entity_ids: list[str],
        **provenance: Any,
    ) -> None:
        self.command_type = command_type
        self.entity_ids = list(entity_ids)

    @classmethod
    def record(
        cls, command_type: str, entity_ids: list[str], provenance: Provenance
    ) -> CommandReceipt:
        return cls(
            id=receipt_id(provenance.command_id),
            command_type=command_type,
            entity_ids=entity_ids,
            **provenance.event_fields(),
        )
