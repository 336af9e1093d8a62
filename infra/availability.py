"""What answers now: the event store and the read-model database, as last seen.

A request must never wait on a store that is known to be down: eventsourcing's pool waits its
connect timeout for a connection (ten times over, through its retries), a query would wait for
its connect attempt. ``Availability`` remembers, per part, whether it answered the last time
anyone tried — a probe thread per part (a connection of its own with short timeouts, every
``probe_s``), and every request that hit a store error or got an answer. Smart queries skip
the read models while they are down and answer from the journal alone
(``queries.service.Reading``); ``/health``, ``/ready`` and ``/metrics`` read the stores only
within a short budget (:class:`Bounded`), and never a part known to be down.

``note_unavailable`` marks the HTTP request being served (a context variable the API's
middleware sets) so that its answer says the read models did not answer
(``X-Read-Models: unavailable``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, Literal, TypeVar

import psycopg
import psycopg_pool
from eventsourcing.persistence import InterfaceError as StoreInterfaceError
from eventsourcing.persistence import OperationalError as StoreOperationalError
from sqlalchemy import exc as sa_exc

from infra.event_store import StoreUnavailable
from infra.read_model_db import ReadModelsUnavailable

log = logging.getLogger("obsledger.availability")

EVENT_STORE = "event_store"
READ_MODEL_DB = "read_models"
PARTS = (EVENT_STORE, READ_MODEL_DB)
LABELS = {EVENT_STORE: "the event store", READ_MODEL_DB: "the read-model database"}

#: Errors that mean "this database does not answer now" (connection refused or lost, a pool
#: or lock timeout, the server shutting down), not "this request is wrong". SQLAlchemy's are
#: the read-model database's (its engine is SQLAlchemy's); psycopg's and eventsourcing's the
#: event store's.
READ_MODEL_ERRORS: tuple[type[Exception], ...] = (
    ReadModelsUnavailable, sa_exc.OperationalError, sa_exc.InterfaceError,
    sa_exc.TimeoutError, sa_exc.DisconnectionError)
EVENT_STORE_ERRORS: tuple[type[Exception], ...] = (
    StoreUnavailable, psycopg.OperationalError, psycopg.InterfaceError,
    psycopg_pool.PoolTimeout, StoreOperationalError, StoreInterfaceError)
UNAVAILABLE_ERRORS = READ_MODEL_ERRORS + EVENT_STORE_ERRORS


def unavailable_part(exc: BaseException) -> str | None:
    """Which part an error says is unreachable (None: not such an error)."""
    if isinstance(exc, READ_MODEL_ERRORS):
        return READ_MODEL_DB
    if isinstance(exc, EVENT_STORE_ERRORS):
        return EVENT_STORE
    return None


def short_error(exc: BaseException) -> str:
    """The first line of an error, without SQLAlchemy's background link."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# -- per part ---------------------------------------------------------------------------------
@dataclass
class PartStatus:
    reachable: bool | None = None  # None: nobody tried yet
    since: datetime | None = None  # when it last changed
    checked: float = 0.0  # monotonic time of the last attempt
    error: str | None = None


