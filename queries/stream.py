"""The live stream: what changes in the read models, pushed as it happens (``GET /stream``).

One :class:`ReadModelFeed` per process follows the event log *behind* the read models (never
past the position they reached, so whoever reads a query after a message sees what it says),
decodes each event once and turns it into one message: the rows it inserted or updated, per
read model, with the event's log position as the message id. Every subscriber gets the same
encoded bytes; a subscriber resuming from an older position (``Last-Event-ID``) is served
from a window of recent messages, or from the log itself when it is older than the window,
then joins the live messages — nothing in between is lost.

Besides the log's messages (``change``), which are durable and resumable, a subscriber gets
live-only ones without an id:

- ``command``: a critical command accepted by this process (``status: accepted``,
  ``pending: true``, with the rows it will create as the smart queries show them), then
  again once the read models show it (``applied``, with its position) or once it was
  ``rejected``. A subscriber that connects first gets the commands pending at that moment.
- ``download_progress``: the downloader's in-memory progress of each running job (bytes,
  B/s, ETA) at least every second; checkpoints stay the durable record.

The feed runs on a thread of its own, started by the first subscriber.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from infra.journal import ACCEPTED, APPLIED, Journal, JournalEntry
from queries.overlay import Overlay

log = logging.getLogger("obsledger.stream")

CHANGE = "change"
COMMAND = "command"
DOWNLOAD_PROGRESS = "download_progress"

#: Log messages kept for subscribers that resume (older ones are read from the log again).
WINDOW = 50_000
#: Messages waiting for one subscriber; beyond, it catches up from the window or the log
#: (live-only messages are then lost to it).
SUBSCRIBER_BACKLOG = 100_000
#: Notifications read from the log at once.
PAGE = 2_000


def dumps(value: Any) -> bytes:
    return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS)


@dataclass(slots=True, frozen=True)
class Message:
    """One server-sent event: ``event`` name, JSON ``data``, and the log position that is its
    id (None: a live-only message, without an id)."""

    event: str
    data: bytes
    position: int | None = None


@dataclass(eq=False)
class Subscriber:
    loop: asyncio.AbstractEventLoop
    cursor: int  # the last log position delivered
    queue: deque[Message] = field(default_factory=deque)
    live: bool = False  # fed by the feed thread (else catching up)
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def push(self, messages: Sequence[Message]) -> None:
        """From the feed thread (under its lock)."""
        if len(self.queue) + len(messages) > SUBSCRIBER_BACKLOG:
            self.queue.clear()  # too slow: catch up from the window or the log
            self.live = False
        else:
            self.queue.extend(messages)
        with contextlib.suppress(RuntimeError):  # the subscriber's loop closed
            self.loop.call_soon_threadsafe(self.wake.set)


def command_message(entry: JournalEntry) -> Message:
    """A command as the stream shows it: pending with the rows it will create, or its
    outcome."""
    body: dict[str, Any] = {
        "command_id": entry.command_id, "command_type": entry.command_type,
        "status": entry.status, "pending": entry.status == ACCEPTED,
        "actor": entry.actor, "correlation_id": entry.correlation_id,
        "received_at": entry.received_at, "ids": entry.response.get("ids", {}),
        "position": entry.position if entry.status == APPLIED else None,
        "reason": entry.reason}
    if entry.status == ACCEPTED:
        overlay = Overlay(lambda _k, _i: None)  # what the journal alone makes of it
        overlay.apply(entry)
        body["rows"] = {kind: [overlay.rows[kind][i] for i in touched]
                        for kind, touched in overlay.touched.items() if touched}
        subject = entry.payload.get("id")
        body["subject_id"] = str(subject) if subject is not None else None
    return Message(COMMAND, dumps(body))


class ReadModelFeed:
    """Follows the log up to the read models' position and fans messages out.

    ``projected()`` gives the read models' position; ``store`` and ``projector`` (for its
    ``changes``) may come later (``attach``), when the event store first answers.
    """

    def __init__(self, journal: Journal, projected: Callable[[], int],
                 progress: Callable[[], list[dict[str, Any]]] | None = None,
                 poll_s: float = 0.2) -> None:
        self.journal = journal
        self.projected = projected
        self.progress = progress
        self.poll_s = poll_s
        self.store: Any = None
        self.projector: Any = None
        self.position = 0  # the last log position turned into messages
        self.floor = 0  # the window holds every message after this position
        self.window: list[Message] = []
        self.events_out = 0  # log messages produced (bench)
        self.last_error: str | None = None
        self._subscribers: set[Subscriber] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._journal_seq = 0
        self._open: dict[int, str] = {}  # seq → command id: accepted, outcome not yet sent
        self._unplaced = False  # the read models' position was not known at start

    def attach(self, store: Any, projector: Any) -> None:
        self.store, self.projector = store, projector
        projector.on_advance(self.wake)
        self.wake()

    def wake(self, _position: int | None = None) -> None:
        self._wake.set()

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        """Start following (once): from the read models' position now."""
        with self._lock:
            if self._thread is not None:
                return
            try:
                self.position = self.floor = self.projected()
            except Exception as e:  # the read models do not answer: once they do
                log.info("stream: read models unavailable at start: %s", e)
                self._unplaced = True
            self._journal_seq = self.journal.last_seq()
            self.journal.on_append(self.wake)
            self._thread = threading.Thread(target=self._run, name="stream", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        next_progress = 0.0
        while not self._stop.is_set():
            self._wake.clear()
            busy = False
            try:
                self._commands()
                busy = self._follow()
                self._outcomes()
                self.last_error = None
            except Exception as e:  # a store down: the journal's messages go on
                if self.last_error != str(e):
                    log.warning("stream: %s", e)
                self.last_error = str(e)
                self._stop.wait(1.0)
            now = time.monotonic()
            if self.progress is not None and now >= next_progress:
                next_progress = now + 1.0
                self._progress()
            if not busy:
                self._wake.wait(min(self.poll_s, max(0.0, next_progress - now)) or self.poll_s)

    # -- producing -----------------------------------------------------------------------
    def _publish(self, messages: list[Message]) -> None:
        if not messages:
            return
        with self._lock:
            logged = [m for m in messages if m.position is not None]
            if logged:
                self.window.extend(logged)
                if len(self.window) > 2 * WINDOW:
                    cut = len(self.window) - WINDOW
                    self.floor = self.window[cut - 1].position or self.floor
                    del self.window[:cut]
                self.position = max(self.position, logged[-1].position or 0)
            for sub in self._subscribers:
                if sub.live:
                    sub.push(messages)

    def _follow(self) -> bool:
        """Messages for the next page of events the read models show; True if more wait."""
        if self.store is None or self.projector is None:
            return False
        target = self.projected()
        if self._unplaced:  # started while the read models did not answer: from here
            with self._lock:
                self.position = self.floor = max(self.position, target)
                self._unplaced = False
        if target <= self.position:
            return False
        notifications = self.store.select_notifications(self.position, PAGE)
        notifications = [n for n in notifications if n.id <= target]
        if not notifications:
            return False
        messages = self.messages_of(notifications)
        self.events_out += len(messages)
        self._publish(messages)
        with self._lock:  # past events that change no read model (receipts) too
            self.position = max(self.position, notifications[-1].id)
        return notifications[-1].id < target

    def messages_of(self, notifications: Sequence[Any]) -> list[Message]:
        out = []
        for n in notifications:
            if not self.projector.handles(n.topic):
                continue
            event = self.store.decode(n)
            changes = self.projector.changes(event, n.id)
            if not changes:
                continue
            out.append(Message(CHANGE, dumps({
                "position": n.id, "event": type(event).__qualname__,
                "aggregate_id": event.originator_id, "command_id": event.command_id,
                "actor": event.actor, "recorded_at": event.timestamp,
                "changes": changes}), n.id))
        return out

    def _commands(self) -> None:
        """Commands journaled since the last look: pushed pending at once."""
        while True:
            entries = self.journal.entries_after(self._journal_seq, 1000)
            if not entries:
                return
            self._journal_seq = entries[-1].seq
            for e in entries:
                if e.status == ACCEPTED:
                    self._open[e.seq] = e.command_id
            self._publish([command_message(e) for e in entries])

    def _outcomes(self) -> None:
        """Commands applied (and shown by the read models, as far as streamed) or rejected."""
        if not self._open:
            return
        done = []
        for e in self.journal.outcomes_of(list(self._open)):
            if e.status == APPLIED and (e.position or 0) > self.position:
                continue  # the read models do not show it yet
            done.append(e)
            self._open.pop(e.seq, None)
        self._publish([command_message(e) for e in done])

    def _progress(self) -> None:
        assert self.progress is not None
        try:
            jobs = self.progress()
        except Exception as e:  # the downloader's figures are best effort
            log.debug("stream: download progress unavailable: %s", e)
            return
        self._publish([Message(DOWNLOAD_PROGRESS, dumps(job)) for job in jobs])

    # -- consuming -----------------------------------------------------------------------
    def _join(self, sub: Subscriber) -> list[Message] | None:
        """The window's messages after the subscriber's cursor, making it live; None when
        the window does not reach back that far (read the log)."""
        with self._lock:
            if sub.cursor < self.floor:
                return None
            i = bisect.bisect_right(self.window, sub.cursor,
                                    key=lambda m: m.position or 0)
            sub.live = True
            sub.queue.clear()
            return self.window[i:]

    def pending_commands(self, after: int) -> list[Message]:
        """The commands that are accepted, or applied beyond ``after``: what a subscriber
        connecting now should know is on its way."""
        return [command_message(e) for e in self.journal.unprojected(after)[-10_000:]]

    async def subscribe(self, after: int | None) -> AsyncIterator[Message]:
        """Messages after log position ``after`` (None: from now on), as long as wanted:
        first the commands pending now, then every change after ``after``, then live."""
        await asyncio.to_thread(self.start)  # (reads the read models' position once)
        sub = Subscriber(asyncio.get_running_loop(), self.position if after is None else after)
        with self._lock:
            self._subscribers.add(sub)
        try:
            backlog = self._join(sub)  # live from here: nothing produced now is missed
            for m in await asyncio.to_thread(self.pending_commands, sub.cursor):
                yield m
            while True:
                if backlog is None and not sub.live:
                    backlog = self._join(sub)
                    if backlog is None:  # older than the window: from the log itself
                        page = await asyncio.to_thread(self._from_log, sub.cursor)
                        if not page:
                            await asyncio.sleep(0.5)  # the event store does not answer
                        for m in page:
                            sub.cursor = max(sub.cursor, m.position or 0)
                            yield m
                        continue
                for m in backlog or ():
                    if (m.position or 0) > sub.cursor:
                        sub.cursor = m.position or sub.cursor
                        yield m
                backlog = None
                while sub.queue:
                    m = sub.queue.popleft()
                    if m.position is not None:
                        if m.position <= sub.cursor:
                            continue
                        sub.cursor = m.position
                    yield m
                if sub.live:
                    sub.wake.clear()
                    if not sub.queue:
                        await sub.wake.wait()
        finally:
            with self._lock:
                self._subscribers.discard(sub)

    def _from_log(self, after: int) -> list[Message]:
        """The messages of a page of the log after ``after``, up to the window's floor."""
        if self.store is None or self.projector is None:
            return []
        with self._lock:
            floor = self.floor
        notifications = [n for n in self.store.select_notifications(after, PAGE)
                         if n.id <= floor]
        messages = self.messages_of(notifications)
        if notifications and (not messages or messages[-1].position != notifications[-1].id):
            # events that change no read model: a message without changes moves the cursor
            messages.append(Message(CHANGE, dumps({
                "position": notifications[-1].id, "changes": []}), notifications[-1].id))
        return messages
