"""Which of several API processes runs the workers there must be one of (projector, relay,
audit chain, results automation, downloader, processing worker).

On PostgreSQL: a session-level advisory lock, held on a connection of its own; when the
process dies (or its connection does) PostgreSQL releases it and another process takes it.
On SQLite (one machine): an ``flock`` on ``<data_dir>/leader.lock``.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import psycopg

from infra.journal_slots import try_lock, unlock
from infra.settings import Settings

log = logging.getLogger("obsledger.leader")

#: The advisory lock's key (any bigint: "obsledge" as bytes).
LEADER_LOCK_KEY = int.from_bytes(b"obsledge", "big") & 0x7FFF_FFFF_FFFF_FFFF


class LeaderUnknown(Exception):
    """The lock's keeper (PostgreSQL) does not answer: who leads cannot be told now."""


class Leadership:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._conn: psycopg.Connection[Any] | None = None
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock if nobody holds it; True when this process holds it (now or
        already), False when another does. ``LeaderUnknown`` when PostgreSQL does not
        answer."""
        if self.settings.store != "postgres":
            if self._fd is None:
                self._fd = try_lock(self.settings.data_dir / "leader.lock")
            return self._fd is not None
        if self.held():
            return True
        s = self.settings
        try:
            conn = psycopg.connect(host=s.postgres_host, port=s.postgres_port,
                                   user=s.postgres_user, password=s.postgres_password or None,
                                   dbname=s.postgres_dbname, autocommit=True,
                                   connect_timeout=s.postgres_connect_timeout,
                                   application_name="obsledger-leader")
        except psycopg.Error as e:
            raise LeaderUnknown(str(e)) from e
        try:
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (LEADER_LOCK_KEY,)).fetchone()
        except psycopg.Error as e:
            with contextlib.suppress(psycopg.Error):
                conn.close()
            raise LeaderUnknown(str(e)) from e
        if row is not None and row[0]:
            self._conn = conn
            return True
        conn.close()
        return False

    def held(self) -> bool:
        """Whether this process still holds the lock (on PostgreSQL: its connection
        answers)."""
        if self.settings.store != "postgres":
            return self._fd is not None
        if self._conn is None:
            return False
        try:
            self._conn.execute("SELECT 1")
            return True
        except psycopg.Error as e:
            log.warning("leader lock connection lost: %s", e)
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
            return False

    def release(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
        if self._fd is not None:
            unlock(self._fd)
            self._fd = None
