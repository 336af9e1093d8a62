"""Export the whole event log with its audit chain as JSON Lines, and import such a file into
an empty store, verifying the chain on the way in.

Format ``obsledger.export.v1``, one JSON object per line:

- header: ``{"format": "obsledger.export.v1", "hash": "sha256", "genesis": "000…"}``
- one line per stored event, in log order: ``{"position", "originator_id", "originator_version",
  "topic", "state" (the stored bytes, base64), "link"}`` — ``link`` is the audit chain link
  after this event (``infra.audit_chain``: sha256(previous link ‖ event hash)).
- trailer: ``{"trailer": true, "count": N, "last_position": P, "head": "<last link>"}``

Nothing in the file depends on when or from which database it was written, so export →
import into a fresh store → export gives the same bytes. Import keeps every event's log
position (explicit ids, sequence moved past them), so the chain recomputes identically.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any
from uuid import UUID

import orjson
from eventsourcing.persistence import Notification
from sqlalchemy import Engine, func, select

from infra.audit_chain import GENESIS, AnchorLog, build_chain_table, event_hash, next_link
from infra.event_store import EventStore

FORMAT = "obsledger.export.v1"

Progress = Callable[[int], None]


class ImportRefused(Exception):
    """The target is not empty (events, chain rows or anchors already there)."""


class BadExport(Exception):
    """A line of the file is malformed or breaks the chain; nothing was imported."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(f"line {line}: {message}")
        self.line = line
        self.message = message


@dataclass(frozen=True)
class Summary:
    count: int
    last_position: int
    head: str


def _line(obj: dict[str, Any]) -> bytes:
    return orjson.dumps(obj) + b"\n"


def export_log(store: EventStore, out: IO[bytes], page_size: int = 5000,
               progress: Progress | None = None) -> Summary:
    """Write the whole log (as of its head when each page is read) with the chain links."""
    out.write(_line({"format": FORMAT, "hash": "sha256", "genesis": GENESIS}))
    link, count, after = GENESIS, 0, 0
    while True:
        page = store.select_notifications(after, page_size)
        if not page:
            break
        lines = []
        for n in page:
            link = next_link(link, event_hash(n))
            lines.append(_line({
                "position": n.id, "originator_id": str(n.originator_id),
                "originator_version": n.originator_version, "topic": n.topic,
                "state": base64.b64encode(bytes(n.state)).decode(), "link": link}))
        out.write(b"".join(lines))
        count += len(page)
        after = page[-1].id
        if progress:
            progress(after)
    out.write(_line({"trailer": True, "count": count, "last_position": after, "head": link}))
    return Summary(count, after, link)


def _parse(lines: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any]]]:
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            raise BadExport(number, "empty line")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BadExport(number, f"not JSON ({e})") from e
        if not isinstance(obj, dict):
            raise BadExport(number, "not a JSON object")
        yield number, obj


def _event(number: int, obj: dict[str, Any]) -> Notification:
    try:
        return Notification(id=int(obj["position"]), originator_id=UUID(obj["originator_id"]),
                            originator_version=int(obj["originator_version"]),
                            topic=str(obj["topic"]),
                            state=base64.b64decode(obj["state"], validate=True))
    except (KeyError, ValueError, TypeError) as e:
        raise BadExport(number, f"not an event line ({e})") from e


def check_empty(store: EventStore, engine: Engine, anchors: AnchorLog) -> None:
    events = store.max_position()
    if events:
        raise ImportRefused(f"the event store is not empty (log head at position {events}); "
                            "import only into an empty store")
    chain = build_chain_table()
    with engine.begin() as conn:
        chain.create(conn, checkfirst=True)
        rows = conn.execute(select(func.count()).select_from(chain)).scalar()
    if rows:
        raise ImportRefused(f"the audit_chain table already has {rows} rows; import only "
                            "into an empty store")
    if anchors.read():
        raise ImportRefused(f"the anchors file {anchors.path} already has anchors (of another "
                            "log); move it away first")


