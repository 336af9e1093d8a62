"""Accepting a critical command: ids, idempotency, a quick sanity check, the durable append."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

import orjson

from commands.models import CommandModel, observed_at_of
from commands.registry import COMMANDS, CREATES
from commands.spec import CommandSpec
from domain.errors import DomainRejection, IllegalTransition, TargetNotFound
from infra.availability import EVENT_STORE, Availability
from infra.event_store import EventStore, StoreUnavailable
from infra.journal import APPLIED, REJECTED, Journal, JournalEntry, NewCommand
from infra.journal_slots import PeerJournals
from infra.metrics import Metrics

#: Longest the quick check before acceptance waits for the event store.
PRECHECK_STORE_TIMEOUT_S = 0.5

#: The namespace of ids pre-generated for a command sent with an Idempotency-Key.
KEYED_IDS = UUID("6d0c3f0e-2b8a-5c1e-9a47-0b5e1f7d2c94")


def keyed_id(actor: str, idempotency_key: str, name: str) -> UUID:
    """The id ``name`` of the command a principal sends under ``idempotency_key``: the same
    in every API process, so a retry that another process journals too answers the same
    ids, and the dispatcher's receipt makes the two one command."""
    return uuid.uuid5(KEYED_IDS, f"{actor}\n{idempotency_key}\n{name}")


class _RandomIds:
    """Random (version 4) UUIDs cut from one ``os.urandom`` read of 256 at a time.

    ``uuid.uuid4()`` reads 16 bytes per call, and ``os.urandom`` lets go of the GIL for the
    ``getrandom`` call: on the acknowledgement path, twice per command, the event loop then
    waits for the GIL behind the journal's writer thread (py-spy put ~9 % of the loop's
    samples in ``uuid4``). Same kernel CSPRNG, same UUIDs, one read per 256. A forked child
    drops the parent's unread bytes, so two processes never share an id."""

    BATCH = 256

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool = b""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        # a new lock too: another thread of the parent may have held it at the fork
        self._lock = threading.Lock()
        self._pool, self._at = b"", 0

    def __call__(self) -> UUID:
        with self._lock:
            if self._at >= len(self._pool):
                self._pool, self._at = os.urandom(16 * self.BATCH), 0
            chunk = self._pool[self._at:self._at + 16]
            self._at += 16
        return UUID(bytes=chunk, version=4)


#: A fresh command or entity id (uuid4).
random_id = _RandomIds()


class IdempotencyConflict(DomainRejection):
    code = "idempotency_conflict"


@dataclass(slots=True)
class Submission:
    """The answer to a submitted command."""

    entry: JournalEntry
    replayed: bool
    body: dict[str, Any] = field(default_factory=dict)


