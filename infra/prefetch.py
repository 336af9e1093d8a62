"""Read ahead: the next page from a database while the current one is processed."""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def prefetched(pages: Iterator[T], depth: int = 2) -> Generator[T, None, None]:
    """``pages``, each fetched in a background thread while the previous one is processed
    (database waits overlap with the work on the page).

    Closing the returned generator (or exhausting it) stops the thread and waits for it, so
    no fetch outlives its consumer (a connection closed under a running fetch crashes
    SQLite); ``pages`` is closed in the thread that ran it."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for page in pages:
                if not put(("page", page)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer
            put(("error", e))
        finally:
            close = getattr(pages, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=run, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()
        thread.join()
