"""Several API processes, one journal each, in one directory.

With ``OBSLEDGER_JOURNAL_SLOTS=true`` (``obsledger serve --workers N``, or replicas sharing a
data volume) a process does not open ``journal.sqlite3`` but claims a *slot*: the first
``journal-<n>.sqlite3`` whose ``journal-<n>.lock`` it can ``flock``. The kernel releases the
lock when the process dies (SIGKILL included), so a restarted process takes the slot back,
and a peer can adopt a slot whose owner is gone (``api/scaleout.py``).

``PeerJournals`` reads the other slots' journals (SQLite in WAL mode: readers never wait
for the writer): a repeated ``Idempotency-Key`` that another process journaled, and the
commands another process accepted and has not applied yet (per-aggregate order).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from infra.journal import JOURNAL_COLUMNS, JournalEntry

log = logging.getLogger("obsledger.journal")

#: How often the list of the directory's journals is read again.
PEERS_REFRESH_S = 1.0


def slot_path(base: Path, number: int) -> Path:
    """Slot ``number``'s journal beside ``base`` (``journal.sqlite3`` → ``journal-3.sqlite3``)."""
    return base.with_name(f"{base.stem}-{number}{base.suffix}")


def lock_path(journal: Path) -> Path:
    return journal.with_suffix(".lock")


def slot_journals(base: Path) -> list[Path]:
    """Every slot journal beside ``base``, by slot number."""
    pattern = re.compile(re.escape(base.stem) + r"-(\d+)" + re.escape(base.suffix) + "$")
    found = []
    if base.parent.is_dir():
        for p in base.parent.iterdir():
            m = pattern.match(p.name)
            if m:
                found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def try_lock(path: Path) -> int | None:
    """An exclusive ``flock`` on ``path`` (the open descriptor), or None when another open
    file holds it — in this process or another."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def unlock(fd: int) -> None:
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_UN)
    with contextlib.suppress(OSError):
        os.close(fd)


@dataclass
class JournalSlot:
    """The journal this process owns while it lives."""

    number: int
    path: Path
    _fd: int

    @classmethod
    def claim(cls, base: Path) -> JournalSlot:
        """The first free slot beside ``base`` (one whose owner died is free again)."""
        base.parent.mkdir(parents=True, exist_ok=True)
        n = 0
        while True:
            path = slot_path(base, n)
            fd = try_lock(lock_path(path))
            if fd is not None:
                log.info("journal slot %d: %s", n, path)
                return cls(n, path, fd)
            n += 1

    def release(self) -> None:
        unlock(self._fd)


class PeerJournals:
    """The journals of the other slots beside ``base`` (read only)."""

    def __init__(self, base: Path, own: Path) -> None:
        self.base = base
        self.own = own.resolve()
        self._lock = threading.Lock()
        self._conns: dict[Path, sqlite3.Connection] = {}
        self._listed = 0.0

    def _peers(self) -> list[sqlite3.Connection]:
        now = time.monotonic()
        if now - self._listed >= PEERS_REFRESH_S:
            self._listed = now
            for path in slot_journals(self.base):
                path = path.resolve()
                if path == self.own or path in self._conns:
                    continue
                conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                conn.execute("PRAGMA busy_timeout=5000")
                self._conns[path] = conn
        return list(self._conns.values())

    def _query(self, sql: str, params: Iterable[object]) -> list[tuple[object, ...]]:
        rows: list[tuple[object, ...]] = []
        args = list(params)
        with self._lock:
            for conn in self._peers():
                try:
                    rows.extend(conn.execute(sql, args).fetchall())
                except sqlite3.OperationalError as e:  # a journal being created: no rows yet
                    log.debug("peer journal not readable yet: %s", e)
        return rows

    def get(self, command_id: str) -> JournalEntry | None:
        """The command another process journaled under ``command_id``, if any."""
        rows = self._query(f"SELECT {JOURNAL_COLUMNS} FROM commands WHERE command_id=?",
                           (command_id,))
        return JournalEntry.from_row(rows[0]) if rows else None

    def earliest_pending(self, subjects: Iterable[str]) -> dict[str, datetime]:
        """Per subject, when the oldest command another process accepted and has not
        applied (or rejected) yet was received."""
        wanted = sorted(set(subjects))
        earliest: dict[str, datetime] = {}
        for i in range(0, len(wanted), 900):
            chunk = wanted[i:i + 900]
            rows = self._query(
                "SELECT s.subject, MIN(c.received_at) FROM command_subjects s "
                "JOIN commands c ON c.seq=s.seq WHERE c.status='accepted' AND s.subject IN "
                f"({','.join('?' * len(chunk))}) GROUP BY s.subject", chunk)
            for subject, received in rows:
                at = datetime.fromisoformat(str(received))
                key = str(subject)
                if key not in earliest or at < earliest[key]:
                    earliest[key] = at
        return earliest

    def depth(self) -> int:
        """Commands the other journals hold that are not applied or rejected yet."""
        return sum(int(str(r[0])) for r in self._query(
            "SELECT COUNT(*) FROM commands WHERE status='accepted'", ()))

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()
