"""A background thread that repeats a unit of work, sleeping while there is none."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("obsledger.worker")


class PollingWorker:
    """Calls ``once()`` until stopped; sleeps ``interval`` (or until woken) when it returns 0.
    An exception is logged, kept in ``last_error`` and retried after ``interval``."""

    name = "worker"

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def once(self) -> int:
        raise NotImplementedError

    def wake(self, _position: int | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                done = self.once()
                self.last_error = None
            except Exception as e:  # a store or database down: try again later
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("%s failed, retrying: %s", self.name, self.last_error)
                done = 0
            if not done:
                self._wake.wait(self.interval)
                self._wake.clear()