def request_hash(command_type: str, path: dict[str, Any], body: dict[str, Any]) -> str:
    raw = orjson.dumps([command_type, path, body], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()


class AcceptedCommands:
    """The commands this process accepted, as the validated objects they were accepted as,
    until the dispatcher takes them: validating a journaled payload again costs about a
    fifth of a bulk registration's dispatch. What is not here (a restart, another process's
    commands, evicted) is validated from the journal as before.

    Kept only when ``enabled``: in a process whose dispatcher applies what it accepts (the
    API with its embedded workers); a process that only journals (``serve --no-workers``,
    ``obsledger downloader``, ``obsledger worker``) keeps nothing. Bounded by weight (a
    command, plus one per element of its lists: files of a bulk registration), the oldest
    evicted first; used by the event loop and the dispatcher's thread."""

    def __init__(self, enabled: bool = False, capacity: int = 200_000) -> None:
        self.enabled = enabled
        self.capacity = capacity
        self._commands: dict[int, tuple[CommandModel, int]] = {}
        self._weight = 0
        self._lock = threading.Lock()

    def put(self, seq: int, command: CommandModel) -> None:
        if not self.enabled:
            return
        weight = 1 + sum(len(v) for v in command.__dict__.values() if isinstance(v, list))
        with self._lock:
            self._commands[seq] = (command, weight)
            self._weight += weight
            while self._weight > self.capacity:
                _, w = self._commands.pop(next(iter(self._commands)))  # the oldest
                self._weight -= w

    def __len__(self) -> int:
        return len(self._commands)

    def get(self, seq: int) -> CommandModel | None:
        found = self._commands.get(seq)
        return found[0] if found is not None else None

    def take(self, seq: int) -> CommandModel | None:
        with self._lock:
            found = self._commands.pop(seq, None)
            if found is None:
                return None
            self._weight -= found[1]
            return found[0]


class CommandService:
    def __init__(self, journal: Journal, store: EventStore | None,
                 metrics: Metrics | None = None, keep_accepted: bool = False,
                 availability: Availability | None = None,
                 peers: PeerJournals | None = None) -> None:
        self.journal = journal
        #: the other API processes' journals (journal slots): a key one of them journaled
        self.peers = peers
        self.store = store
        self.metrics = metrics
        self.accepted = AcceptedCommands(enabled=keep_accepted)
        self.availability = availability
        #: command type → a check of a new command against the world (raises a rejection)
        self.prechecks: dict[str, Callable[[Any], Awaitable[None]]] = {}

    async def submit(
        self,
        command_type: str,
        request: CommandModel,
        *,
        path: dict[str, Any] | None = None,
        actor: str,
        correlation_id: str | None,
        idempotency_key: str | None,
    ) -> Submission:
        spec = COMMANDS[command_type]
        path = {k: str(v) for k, v in (path or {}).items()}
        if idempotency_key:
            # What a repeat of this key must match; without a key nothing can repeat.
            command_id = idempotency_key
            digest = request_hash(command_type, path,
                                  request.model_dump(mode="json", exclude_unset=True))
            previous = self.journal.get(command_id)
            if previous is None and self.peers is not None:
                previous = self.peers.get(command_id)
            if previous is not None:
                return self._repeat(previous, actor, digest)
        else:
            command_id, digest = str(random_id()), ""

        # The journaled command is the validated request plus its ids: built without a
        # second validation. The dispatcher applies this very object (``accepted``), or
        # validates the journaled payload again when it has not got it (after a restart).
        values = request.__dict__.copy()
        values.update((k, UUID(v)) for k, v in path.items())
        for name in spec.generated:  # the pre-generated ids
            if name in spec.model.model_fields and values.get(name) is None:
                values[name] = keyed_id(actor, command_id, name) if idempotency_key \
                    else random_id()
        cmd = spec.model.model_construct(**values)
        await self._precheck(spec, cmd)
        ids = spec.response_ids(cmd)
        body = {"command_id": command_id, "status": "accepted", "ids": ids}
        result = await self.journal.append(NewCommand(
            command_id=command_id,
            command_type=command_type,
            payload=cmd.model_dump(mode="json"),
            actor=actor,
            correlation_id=correlation_id or command_id,
            request_hash=digest,
            response=body,
            subjects=spec.subjects(cmd),
            observed_at=observed_at_of(cmd),
        ))
        if not result.created:  # the same key raced in concurrently
            return self._repeat(result.entry, actor, digest)
        self.accepted.put(result.entry.seq, cmd)
        if self.metrics is not None:
            self.metrics.accepted(command_type)
        return Submission(result.entry, replayed=False, body=body)

    def _repeat(self, previous: JournalEntry, actor: str, digest: str) -> Submission:
        """The first answer to a key's repeat by the principal who used it first. A key is
        scoped to its principal: another's reuse is refused, and learns nothing of the
        command (type, ids, outcome)."""
        if previous.actor != actor:
            raise IdempotencyConflict(
                f"Idempotency-Key {previous.command_id} is already used by another principal; "
                "choose another key", field="Idempotency-Key")
        if previous.request_hash != digest:
            raise IdempotencyConflict(
                f"Idempotency-Key {previous.command_id} was already used for a different "
                f"request ({previous.command_type})", field="Idempotency-Key")
        return Submission(previous, replayed=True, body=dict(previous.response))

    async def _precheck(self, spec: CommandSpec, cmd: Any) -> None:
        """Refuse at once what is certainly wrong; anything uncertain is accepted."""
        command_type = spec.name
        extra = self.prechecks.get(command_type)
        if extra is not None:
            await extra(cmd)
        target = spec.target
        if target is None:
            return
        target_id = str(cmd.id)
        pending = self.journal.unprojected(sys.maxsize, f"{target.kind}:{target_id}")
        if target.one_pending and any(e.command_type == command_type for e in pending):
            raise IllegalTransition(
                f"a {command_type} command for {target.what} {target_id} is already pending",
                field="id")
        if any(e.command_type in CREATES.get(target.kind, ()) for e in pending):
            return
        if self.store is None or (self.availability is not None
                                  and self.availability.down(EVENT_STORE)):
            return  # cannot tell now: accept, the dispatcher decides
        try:
            # Bounded: while the store is down a lookup blocks for its retries (~10 x the
            # connect timeout), and acknowledging must not wait for the store.
            # the aggregate only when its status matters; else one row says it exists
            check = self.store.get if target.final_statuses else self.store.exists
            lookup = asyncio.get_running_loop().run_in_executor(None, check, UUID(target_id))
            agg = await asyncio.wait_for(lookup, PRECHECK_STORE_TIMEOUT_S)
        except (StoreUnavailable, TimeoutError):
            return  # cannot tell now: accept, the dispatcher decides
        if not agg:
            raise TargetNotFound(f"{target.what} {target_id} not found", field="id")
        status = getattr(agg, "status", None)
        if status in target.final_statuses:
            raise IllegalTransition(
                f"{target.what} {target_id} is {status}; {command_type} is not possible",
                field="id")


def outcome_body(entry: JournalEntry) -> dict[str, Any]:
    body = dict(entry.response)
    body["status"] = entry.status
    if entry.status == APPLIED:
        body["position"] = entry.position
    if entry.status == REJECTED:
        body["reason"] = entry.reason
    return body