class Availability:
    """Whether each part answered the last time anyone tried.

    A part is ``down`` once an attempt failed, until an attempt succeeds. Without probes
    running (a process with no HTTP server) a failure is only trusted for ``hold_s``: then the
    next request tries again."""

    def __init__(self, hold_s: float = 2.0) -> None:
        self.hold_s = hold_s
        self._parts = {p: PartStatus() for p in PARTS}
        self._lock = threading.Lock()
        self._probes: list[threading.Thread] = []
        self._stop = threading.Event()

    def failed(self, part: str, error: BaseException | str) -> None:
        with self._lock:
            s = self._parts[part]
            if s.reachable is not False:
                s.since = datetime.now(UTC)
                log.warning("%s does not answer: %s", LABELS[part], error if isinstance(
                    error, str) else short_error(error))
            s.reachable = False
            s.checked = time.monotonic()
            s.error = error if isinstance(error, str) else short_error(error)

    def succeeded(self, part: str) -> None:
        s = self._parts[part]
        if s.reachable is True:  # the common case: no lock
            s.checked = time.monotonic()
            return
        with self._lock:
            if s.reachable is False:
                log.warning("%s answers again", LABELS[part])
            s.reachable, s.since, s.error = True, datetime.now(UTC), None
            s.checked = time.monotonic()

    def down(self, part: str) -> bool:
        """Known not to answer: do not try it on a request's time."""
        s = self._parts[part]
        if s.reachable is not False:
            return False
        return self.probing or time.monotonic() - s.checked < self.hold_s

    def up(self, part: str) -> bool:
        return not self.down(part)

    def report(self) -> dict[str, dict[str, Any]]:
        """Each part: ``reachable`` (null until tried), ``since`` (when that last changed),
        ``checked_s_ago`` and the last ``error``."""
        now = time.monotonic()
        return {p: {"reachable": s.reachable,
                    "since": s.since.isoformat() if s.since else None,
                    "checked_s_ago": round(now - s.checked, 3) if s.checked else None,
                    "error": s.error}
                for p, s in self._parts.items()}

    # -- probes ----------------------------------------------------------------------------
    @property
    def probing(self) -> bool:
        return bool(self._probes) and not self._stop.is_set()

    def start_probes(self, checks: dict[str, Callable[[], None]], every_s: float) -> None:
        """One thread per part calling its check (raises when the part does not answer)
        every ``every_s`` seconds."""
        if self._probes:
            return
        for part, check in checks.items():
            t = threading.Thread(target=self._probe, args=(part, check, every_s),
                                 name=f"probe-{part}", daemon=True)
            self._probes.append(t)
            t.start()

    def _probe(self, part: str, check: Callable[[], None], every_s: float) -> None:
        while not self._stop.is_set():
            try:
                check()
            except Exception as e:
                self.failed(part, e)
            else:
                self.succeeded(part)
            self._stop.wait(every_s)

    def stop(self) -> None:
        self._stop.set()


# -- figures read within a budget -------------------------------------------------------------
T = TypeVar("T")


@dataclass
class _Run(Generic[T]):
    done: threading.Event = field(default_factory=threading.Event)
    value: T | None = None
    started: float = field(default_factory=time.monotonic)


class Bounded(Generic[T]):
    """``fn()`` in a thread of its own, waited for at most ``budget_s``: None when it takes
    longer (a store that hangs until its pool timeout). One call at a time: while one that
    already overran its budget still runs, the answer is None at once."""

    def __init__(self, fn: Callable[[], T], budget_s: float, name: str) -> None:
        self.fn = fn
        self.budget_s = budget_s
        self.name = name
        self._lock = threading.Lock()
        self._run: _Run[T] | None = None

    def __call__(self) -> T | None:
        with self._lock:
            run = self._run
            if run is None or run.done.is_set():
                run = self._run = _Run()
                threading.Thread(target=self._call, args=(run,), name=self.name,
                                 daemon=True).start()
            elif time.monotonic() - run.started > self.budget_s:
                return None  # still stuck on an earlier call: no use waiting again
        if run.done.wait(self.budget_s):
            return run.value
        return None

    def _call(self, run: _Run[T]) -> None:
        try:
            run.value = self.fn()
        except Exception as e:  # the caller answers without these figures
            log.warning("%s failed: %s", self.name, short_error(e))
        finally:
            run.done.set()


# -- the request being served -----------------------------------------------------------------
@dataclass
class RequestReads:
    unavailable: set[str] = field(default_factory=set)


_request: ContextVar[RequestReads | None] = ContextVar("obsledger_request_reads", default=None)


def track_request() -> tuple[RequestReads, Token[RequestReads | None]]:
    """Start tracking what the current request could not read (the API's middleware)."""
    reads = RequestReads()
    return reads, _request.set(reads)


def end_request(token: Token[RequestReads | None]) -> None:
    _request.reset(token)


def note_unavailable(part: str) -> None:
    """The request being served (if any) was answered without ``part``. Worker threads of
    the request see the same object: starlette runs them in a copy of its context."""
    reads = _request.get()
    if reads is not None:
        reads.unavailable.add(part)


def read_models_state() -> Literal["available", "unavailable"]:
    """What the current request's answer says of the read models."""
    reads = _request.get()
    return "unavailable" if reads is not None and READ_MODEL_DB in reads.unavailable \
        else "available"
