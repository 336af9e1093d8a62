"""The dispatcher: applies journaled commands to the event store, in order, in batches.

One event-store transaction per batch (with a receipt per command, so a replayed command is
recognised); a batch that fails is split so the failing command is isolated. While the store
is unreachable, commands wait in the journal and the dispatcher backs off.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from pydantic import ValidationError

from commands.models import JOURNALED
from commands.registry import COMMANDS
from commands.service import AcceptedCommands
from commands.spec import CommandSpec, Policy
from commands.unit_of_work import UnitOfWork
from domain.errors import DomainRejection, TargetNotFound
from domain.provenance import Provenance
from domain.raw_data import RawDataFile
from domain.receipts import CommandReceipt, receipt_id
from infra.event_store import EventStore, IntegrityError, StoreUnavailable
from infra.journal import ACCEPTED, APPLIED, REJECTED, Journal, JournalEntry, Outcome
from infra.journal_slots import PeerJournals
from infra.logs import command_context
from infra.metrics import Metrics
from infra.settings import Settings

log = logging.getLogger("obsledger.dispatcher")


@dataclass(slots=True)
class _Parsed:
    entry: JournalEntry
    spec: CommandSpec
    command: Any
    provenance: Provenance


class Dispatcher:
    def __init__(
        self,
        journal: Journal,
        store: EventStore,
        settings: Settings,
        on_applied: Callable[[int], None] | None = None,
        clock: Callable[[], datetime] | None = None,
        metrics: Metrics | None = None,
        accepted: AcceptedCommands | None = None,
        peers: PeerJournals | None = None,
    ) -> None:
        self.journal = journal
        #: the other API processes' journals: a command waits for their earlier ones on
        #: the same entity (``_in_order``)
        self.peers = peers
        self.store = store
        self.accepted = accepted  # the commands as this process accepted them
        self.settings = settings
        self.policy = Policy.from_settings(settings, clock)
        self.metrics = metrics
        self.batch_size = settings.dispatch_batch_size
        self.on_applied = on_applied
        self.store_reachable = True
        self.last_error: str | None = None
        self.applied_position = 0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- running -------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="dispatcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def run_forever(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            try:
                done = self.dispatch_once()
            except StoreUnavailable as e:
                self.store_reachable = False
                self.last_error = str(e)
                log.warning("event store unavailable, retrying in %.2fs: %s", backoff, e)
                self._stop.wait(backoff * (0.5 + random.random()))  # jitter
                backoff = min(backoff * 2, self.settings.dispatch_retry_max_s)
                continue
            except Exception:
                log.exception("dispatcher error")
                self._stop.wait(1.0)
                continue
            backoff = 0.05
            if done == 0:
                self._wake.wait(0.25)
                self._wake.clear()

    def drain(self, timeout: float = 60.0) -> None:
        """Apply everything due now (tests and command-line use)."""
        deadline = time.monotonic() + timeout
        while self.dispatch_once():
            if time.monotonic() > deadline:
                raise TimeoutError("journal not drained in time")

    # -- one batch -----------------------------------------------------------------------
    def dispatch_once(self) -> int:
        """Apply one batch of due commands; return how many commands got an outcome."""
        entries = self.journal.next_pending(self.batch_size)
        if not entries:
            return 0
        outcomes = self._apply(entries)
        self.store_reachable = True
        self.journal.record_outcomes(outcomes)
        if self.metrics is not None:
            self._count(entries, outcomes)
        applied = [o.position for o in outcomes if o.status == APPLIED and o.position]
        if applied:
            self.applied_position = max(self.applied_position, *applied)
            if self.on_applied is not None:
                self.on_applied(self.applied_position)
        return len(outcomes)

    def _count(self, entries: list[JournalEntry], outcomes: list[Outcome]) -> None:
        assert self.metrics is not None
        types = {e.seq: e.command_type for e in entries}
        self.metrics.dispatch_batch.observe(len(entries))
        for o in outcomes:
            if o.status == APPLIED:
                self.metrics.commands_applied.labels(types[o.seq]).inc()
            elif o.status == REJECTED:
                self.metrics.commands_rejected.labels(types[o.seq], o.reason_code or "").inc()

    def _count_registered(self, events: list[Any]) -> None:
        """Files registered by the transaction just committed (its registration events)."""
        assert self.metrics is not None
        registered = RawDataFile.Registered
        sizes = [e.size for e in events if type(e) is registered]
        if sizes:
            self.metrics.registered(len(sizes), sum(sizes))

    def _apply(self, entries: list[JournalEntry]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        parsed: list[_Parsed] = []
        for entry in entries:
            item = self._parse(entry)
            if isinstance(item, Outcome):
                outcomes.append(item)
            else:
                parsed.append(item)
        if self.peers is not None and parsed:
            parsed = self._in_order(parsed, outcomes)
        while parsed:
            uow = UnitOfWork(self.store)
            events: list[Any] = []
            ends: list[int] = []
            failure: tuple[_Parsed, Exception] | None = None
            for item in parsed:
                try:
                    with command_context(item.entry.command_id, item.entry.correlation_id):
                        ids = item.spec.handle(item.command, uow, item.provenance,
                                               self.policy)
                    uow.add(CommandReceipt.record(
                        item.spec.name, [str(i) for i in ids], item.provenance), "command receipt")
                    events.extend(uow.collect())
                except StoreUnavailable:
                    raise
                except Exception as e:  # isolate the command, never stall the journal
                    failure = (item, e)
                    break
                ends.append(len(events))
            if failure is not None:
                with command_context(failure[0].entry.command_id,
                                     failure[0].entry.correlation_id):
                    outcomes.append(self._refusal(*failure))
                parsed.remove(failure[0])
                continue
            try:
                started = time.perf_counter()
                recordings = self.store.save(*events)
                if self.metrics is not None:
                    self.metrics.append_seconds.observe(time.perf_counter() - started)
                    self._count_registered(events)
            except IntegrityError:
                if len(parsed) == 1:
                    outcomes.append(self._resolve_collision(parsed[0], events))
                else:  # isolate the colliding command: one transaction each
                    for item in parsed:
                        outcomes.extend(self._apply([item.entry]))
                return outcomes
            for item, end in zip(parsed, ends, strict=True):
                outcomes.append(Outcome(item.entry.seq, APPLIED,
                                        position=recordings[end - 1].notification.id))
            break
        return outcomes

    def _in_order(self, parsed: list[_Parsed], outcomes: list[Outcome]) -> list[_Parsed]:
        """Per-entity order across API processes: a command waits (deferred, like a
        missing target) while another process holds an earlier-received command on one of
        its entities that is not applied or rejected yet; so do this journal's later
        commands on the same entities. A client that waited for an acknowledgement from
        process A before sending the next command to process B gets them applied in that
        order (received_at is taken before the acknowledgement)."""
        assert self.peers is not None
        subjects = [item.spec.subjects(item.command) for item in parsed]
        earliest = self.peers.earliest_pending(s for subs in subjects for s in subs)
        if not earliest:
            return parsed
        blocked: set[str] = set()
        ready: list[_Parsed] = []
        now = time.time()
        for item, subs in zip(parsed, subjects, strict=True):
            received = item.entry.received_at
            waits_for = next((s for s in subs if s in blocked
                              or (s in earliest and earliest[s] < received)), None)
            if waits_for is None:
                ready.append(item)
                continue
            blocked.update(subs)
            entry = item.entry
            outcomes.append(Outcome(
                entry.seq, ACCEPTED, reason=f"waiting: an earlier command on {waits_for} is "
                "not applied yet", reason_code="waiting",
                not_before=now + min(0.02 * 2 ** min(entry.attempts, 8), 1.0),
                first_deferred_at=entry.first_deferred_at))
        return ready

    def _parse(self, entry: JournalEntry) -> _Parsed | Outcome:
        spec = COMMANDS.get(entry.command_type)
        if spec is None:
            return Outcome(entry.seq, REJECTED, reason=f"unknown command type "
                           f"{entry.command_type}", reason_code="invalid")
        command = self.accepted.take(entry.seq) if self.accepted is not None else None
        if command is None:
            try:
                command = spec.model.model_validate(entry.payload, context=JOURNALED)
            except ValidationError as e:
                return Outcome(entry.seq, REJECTED, reason=f"invalid command: {e}",
                               reason_code="invalid")
        return _Parsed(entry, spec, command, Provenance(
            actor=entry.actor, command_id=entry.command_id,
            correlation_id=entry.correlation_id, observed_at=entry.observed_at))

    def _refusal(self, item: _Parsed, error: Exception) -> Outcome:
        entry = item.entry
        rid = receipt_id(entry.command_id)
        if isinstance(error, DomainRejection) and self.store.exists(rid):
            # A replay of an applied command (crash before the journal heard of it): the
            # domain now refuses it (finishing twice, ...), but its receipt says it was applied.
            return self._replayed(entry, rid)
        if isinstance(error, TargetNotFound):
            now = time.time()
            first = entry.first_deferred_at or now
            if now - first < self.settings.missing_target_deadline_s:
                delay = min(0.1 * 2 ** entry.attempts, 5.0)
                return Outcome(entry.seq, ACCEPTED, reason=f"waiting: {error.message}",
                               reason_code="waiting", reason_field=error.field,
                               not_before=now + delay, first_deferred_at=first)
        if isinstance(error, DomainRejection):
            log.info("%s rejected (%s): %s", entry.command_type, error.code, error.message)
            return Outcome(entry.seq, REJECTED, reason=error.message, reason_code=error.code,
                           reason_field=error.field)
        log.error("command %s (%s) failed unexpectedly", entry.command_id, entry.command_type,
                  exc_info=error)
        return Outcome(entry.seq, REJECTED, reason=f"internal error: {error!r}",
                       reason_code="internal")

    def _replayed(self, entry: JournalEntry, rid: UUID) -> Outcome:
        """A command whose receipt is stored: applied before, when the same principal sent
        it. The same key from another principal (through another process's journal, which
        did not know the key) is refused: keys are scoped to their principal."""
        if self.store.recorded_by(rid) not in (None, entry.actor):
            return Outcome(entry.seq, REJECTED, reason=f"Idempotency-Key {entry.command_id} "
                           "is already used by another principal; choose another key",
                           reason_code="idempotency_conflict", reason_field="Idempotency-Key")
        return Outcome(entry.seq, APPLIED, position=self.store.position_of(rid))

    def _resolve_collision(self, item: _Parsed, events: list[Any]) -> Outcome:
        """A single command's transaction collided with stored events: say why."""
        entry = item.entry
        rid = receipt_id(entry.command_id)
        if self.store.exists(rid):  # applied before (crash before the journal heard of it)
            return self._replayed(entry, rid)
        for e in events:
            if e.originator_version == 1 and self.store.exists(e.originator_id):
                what = _describe(e)
                return Outcome(entry.seq, REJECTED, reason=f"{what} already exists",
                               reason_code="conflict")
        # A concurrent writer changed one of our aggregates: try again shortly.
        return Outcome(entry.seq, ACCEPTED, reason="retrying after a concurrent write",
                       reason_code="waiting", not_before=time.time() + 0.05)


def _describe(event: Any) -> str:
    kind = type(event).__qualname__.split(".")[0]
    words = {"RawDataFile": "raw data file", "ExecutedObsUnit": "executed obs unit",
             "RawDataPackage": "raw data package", "StagingRequest": "staging request"}
    label = words.get(kind, kind)
    if kind == "RawDataFile":
        return f"{label} {event.name} of instrument {event.instrument} ({event.originator_id})"
    return f"{label} {event.originator_id}"
