"""Projectors that scale out through Kafka: the members of a consumer group share the partitions.

Each member reads the relay's topics (``infra.kafka_consumer``) and applies a poll's records
with the same SQL as the log projector, in one read-model transaction that also stores the next
offset of every partition it touched (``kafka_consumer_offsets``). A member that crashes or
loses a partition leaves offsets and rows that agree, and whoever gets the partition resumes at
the stored offset: nothing is skipped. Nothing is applied twice either: the relay delivers at
least once, and every statement is guarded by the row's ``last_position`` (see
``projections.projector``), so a duplicate, or a record applied by two members around a
rebalance, changes nothing.

Kafka orders events per partition only, so the read models may be ahead of the global log in
places. The position the queries see (``projection_positions``) is therefore a low-water mark:
the highest relay watermark (``kafka_relay_watermarks``: a log position and, per partition, the
offset after the last record the relay had published up to it) whose offsets every partition
of the group has consumed. Everything at or below it is in the read models; what is above it
is merged from the journal by the smart queries, as with the log projector.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import orjson
from sqlalchemy import Connection, Engine, delete, select, update

from infra.event_store import EventStore
from infra.kafka_consumer import EventConsumer, EventRecord, Partition
from infra.kafka_records import kafka_topic
from infra.kafka_relay_tables import build_relay_positions, build_relay_watermarks
from infra.read_model_db import insert_missing, write_transaction
from infra.settings import Settings
from infra.worker import retry_delay
from projections.projector import MAIN, Projector
from projections.rows import Op, execute_ops
from projections.tables import build_consumer_offsets

log = logging.getLogger("obsledger.kafka_projector")

#: Watermarks examined per transaction (the low-water mark advances by at most this many).
WATERMARK_WINDOW = 5000


class KafkaProjector(Projector):
    """One member of the projector group (``OBSLEDGER_KAFKA_CONSUMER_GROUP``)."""

    def __init__(self, store: EventStore, engine: Engine, settings: Settings) -> None:
        self.settings = settings
        self.group = settings.kafka_consumer_group
        self.relay_name = settings.kafka_topic_prefix
        self.offsets = build_consumer_offsets()
        self.watermarks = build_relay_watermarks()
        self.relay_positions = build_relay_positions()
        self.member = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.assigned: list[Partition] = []
        self.applied_records = 0
        self.malformed_records = 0
        self._consumer: EventConsumer | None = None
        self._assign_error: Exception | None = None
        super().__init__(store, engine, settings.projection_page_size,
                         settings.projection_poll_s)
        aggregate_types = sorted({name.partition(".")[0] for name in self._ops.handlers})
        self.topics = [kafka_topic(self.relay_name, a) for a in aggregate_types]

    # -- schema --------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        with self.engine.begin() as conn:
            self.offsets.create(conn, checkfirst=True)
            self.watermarks.create(conn, checkfirst=True)
            self.relay_positions.create(conn, checkfirst=True)

    # -- running -------------------------------------------------------------------------
    def start(self) -> None:
        t = threading.Thread(target=self.run_forever, name="kafka-projector", daemon=True)
        t.start()
        self._threads.append(t)

    def stop(self) -> None:
        super().stop()
        self._close_consumer()

    def run_forever(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                self.project_once()
                self.last_error = None
                failures = 0
            except Exception as e:  # broker or read-model database down: rejoin, resume
                failures += 1
                self.last_error = f"{type(e).__name__}: {e}"
                log.warning("Kafka projection failed, rejoining: %s", self.last_error)
                self._close_consumer()
                self._stop.wait(retry_delay(failures, self.settings.relay_retry_max_s))

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def _consumer_now(self) -> EventConsumer:
        if self._consumer is None:
            self._consumer = EventConsumer(self.settings, self.topics, self.group, self.member,
                                           self._stored_offsets)
        return self._consumer

    def _close_consumer(self) -> None:
        consumer, self._consumer = self._consumer, None
        self.assigned = []
        if consumer is not None:
            consumer.close()

    # -- one poll ------------------------------------------------------------------------
    def project_once(self) -> int:
        """Apply one poll's records and advance the low-water mark; return the record count."""
        consumer = self._consumer_now()
        records = consumer.poll(self.poll_interval)
        if self._assign_error is not None:  # offsets unreadable: the seek did not happen
            error, self._assign_error = self._assign_error, None
            raise error
        self.assigned = consumer.assignment()
        with write_transaction(self.engine) as conn:
            if records:
                self._apply_records(conn, records)
            mark = self._low_water_mark(conn)
        self.applied_records += len(records)
        self.malformed_records += sum(1 for r in records if r.notification is None)
        self._advance(mark)
        return len(records)

    def _apply_records(self, conn: Connection, records: list[EventRecord]) -> None:
        decode = self.store.decode
        ops = self._ops

        def gen() -> Iterator[Op]:
            for r in records:
                if r.notification is not None:
                    yield from ops.ops(decode(r.notification), r.notification.id)

        execute_ops(conn, gen())
        ends: dict[Partition, int] = {}
        for r in records:
            key = (r.topic, r.partition)
            ends[key] = max(ends.get(key, 0), r.offset + 1)
        now = datetime.now(UTC)
        o = self.offsets
        for (topic, partition), next_offset in ends.items():
            where = (o.c.group_id == self.group, o.c.topic == topic, o.c.partition == partition)
            moved = conn.execute(update(o).where(*where, o.c.next_offset < next_offset).values(
                next_offset=next_offset, member=self.member, updated_at=now)).rowcount
            if not moved:  # no row yet, or another member is already further
                insert_missing(conn, o, {
                    "group_id": self.group, "topic": topic, "partition": partition,
                    "next_offset": next_offset, "member": self.member, "updated_at": now})

    def _stored_offsets(self, partitions: list[Partition]) -> dict[Partition, int]:
        """Called on assignment: where each partition resumes; the rows record the owner."""
        try:
            now = datetime.now(UTC)
            o = self.offsets
            with write_transaction(self.engine) as conn:
                stored = {(t, p): int(n) for t, p, n in conn.execute(
                    select(o.c.topic, o.c.partition, o.c.next_offset)
                    .where(o.c.group_id == self.group))}
                for topic, partition in partitions:
                    if (topic, partition) in stored:
                        conn.execute(update(o).where(
                            o.c.group_id == self.group, o.c.topic == topic,
                            o.c.partition == partition).values(member=self.member,
                                                               updated_at=now))
                    else:
                        insert_missing(conn, o, {
                            "group_id": self.group, "topic": topic, "partition": partition,
                            "next_offset": 0, "member": self.member, "updated_at": now})
            return {p: stored.get(p, 0) for p in partitions}
        except Exception as e:  # raised from project_once: the consumer is rebuilt
            self._assign_error = e
            return {}

    def _low_water_mark(self, conn: Connection) -> int:
        """Advance ``projection_positions`` to the highest watermark the group has consumed."""
        p, w, o = self.positions, self.watermarks, self.offsets
        main = int(conn.execute(select(p.c.position).where(p.c.name == MAIN)).scalar_one())
        consumed = {(t, n): int(off) for t, n, off in conn.execute(
            select(o.c.topic, o.c.partition, o.c.next_offset).where(o.c.group_id == self.group))}
        topics = set(self.topics)

        def reached(partition_ends: str) -> bool:
            for key, end in orjson.loads(partition_ends).items():
                topic, _, partition = key.rpartition(":")
                if topic in topics and consumed.get((topic, int(partition)), 0) < end:
                    return False
            return True

        rows = conn.execute(
            select(w.c.position, w.c.partition_ends)
            .where(w.c.name == self.relay_name, w.c.position > main)
            .order_by(w.c.position).limit(WATERMARK_WINDOW)).all()
        lo, hi = 0, len(rows)  # offsets only grow with the position: the reached ones lead
        while lo < hi:
            mid = (lo + hi) // 2
            if reached(rows[mid][1]):
                lo = mid + 1
            else:
                hi = mid
        if lo == 0:
            return main
        mark = int(rows[lo - 1][0])
        if conn.execute(update(p).where(p.c.name == MAIN, p.c.position < mark).values(
                position=mark, updated_at=datetime.now(UTC))).rowcount:
            conn.execute(delete(w).where(w.c.name == self.relay_name, w.c.position < mark))
        return mark

    def relay_position(self) -> int:
        with self.engine.connect() as conn:
            row = conn.execute(select(self.relay_positions.c.position)
                               .where(self.relay_positions.c.name == self.relay_name)).first()
        return int(row[0]) if row else 0

    def catch_up(self, timeout: float = 60.0,
                 progress: Callable[[int], None] | None = None) -> int:
        """Project until the low-water mark reaches what the relay has published now;
        ``progress`` is told each position reached."""
        target = self.relay_position()
        deadline = time.monotonic() + timeout
        while self.position < target:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Kafka projector reached {self.position}, not {target}")
            self.project_once()
            if progress is not None:
                progress(self.position)
        return self.position
