"""Tamper evidence for the event log: a hash chain kept beside it, and anchors kept outside.

Each stored event's canonical bytes (position, aggregate id, version, topic, stored state) are
hashed; each link is sha256(previous link + that hash), starting from 64 zeros. The chain
keeper appends links for new events to ``audit_chain`` (read-model database) and, every
``OBSLEDGER_AUDIT_ANCHOR_EVERY`` events, writes the head (position, link) to an append-only
anchors file (fsynced) and, with Kafka, to the ``<prefix>.audit_anchors`` topic.

``verify`` recomputes everything from the event store and reports the first position where a
stored event was modified, deleted, inserted or reordered — against the chain table, and
against the anchors, so rewriting both the events and the chain table is caught too.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import BigInteger, Column, DateTime, Engine, MetaData, String, Table, func, select

from infra.event_store import EventStore
from infra.prefetch import prefetched
from infra.worker import LogFollower

log = logging.getLogger("obsledger.audit")

GENESIS = "0" * 64


def build_chain_table(md: MetaData | None = None) -> Table:
    return Table(
        "audit_chain", md or MetaData(),
        Column("position", BigInteger, primary_key=True),
        Column("event_hash", String(64), nullable=False),
        Column("link", String(64), nullable=False),
        Column("chained_at", DateTime(timezone=True), nullable=False),
    )


def event_hash(n: Any) -> str:
    """sha256 of a stored event's canonical bytes."""
    h = hashlib.sha256()
    h.update(f"{n.id}\x00{n.originator_id}\x00{n.originator_version}\x00{n.topic}\x00"
             .encode())
    h.update(bytes(n.state))
    return h.hexdigest()


def next_link(link: str, digest: str) -> str:
    return hashlib.sha256(bytes.fromhex(link) + bytes.fromhex(digest)).hexdigest()


@dataclass(frozen=True)
class Finding:
    """The first problem ``verify`` found."""

    position: int
    kind: str  # modified | deleted | inserted | anchor-mismatch | chain-missing
    detail: str


@dataclass
class Verification:
    events: int = 0
    chained_head: int = 0
    anchors_checked: int = 0
    finding: Finding | None = None

    @property
    def ok(self) -> bool:
        return self.finding is None

    def as_json(self) -> dict[str, Any]:
        """The report ``obsledger verify`` prints and ``GET /audit/verify`` returns."""
        return {"ok": self.ok, "events": self.events, "chained_head": self.chained_head,
                "anchors_checked": self.anchors_checked,
                "finding": None if self.finding is None else {
                    "position": self.finding.position, "kind": self.finding.kind,
                    "detail": self.finding.detail}}


