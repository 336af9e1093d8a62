"""Heartbeat files: how a process without HTTP (``obsledger project``, ``relay``, ``worker``…)
tells a container healthcheck that it is alive.

The process's main thread, which otherwise only waits for SIGTERM, rewrites
``<data_dir>/heartbeats/<command>.json`` every ``HEARTBEAT_INTERVAL_S`` (atomically: a reader
never sees half a file) with the state of every thread its worker started. ``obsledger probe
<command>`` reads it and fails when the file is missing, older than ``max_age_s`` (the process
is gone or its main thread hangs), or one of those threads has ended. It does not tell whether
the worker makes progress (a thread stuck in a call is alive): the lag metrics and their alerts
say that.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import orjson

HEARTBEAT_INTERVAL_S = 5.0
#: How old a heartbeat may be before the probe calls the process unhealthy.
HEARTBEAT_MAX_AGE_S = 30.0


def heartbeat_path(data_dir: Path, command: str) -> Path:
    return data_dir / "heartbeats" / f"{command}.json"


class Heartbeat:
    """Writes the heartbeat of one process: ``threads`` are its worker's threads."""

    def __init__(self, path: Path, command: str, threads: Iterable[threading.Thread],
                 worker: Any = None) -> None:
        self.path = path
        self.command = command
        self.threads = list(threads)
        self.worker = worker

    def beat(self) -> None:
        last_error = getattr(self.worker, "last_error", None)
        state = {"command": self.command, "pid": os.getpid(), "at": time.time(),
                 "threads": {t.name: t.is_alive() for t in self.threads},
                 "last_error": last_error if isinstance(last_error, str) else None}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(orjson.dumps(state))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def check_heartbeat(path: Path, max_age_s: float = HEARTBEAT_MAX_AGE_S,
                    now: float | None = None) -> tuple[bool, str]:
    """(healthy, one line saying why) for the heartbeat at ``path``."""
    try:
        state = orjson.loads(path.read_bytes())
        at = float(state["at"])
        threads: dict[str, bool] = dict(state["threads"])
    except FileNotFoundError:
        return False, f"no heartbeat at {path} (the process is not running, or not yet)"
    except (OSError, ValueError, KeyError, TypeError, orjson.JSONDecodeError) as e:
        return False, f"unreadable heartbeat {path}: {e}"
    age = (time.time() if now is None else now) - at
    if age > max_age_s:
        return False, f"heartbeat {age:.0f}s old (more than {max_age_s:.0f}s): the process " \
                      f"{state.get('pid')} is gone or hangs"
    dead = sorted(name for name, alive in threads.items() if not alive)
    if dead:
        return False, f"thread(s) {', '.join(dead)} of process {state.get('pid')} ended"
    if not threads:
        return False, f"process {state.get('pid')} runs no worker thread"
    note = f"; last error: {state['last_error']}" if state.get("last_error") else ""
    return True, f"ok: process {state.get('pid')}, threads {', '.join(sorted(threads))} " \
                 f"alive, heartbeat {age:.1f}s old{note}"
