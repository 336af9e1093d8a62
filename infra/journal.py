"""The local command journal: where a critical command is durable before it is acknowledged.

SQLite in WAL mode with ``synchronous=FULL``: a commit returns only once it is on disk. Appends
from concurrent requests are group-committed: whoever arrives while a commit is in flight joins
the next one, so one fsync acknowledges many commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

ACCEPTED = "accepted"
APPLIED = "applied"
REJECTED = "rejected"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    command_id TEXT NOT NULL UNIQUE,
    command_type TEXT NOT NULL,
    payload BLOB NOT NULL,
    actor TEXT NOT NULL,
    correlation_id TEXT NOT NULL,
    request_hash TEXT NOT NULL,
    response BLOB NOT NULL,
    received_at TEXT NOT NULL,
    observed_at TEXT,
    status TEXT NOT NULL DEFAULT 'accepted',
    position INTEGER,
    reason TEXT,
    reason_code TEXT,
    reason_field TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL DEFAULT 0,
    first_deferred_at REAL,
    finished_at TEXT
);
CREATE INDEX IF NOT EXISTS commands_by_status ON commands (status, position, seq);
CREATE TABLE IF NOT EXISTS command_subjects (
    subject TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (subject, seq)
) WITHOUT ROWID;
"""

_COLUMNS = (
    "seq, command_id, command_type, payload, actor, correlation_id, request_hash, response, "
    "received_at, observed_at, status, position, reason, reason_code, reason_field, attempts, "
    "not_before, first_deferred_at, finished_at"
)
#: The columns ``JournalEntry.from_row`` reads, in order (other processes' journals too).
JOURNAL_COLUMNS = _COLUMNS


_INSERT_COMMANDS = (
    "INSERT INTO commands (command_id, command_type, payload, actor, correlation_id, "
    "request_hash, response, received_at, observed_at) VALUES "
)
_ROW_PLACEHOLDERS = "(?,?,?,?,?,?,?,?,?)"
_ON_CONFLICT = " ON CONFLICT(command_id) DO NOTHING"
_ROWS_PER_INSERT = 1000  # 9 parameters a row: well under SQLite's 32766


@dataclass(slots=True, kw_only=True)
class CommandRequest:
    """What a client asked (a command of a type, as an actor) and was answered."""

    command_id: str
    command_type: str
    payload: dict[str, Any]
    actor: str
    correlation_id: str
    request_hash: str
    response: dict[str, Any]


@dataclass(slots=True, kw_only=True)
class NewCommand(CommandRequest):
    """A validated command, with its pre-generated ids, about to be journaled."""

    subjects: list[str]
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    observed_at: datetime | None = None


def _insert_params(c: NewCommand) -> tuple[Any, ...]:
    return (
        c.command_id,
        c.command_type,
        orjson.dumps(c.payload),
        c.actor,
        c.correlation_id,
        c.request_hash,
        orjson.dumps(c.response),
        c.received_at.isoformat(),
        c.observed_at.isoformat() if c.observed_at else None,
    )


@dataclass(slots=True, kw_only=True)
class JournalEntry(CommandRequest):
    seq: int
    received_at: datetime
    observed_at: datetime | None
    status: str
    position: int | None
    reason: str | None
    reason_code: str | None
    reason_field: str | None
    attempts: int
    not_before: float
    first_deferred_at: float | None
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> JournalEntry:
        return cls(
            seq=row[0],
            command_id=row[1],
            command_type=row[2],
            payload=orjson.loads(row[3]),
            actor=row[4],
            correlation_id=row[5],
            request_hash=row[6],
            response=orjson.loads(row[7]),
            received_at=datetime.fromisoformat(row[8]),
            observed_at=datetime.fromisoformat(row[9]) if row[9] else None,
            status=row[10],
            position=row[11],
            reason=row[12],
            reason_code=row[13],
            reason_field=row[14],
            attempts=row[15],
            not_before=row[16],
            first_deferred_at=row[17],
            finished_at=datetime.fromisoformat(row[18]) if row[18] else None,
        )

    @property
    def is_final(self) -> bool:
        return self.status != ACCEPTED


