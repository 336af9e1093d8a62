"""Process managers: workers that follow the event log from a position of their own (kept in
the read-model database) and react to events with critical commands.

Every command they send has a deterministic idempotency key, so a crash between sending the
commands of a page and recording the page's end repeats commands the journal answers from
its record: each effect is applied exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any, ClassVar

from eventsourcing.persistence import Notification
from sqlalchemy import Engine, select, update

from commands.service import CommandService
from domain.errors import DomainRejection
from infra.event_store import EventStore
from infra.logs import command_context
from infra.read_model_db import insert_missing
from infra.worker import LogFollower
from projections.tables import build_positions

log = logging.getLogger("obsledger.process_manager")

#: A command to send: (command type, request, path parameters, idempotency key, correlation id)
Send = tuple[str, Any, dict[str, Any], str, str]


async def send_command(commands: CommandService, actor: str, command_type: str, request: Any,
                       path: dict[str, Any], key: str, correlation_id: str) -> None:
    """Journal a command; one refused at once (unknown target, final state) is only logged."""
    with command_context(key, correlation_id):
        try:
            await commands.submit(command_type, request, path=path, actor=actor,
                                  correlation_id=correlation_id, idempotency_key=key)
        except DomainRejection as e:
            log.info("%s %s not sent: %s", command_type, path, e)


class LogProcessManager(LogFollower):
    """Reads the log a page at a time from ``POSITION``, sends what ``react`` asks for, then
    records the page's end."""

    POSITION: ClassVar[str]
    ACTOR: ClassVar[str]

    def __init__(self, store: EventStore, engine: Engine, commands: CommandService,
                 page_size: int = 500, interval: float = 0.5) -> None:
        self.positions = build_positions()
        super().__init__(store, engine, self.positions, page_size, interval)
        self.commands = commands
        with engine.begin() as conn:
            insert_missing(conn, self.positions, {
                "name": self.POSITION, "position": 0, "generation": "-",
                "updated_at": datetime.now(UTC)})

    def position(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(self.positions.c.position).where(
                self.positions.c.name == self.POSITION)).scalar_one())

    def record_position(self, position: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(self.positions).where(self.positions.c.name == self.POSITION)
                         .values(position=position, updated_at=datetime.now(UTC)))

    def horizon(self) -> int | None:
        """The last position this manager may handle yet (None: the end of the log)."""
        return None

    def react(self, notification: Notification) -> list[Send]:
        """The commands one event calls for."""
        raise NotImplementedError

    def once(self) -> int:
        """Handle the next page of events; return its size (0: nothing new)."""
        start = self.position()
        horizon = self.horizon()
        if horizon is not None and horizon <= start:
            return 0
        notifications = [n for n in self.store.select_notifications(start, self.page_size)
                         if horizon is None or n.id <= horizon]
        if not notifications:
            return 0
        sends = [s for n in notifications for s in self.react(n)]
        if sends:
            asyncio.run(self.send_all(sends))
        self.record_position(notifications[-1].id)
        return len(notifications)

    async def send_all(self, sends: list[Send]) -> None:
        for command_type, request, path, key, correlation in sends:
            await send_command(self.commands, self.ACTOR, command_type, request, path, key,
                               correlation)