class AnchorLog:
    """The append-only anchors file: one JSON line per anchor, fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, position: int, link: str) -> dict[str, Any]:
        anchor = {"position": position, "link": link,
                  "anchored_at": datetime.now(UTC).isoformat()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, orjson.dumps(anchor) + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return anchor

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().splitlines():
            if line.strip():
                out.append(orjson.loads(line))
        return out


class ChainKeeper(LogFollower):
    """Extends the chain over new events; anchors its head now and then."""

    name = "audit-chain"

    def __init__(self, store: EventStore, engine: Engine, anchors: AnchorLog,
                 anchor_every: int = 10_000, page_size: int = 5000,
                 publish: Callable[[dict[str, Any]], None] | None = None,
                 interval: float = 1.0) -> None:
        self.table = build_chain_table()
        super().__init__(store, engine, self.table, page_size, interval)
        self.anchors = anchors
        self.anchor_every = anchor_every
        self.publish = publish
        self.position, self.link = self._head()
        last = self.anchors.read()
        self._anchored = int(last[-1]["position"]) if last else 0

    def read_position(self) -> int:
        """The last chained position as recorded (by this or another keeper process)."""
        t = self.table
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.max(t.c.position))).scalar() or 0)

    def _head(self) -> tuple[int, str]:
        t = self.table
        with self.engine.connect() as conn:
            row = conn.execute(select(t.c.position, t.c.link)
                               .order_by(t.c.position.desc()).limit(1)).first()
        return (int(row[0]), str(row[1])) if row else (0, GENESIS)

    def extend_once(self) -> int:
        """Chain the next page of events; return how many."""
        notifications = self.store.select_notifications(self.position, self.page_size)
        if not notifications:
            return 0
        rows = []
        link = self.link
        now = datetime.now(UTC)
        for n in notifications:
            digest = event_hash(n)
            link = next_link(link, digest)
            rows.append({"position": n.id, "event_hash": digest, "link": link,
                         "chained_at": now})
        with self.engine.begin() as conn:
            conn.execute(self.table.insert(), rows)
        self.position, self.link = notifications[-1].id, link
        if self.position - self._anchored >= self.anchor_every:
            self.anchor()
        return len(notifications)

    def anchor(self) -> dict[str, Any] | None:
        """Write the chain head outside the database (file, and Kafka when configured)."""
        if self.position == 0 or self.position == self._anchored:
            return None
        anchor = self.anchors.append(self.position, self.link)
        self._anchored = self.position
        if self.publish is not None:
            try:
                self.publish(anchor)
            except Exception as e:  # the file has it; Kafka gets the next one
                log.warning("anchor not published to Kafka: %s", e)
        return anchor

    def catch_up(self) -> int:
        while self.extend_once():
            pass
        self.anchor()
        return self.position

    def once(self) -> int:
        return self.extend_once()


def verify(store: EventStore, engine: Engine, anchors: AnchorLog, page_size: int = 5000,
           progress: Callable[[int], None] | None = None) -> Verification:
    """Recompute the chain from the event store; compare with the chain table and anchors."""
    table = build_chain_table()
    result = Verification()
    anchor_at = {int(a["position"]): str(a["link"]) for a in anchors.read()}
    with engine.connect() as conn:
        head = conn.execute(select(table.c.position).order_by(table.c.position.desc())
                            .limit(1)).scalar()
    result.chained_head = int(head or 0)

    def chain_pages() -> Iterator[list[tuple[int, str, str]]]:
        after = 0
        mark = "?" if engine.dialect.name == "sqlite" else "%s"
        sql = (f"SELECT position, event_hash, link FROM {table.name} WHERE position > {mark} "
               f"ORDER BY position LIMIT {int(page_size)}")
        raw = engine.raw_connection()  # plain tuples: no SQLAlchemy row processing
        try:
            while True:
                cur = raw.cursor()
                cur.execute(sql, (after,))
                rows = [(int(r[0]), str(r[1]), str(r[2])) for r in cur.fetchall()]
                cur.close()
                raw.commit()
                if not rows:
                    return
                yield rows
                after = rows[-1][0]
        finally:
            raw.close()

    def event_pages() -> Iterator[Sequence[Any]]:
        after = 0
        while True:
            page = store.select_notifications(after, page_size)
            if not page:
                return
            yield page
            after = page[-1].id

    def chain_rows() -> Generator[tuple[int, str, str], None, None]:
        with closing(prefetched(chain_pages())) as pages:
            for rows in pages:
                yield from rows

    def events() -> Generator[Any, None, None]:
        with closing(prefetched(event_pages())) as pages:
            for page in pages:
                yield from page
                if progress:
                    progress(page[-1].id)

    with closing(chain_rows()) as chained, closing(events()) as logged:
        return _verify(result, chained, logged, anchor_at)


def _verify(result: Verification, chained: Iterator[tuple[int, str, str]],
            events: Iterator[Any], anchor_at: dict[int, str]) -> Verification:
    expected = next(chained, None)
    checked: set[int] = set()
    link = GENESIS
    last_anchor = max(anchor_at) if anchor_at else 0
    if last_anchor > result.chained_head:
        result.finding = Finding(last_anchor, "chain-missing",
                                 f"an anchor names position {last_anchor} but the chain table "
                                 f"ends at {result.chained_head}")
        return result
    for n in events:
        result.events += 1
        if expected is None:  # beyond the chain head: not chained yet (the keeper lags)
            if n.id <= result.chained_head:
                result.finding = Finding(n.id, "inserted", "an event the chain never saw")
                return result
            continue
        if n.id > expected[0]:
            result.finding = Finding(expected[0], "deleted",
                                     f"the chain has position {expected[0]}; the log does not")
            return result
        if n.id < expected[0]:
            result.finding = Finding(n.id, "inserted", "an event the chain never saw")
            return result
        digest = event_hash(n)
        link = next_link(link, digest)
        if digest != expected[1] or link != expected[2]:
            result.finding = Finding(n.id, "modified",
                                     "the stored event (or the chain row) does not match "
                                     "its chained hash")
            return result
        if n.id in anchor_at:
            checked.add(n.id)
            result.anchors_checked += 1
            if anchor_at[n.id] != link:
                result.finding = Finding(n.id, "anchor-mismatch",
                                         "the recomputed chain differs from the anchor "
                                         "written outside the database")
                return result
        expected = next(chained, None)
    if expected is not None:
        result.finding = Finding(expected[0], "deleted",
                                 f"the chain has position {expected[0]}; the log does not")
        return result
    unchecked = sorted(p for p in anchor_at if p not in checked)
    if unchecked:  # an anchored event is gone, though chain and log agree: both rewritten
        result.finding = Finding(unchecked[0], "deleted",
                                 f"an anchor names position {unchecked[0]}; the log does not")
    return result
