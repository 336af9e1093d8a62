"""Read ahead: the next page from a database while the current one is processed."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def prefetched(pages: Iterator[T], stop: threading.Event, depth: int = 2) -> Iterator[T]:
    """``pages``, each fetched in a background thread while the previous one is processed
    (database waits overlap with hashing); ``stop`` ends the thread early."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(depth)

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
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

    threading.Thread(target=run, name="prefetch", daemon=True).start()
    while True:
        kind, value = q.get()
        if kind == "end":
            return
        if kind == "error":
            raise value
        yield value
