"""The API on a real HTTP server (uvicorn) in a thread of the test process, and a reader of
its live stream (server-sent events, parsed as a browser does)."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import uvicorn
from fastapi import FastAPI

from tests.support.processes import free_port, wait_for_port


class LiveServer:
    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on",
            # open streams end at once: in a thread uvicorn has no signal handler through
            # which sse-starlette would end them (as it does under `obsledger serve`)
            timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for_port(self.port, None)
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@dataclass
class Event:
    event: str
    id: str | None
    data: Any
    at: float  # time.monotonic() when it arrived


class StreamReader:
    """Reads ``GET /stream`` in a thread; ``events`` receives each message as it arrives."""

    def __init__(self, url: str, headers: dict[str, str],
                 params: dict[str, Any] | None = None) -> None:
        self.events: queue.Queue[Event] = queue.Queue()
        self.status: int | None = None
        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=None))
        self._url, self._headers, self._params = url, headers, params
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> StreamReader:
        self._thread.start()
        assert self._ready.wait(10), "the stream did not answer"
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._client.close()
        # a read blocked until the next message or ping ends when the server stops
        self._thread.join(timeout=0.5)

    def _run(self) -> None:
        try:
            with self._client.stream("GET", self._url, headers=self._headers,
                                     params=self._params) as r:
                self.status = r.status_code
                self._ready.set()
                event, ident, data = "message", None, []
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if line == "":
                        if data:
                            self.events.put(Event(event, ident, orjson.loads("\n".join(data)),
                                                  time.monotonic()))
                        event, ident, data = "message", None, []
                    elif line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("id:"):
                        ident = line[3:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
        except (httpx.HTTPError, RuntimeError):
            pass  # closed by __exit__
        finally:
            self._ready.set()

    def until(self, predicate: Any, timeout: float) -> Iterator[Event]:
        """Events as they arrive until one matches ``predicate`` (AssertionError after
        ``timeout`` seconds); yields every event read, the matching one last."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no matching stream event in time")
            try:
                e = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            yield e
            if predicate(e):
                return