@dataclass(slots=True)
class AppendResult:
    entry: JournalEntry
    created: bool  # False: the command id was journaled before (an idempotent repeat)


@dataclass(slots=True)
class Outcome:
    """What the dispatcher decided for one journaled command."""

    seq: int
    status: str  # applied | rejected | accepted (deferred)
    position: int | None = None
    reason: str | None = None
    reason_code: str | None = None
    reason_field: str | None = None
    not_before: float = 0.0
    first_deferred_at: float | None = None


class Journal:
    """Durable, ordered, idempotent store of accepted commands and their outcomes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._write_lock = threading.Lock()
        with self._conn() as conn:
            conn.executescript(_SCHEMA)
        # group commit state
        self._queue: list[tuple[NewCommand, asyncio.Future[AppendResult]]] = []
        self._queue_lock = threading.Lock()
        self._flushing = False
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal-writer")
        self._listeners: list[Any] = []
        self._outcome_waiters: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._waiters_lock = threading.Lock()

    # -- connections ---------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return conn

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def on_append(self, callback: Any) -> None:
        """Call ``callback()`` after every durable append (wakes the dispatcher)."""
        self._listeners.append(callback)

    # -- appending -----------------------------------------------------------------------
    async def append(self, command: NewCommand) -> AppendResult:
        """Journal ``command`` durably; return once it is on disk (group commit)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[AppendResult] = loop.create_future()
        with self._queue_lock:
            self._queue.append((command, fut))
            start = not self._flushing
            self._flushing = True
        if start:
            # Start the commit once this turn of the event loop has run: the appends of the
            # other requests ready now join it, instead of one commit each.
            loop.call_soon(self._writer.submit, self._flush_loop, loop)
        return await fut

    def append_sync(self, command: NewCommand) -> AppendResult:
        return self._write_batch([command])[0]

    def _flush_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        while True:
            with self._queue_lock:
                batch, self._queue = self._queue, []
                if not batch:
                    self._flushing = False
                    return
            try:
                results: list[AppendResult] | BaseException = self._write_batch(
                    [c for c, _ in batch]
                )
            except BaseException as e:  # delivered to every waiting request
                results = e
            # Resolve each future on its own loop: the batch may hold appends from another
            # event loop than the one that started this flush (e.g. successive asyncio.run).
            by_loop: dict[asyncio.AbstractEventLoop, list[int]] = {}
            for i, (_, f) in enumerate(batch):
                by_loop.setdefault(f.get_loop(), []).append(i)
            for waiting_loop, idx in by_loop.items():
                outcome = results if isinstance(results, BaseException) else [
                    results[i] for i in idx]
                # a closed loop: nobody waits for these any more
                with contextlib.suppress(RuntimeError):
                    waiting_loop.call_soon_threadsafe(_resolve, [batch[i][1] for i in idx],
                                                      outcome)

    def _write_batch(self, commands: list[NewCommand]) -> list[AppendResult]:
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                results = self._insert_batch(conn, commands)
                if results is None:
                    results = [self._insert_one(conn, c) for c in commands]
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        for listener in self._listeners:
            listener()
        return results

    def _insert_batch(self, conn: sqlite3.Connection,
                      commands: list[NewCommand]) -> list[AppendResult] | None:
        """Journal a batch of new commands with a few multi-row statements, or return None
        (having written nothing) when a command id repeats: the caller goes row by row.

        Every SQLite call releases and re-takes the GIL, which the event loop holds most of
        the time, so the number of calls per batch, not the rows, bounds the group commit.
        """
        ids = {c.command_id for c in commands}
        if len(ids) != len(commands):
            return None
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='commands'").fetchone()
        base = int(row[0]) if row else 0
        conn.execute("SAVEPOINT batch")
        params = [_insert_params(c) for c in commands]
        inserted, last = 0, None
        for i in range(0, len(params), _ROWS_PER_INSERT):
            chunk = params[i:i + _ROWS_PER_INSERT]
            cur = conn.execute(_INSERT_COMMANDS + ",".join([_ROW_PLACEHOLDERS] * len(chunk))
                               + _ON_CONFLICT, [v for p in chunk for v in p])
            inserted += cur.rowcount
            last = cur.lastrowid
        # Rows of one INSERT take consecutive seqs in VALUES order: base+1 .. base+n.
        if inserted != len(commands) or last != base + inserted:  # a command id repeats one
            conn.execute("ROLLBACK TO batch")                      # journaled before
            conn.execute("RELEASE batch")
            return None
        subjects = [v for i, c in enumerate(commands)
                    for s in c.subjects for v in (s, base + 1 + i)]
        step = 2 * _ROWS_PER_INSERT
        for i in range(0, len(subjects), step):
            pairs = subjects[i:i + step]
            conn.execute("INSERT OR IGNORE INTO command_subjects (subject, seq) VALUES "
                         + ",".join(["(?,?)"] * (len(pairs) // 2)), pairs)
        conn.execute("RELEASE batch")
        return [AppendResult(JournalEntry(
            seq=base + 1 + i, command_id=c.command_id, command_type=c.command_type,
            payload=c.payload, actor=c.actor, correlation_id=c.correlation_id,
            request_hash=c.request_hash, response=c.response, received_at=c.received_at,
            observed_at=c.observed_at, status=ACCEPTED, position=None, reason=None,
            reason_code=None, reason_field=None, attempts=0, not_before=0.0,
            first_deferred_at=None, finished_at=None), True) for i, c in enumerate(commands)]

    def _insert_one(self, conn: sqlite3.Connection, c: NewCommand) -> AppendResult:
        cur = conn.execute(_INSERT_COMMANDS + _ROW_PLACEHOLDERS + _ON_CONFLICT,
                           _insert_params(c))
        created = cur.rowcount == 1
        if created:
            seq = cur.lastrowid
            conn.executemany(
                "INSERT OR IGNORE INTO command_subjects (subject, seq) VALUES (?, ?)",
                [(s, seq) for s in c.subjects],
            )
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE command_id=?", (c.command_id,)
        ).fetchone()
        return AppendResult(JournalEntry.from_row(row), created)

    # -- the dispatcher's side -----------------------------------------------------------
    def next_pending(self, limit: int, now: float | None = None) -> list[JournalEntry]:
        """Accepted commands due now, oldest first."""
        now = time.time() if now is None else now
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM commands WHERE status='accepted' AND not_before<=? "
            "ORDER BY seq LIMIT ?",
            (now, limit),
        ).fetchall()
        return [JournalEntry.from_row(r) for r in rows]

    def record_outcomes(self, outcomes: Iterable[Outcome]) -> None:
        outcomes = list(outcomes)
        if not outcomes:
            return
        finished = datetime.now(UTC).isoformat()
        with self._write_lock:
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "UPDATE commands SET status=?, position=?, reason=?, reason_code=?, "
                    "reason_field=?, attempts=attempts+1, not_before=?, "
                    "first_deferred_at=COALESCE(first_deferred_at, ?), "
                    "finished_at=CASE WHEN ?='accepted' THEN NULL ELSE ? END "
                    "WHERE seq=? AND status='accepted'",
                    [
                        (
                            o.status, o.position, o.reason, o.reason_code, o.reason_field,
                            o.not_before, o.first_deferred_at, o.status, finished, o.seq,
                        )
                        for o in outcomes
                    ],
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        self._wake_outcome_waiters()

    # -- reading -------------------------------------------------------------------------
    def get(self, command_id: str) -> JournalEntry | None:
        row = self._conn().execute(
            f"SELECT {_COLUMNS} FROM commands WHERE command_id=?", (command_id,)
        ).fetchone()
        return JournalEntry.from_row(row) if row else None

    def unprojected(self, projected_position: int, subject: str | None = None,
                    command_types: Sequence[str] = ()) -> list[JournalEntry]:
        """Accepted commands, and applied ones the read models do not show yet, oldest first."""
        where = "(c.status='accepted' OR (c.status='applied' AND c.position>?))"
        params: list[Any] = [projected_position]
        if command_types:
            where += f" AND c.command_type IN ({','.join('?' * len(command_types))})"
            params.extend(command_types)
        if subject is not None:
            sql = (
                f"SELECT {', '.join('c.' + x.strip() for x in _COLUMNS.split(','))} "
                "FROM command_subjects s JOIN commands c ON c.seq=s.seq "
                f"WHERE s.subject=? AND {where} ORDER BY c.seq"
            )
            params.insert(0, subject)
        else:
            sql = f"SELECT {_COLUMNS} FROM commands c WHERE {where} ORDER BY c.seq"
        return [JournalEntry.from_row(r) for r in self._conn().execute(sql, params).fetchall()]

    def last_seq(self) -> int:
        """The sequence number of the newest journaled command (0: none)."""
        row = self._conn().execute("SELECT MAX(seq) FROM commands").fetchone()
        return int(row[0] or 0)

    def entries_after(self, seq: int, limit: int) -> list[JournalEntry]:
        """Commands journaled after ``seq``, oldest first (the live stream's acceptances)."""
        rows = self._conn().execute(
            f"SELECT {_COLUMNS} FROM commands WHERE seq>? ORDER BY seq LIMIT ?", (seq, limit)
        ).fetchall()
        return [JournalEntry.from_row(r) for r in rows]

    def outcomes_of(self, seqs: Sequence[int]) -> list[JournalEntry]:
        """The commands ``seqs`` that are no longer waiting (applied or rejected)."""
        out: list[JournalEntry] = []
        for i in range(0, len(seqs), 900):
            chunk = list(seqs[i:i + 900])
            out.extend(JournalEntry.from_row(r) for r in self._conn().execute(
                f"SELECT {_COLUMNS} FROM commands WHERE status!='accepted' AND seq IN "
                f"({','.join('?' * len(chunk))}) ORDER BY seq", chunk).fetchall())
        return out

    def depth(self) -> int:
        row = self._conn().execute(
            "SELECT COUNT(*) FROM commands WHERE status='accepted'"
        ).fetchone()
        return int(row[0])

    def oldest_pending_received_at(self) -> datetime | None:
        row = self._conn().execute(
            "SELECT received_at FROM commands WHERE status='accepted' ORDER BY seq LIMIT 1"
        ).fetchone()
        return datetime.fromisoformat(row[0]) if row else None

    def counts(self) -> dict[str, int]:
        rows = self._conn().execute(
            "SELECT status, COUNT(*) FROM commands GROUP BY status"
        ).fetchall()
        return {s: int(n) for s, n in rows}

    # -- waiting for an outcome (synchronous commands) ----------------------------------
    async def wait_outcome(self, command_id: str, timeout: float) -> JournalEntry | None:
        """Wait until the command is applied or rejected, at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ev = asyncio.Event()
        with self._waiters_lock:
            self._outcome_waiters.setdefault(command_id, []).append((loop, ev))
        try:
            while True:
                entry = self.get(command_id)
                if entry is None or entry.is_final:
                    return entry
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return entry
                ev.clear()
                # A dispatcher in another process cannot wake us: poll as well.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ev.wait(), min(remaining, 0.05))
        finally:
            with self._waiters_lock:
                waiters = self._outcome_waiters.get(command_id, [])
                if (loop, ev) in waiters:
                    waiters.remove((loop, ev))
                if not waiters:
                    self._outcome_waiters.pop(command_id, None)

    def _wake_outcome_waiters(self) -> None:
        with self._waiters_lock:
            waiters = [w for ws in self._outcome_waiters.values() for w in ws]
        for loop, ev in waiters:
            loop.call_soon_threadsafe(ev.set)


def _resolve(
    futures: list[asyncio.Future[AppendResult]], results: list[AppendResult] | BaseException
) -> None:
    for i, fut in enumerate(futures):
        if fut.done():
            continue
        if isinstance(results, BaseException):
            fut.set_exception(results)
        else:
            fut.set_result(results[i])
