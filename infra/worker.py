"""A background thread that repeats a unit of work, sleeping while there is none."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from sqlalchemy import Engine, Table

if TYPE_CHECKING:
    from infra.event_store import EventStore

log = logging.getLogger("obsledger.worker")


def retry_delay(failures: int, most: float) -> float:
    """The back-off after ``failures`` failures in a row: doubling from 0.2 s, at most ``most``."""
    return min(most, 0.2 * 2 ** min(failures, 8))


class PollingWorker:
    """Calls ``once()`` until stopped; sleeps ``idle_timeout()`` (or until woken) when it
    returns 0. An exception goes to ``failed`` (by default: logged, kept in ``last_error`` and
    retried after ``interval``)."""

    name = "worker"  # the thread's name
    join_timeout = 10.0

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def once(self) -> int:
        raise NotImplementedError

    def idle_timeout(self) -> float:
        """How long to sleep, unless woken, after a pass that found nothing to do."""
        return self.interval

    def failed(self, error: Exception) -> None:
        """A pass raised ``error`` (a store or database down): wait before the next one."""
        self.last_error = f"{type(error).__name__}: {error}"
        log.warning("%s failed, retrying: %s", self.name, self.last_error)
        self._sleep(self.interval)

    def wake(self, _position: int | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.join_timeout)

    def _sleep(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.once()
            except Exception as e:
                self.failed(e)
                continue
            self.last_error = None
            if not done:
                self._sleep(self.idle_timeout())


class LogFollower(PollingWorker):
    """A worker that reads the event store's log ``page_size`` events at a time and keeps
    what it has done in ``table`` of ``engine`` (created here when missing)."""

    def __init__(self, store: EventStore, engine: Engine, table: Table, page_size: int,
                 interval: float) -> None:
        super().__init__(interval)
        self.store = store
        self.engine = engine
        self.page_size = page_size
        with engine.begin() as conn:
            table.create(conn, checkfirst=True)