def import_log(store: EventStore, engine: Engine, anchors: AnchorLog, source: IO[bytes],
               batch: int = 2000, progress: Progress | None = None) -> Summary:
    """Load an export into an empty store, checking every link before anything is committed;
    the chain table gets the links and the anchors file the head. Raises ``ImportRefused``
    or ``BadExport`` (naming the first bad line); on either nothing is imported."""
    check_empty(store, engine, anchors)
    parsed = _parse(source)
    first = next(parsed, None)
    if first is None or first[1].get("format") != FORMAT:
        raise BadExport(1, f"not an {FORMAT} file (no header line)")
    if first[1].get("genesis", GENESIS) != GENESIS or first[1].get("hash") != "sha256":
        raise BadExport(1, "unknown chain (hash or genesis)")
    chain = build_chain_table()
    writer = _EventWriter(store)
    link, count, last = GENESIS, 0, 0
    trailer: tuple[int, dict[str, Any]] | None = None
    now = datetime.now(UTC)
    events: list[Notification] = []
    links: list[dict[str, Any]] = []
    with engine.begin() as conn, writer.transaction() as curs:
        writer.lock(curs)
        for number, obj in parsed:
            if trailer is not None:
                raise BadExport(number, "a line after the trailer")
            if obj.get("trailer") is True:
                trailer = (number, obj)
                continue
            n = _event(number, obj)
            if n.id <= last:
                raise BadExport(number, f"position {n.id} does not follow {last} "
                                "(reordered or duplicated)")
            digest = event_hash(n)
            link = next_link(link, digest)
            if obj.get("link") != link:
                raise BadExport(number, f"position {n.id}: the chain link does not match "
                                "(the event or its link was altered, or an event before it "
                                "was removed)")
            events.append(n)
            links.append({"position": n.id, "event_hash": digest, "link": link,
                          "chained_at": now})
            count, last = count + 1, n.id
            if len(events) >= batch:
                writer.insert(curs, events)
                conn.execute(chain.insert(), links)
                events, links = [], []
                if progress:
                    progress(last)
        if trailer is None:
            raise BadExport(count + 2, "no trailer line (the file is truncated)")
        number, t = trailer
        if (t.get("count"), t.get("last_position"), t.get("head")) != (count, last, link):
            raise BadExport(number, f"the trailer says {t.get('count')} events up to position "
                            f"{t.get('last_position')} with head {t.get('head')}; the file "
                            f"has {count} up to {last} with head {link}")
        if events:
            writer.insert(curs, events)
            conn.execute(chain.insert(), links)
        writer.finish(curs, last)
        if progress:
            progress(last)
    if count:
        anchors.append(last, link)
    return Summary(count, last, link)


class _EventWriter:
    """Inserts stored events with their original log positions."""

    def __init__(self, store: EventStore) -> None:
        self.store = store
        self.recorder = store.recorder
        table = self.recorder.events_table_name
        if store.kind == "sqlite":
            self.table = table
            self.sql = (f"INSERT INTO {table} (rowid, originator_id, originator_version, topic, "
                        "state) VALUES (?, ?, ?, ?, ?)")
        else:
            self.table = f'"{self.recorder.datastore.schema}"."{table}"'
            self.sql = (f"INSERT INTO {self.table} (notification_id, originator_id, "
                        "originator_version, topic, state) VALUES (%s, %s, %s, %s, %s)")

    def transaction(self) -> Any:
        return self.recorder.datastore.transaction(commit=True)

    def lock(self, curs: Any) -> None:
        """No one else writes during the import; the store is still empty under the lock."""
        if self.store.kind != "sqlite":
            curs.execute(f"LOCK TABLE {self.table} IN EXCLUSIVE MODE")
        curs.execute(f"SELECT 1 FROM {self.table} LIMIT 1")
        if curs.fetchone() is not None:
            raise ImportRefused("the event store is not empty; import only into an empty store")

    def insert(self, curs: Any, events: list[Notification]) -> None:
        sqlite = self.store.kind == "sqlite"
        rows: list[tuple[Any, ...]] = [
            (n.id, UUID(str(n.originator_id)).hex if sqlite else n.originator_id,
             n.originator_version, n.topic, n.state) for n in events]
        curs.executemany(self.sql, rows)

    def finish(self, curs: Any, last: int) -> None:
        """PostgreSQL: new events are numbered after the imported ones."""
        if self.store.kind != "sqlite" and last:
            curs.execute(f"SELECT setval(pg_get_serial_sequence('{self.table}', "
                         f"'notification_id'), %s)", (last,))
