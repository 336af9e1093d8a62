"""More than one API process on one store (``obsledger serve --workers N``, or replicas that
share a data directory): what each process runs beside its own journal's dispatcher.

- **Leader**: one process (``infra/leader.py``) runs the workers there must be one of; the
  others take over when it dies (checked every ``COORDINATION_INTERVAL_S``).
- **Adoption**: a slot journal whose owner died (its ``flock`` is free) is taken by a live
  process, whose dispatcher applies it to the end, then lets it go; a restarted process
  claims a free slot, maybe the same. Nothing acknowledged waits for the dead process.

Design notes: docs/ARCHITECTURE.md ("More than one API process").
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from infra.event_store import EventStore, StoreUnavailable
from infra.journal import Journal
from infra.journal_slots import (
    JournalSlot,
    PeerJournals,
    lock_path,
    slot_journals,
    try_lock,
    unlock,
)
from infra.leader import Leadership, LeaderUnknown
from infra.metrics import Metrics
from infra.settings import Settings

log = logging.getLogger("obsledger.scaleout")

#: How often a process checks the leader lock and looks for orphaned journals.
COORDINATION_INTERVAL_S = 1.0


class CoordinatedProcess(Protocol):
    """What the coordinator needs of this process (``bootstrap.ledger.Ledger``)."""

    @property
    def settings(self) -> Settings: ...

    @property
    def store(self) -> EventStore | None: ...

    @property
    def slot(self) -> JournalSlot | None: ...

    @property
    def metrics(self) -> Metrics: ...

    def applied(self, position: int) -> None: ...


class Coordinator:
    def __init__(self, ledger: CoordinatedProcess, on_elected: Callable[[], None],
                 on_demoted: Callable[[], None]) -> None:
        self.ledger = ledger
        self.leadership = Leadership(ledger.settings)
        self.leader = False
        self.demoted = False  # lost the lock to another process: stays a follower
        self.adopted = 0  # orphaned journals applied by this process
        self._on_elected = on_elected
        self._on_demoted = on_demoted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="scaleout", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.leadership.release()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.elect()
                self.adopt_orphans()
            except Exception:  # never let coordination die: log, try again
                log.exception("scale-out coordination failed")
            self._stop.wait(COORDINATION_INTERVAL_S)

    def elect(self) -> None:
        """Take the leader lock when free; notice when this process lost it."""
        if self.demoted:
            return
        if self.leader and self.leadership.held():
            return
        try:
            got = self.leadership.acquire()
        except LeaderUnknown as e:
            log.debug("leader lock unavailable: %s", e)
            return  # PostgreSQL does not answer: keep doing what we did
        if got and not self.leader:
            log.info("this process leads: projector and the other single workers run here")
            self.leader = True
            self._on_elected()
        elif not got and self.leader:
            # the connection holding the lock broke and another process took it meanwhile
            log.error("another process took the leader lock: this one stops its single "
                      "workers and stays a follower until restarted")
            self.leader = False
            self.demoted = True
            self._on_demoted()

    def adopt_orphans(self) -> None:
        """Apply every slot journal whose owner is gone, one at a time, to the end."""
        ledger = self.ledger
        if ledger.store is None or ledger.slot is None:
            return
        for path in slot_journals(ledger.settings.journal_file):
            if self._stop.is_set():
                return
            if path == ledger.slot.path:
                continue
            fd = try_lock(lock_path(path))
            if fd is None:  # its owner lives (or another peer adopts it now)
                continue
            try:
                self._drain_orphan(path)
            finally:
                unlock(fd)

    def _drain_orphan(self, path: Any) -> None:
        from commands.dispatcher import Dispatcher

        ledger = self.ledger
        assert ledger.store is not None
        journal = Journal(path)
        peers = PeerJournals(ledger.settings.journal_file, path)
        try:
            if journal.depth() == 0:
                return
            log.warning("adopting the journal %s of a process that is gone: %d commands "
                        "to apply", path.name, journal.depth())
            dispatcher = Dispatcher(journal, ledger.store, ledger.settings,
                                    on_applied=ledger.applied, metrics=ledger.metrics,
                                    peers=peers)
            try:
                # what is due now; deferred commands are taken up again next round
                while dispatcher.dispatch_once() and not self._stop.is_set():
                    pass
            except StoreUnavailable as e:
                log.warning("adopted journal %s waits for the store: %s", path.name, e)
                return
            if journal.depth() == 0:
                self.adopted += 1
        finally:
            peers.close()
            journal.close()
