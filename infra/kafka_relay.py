"""The Kafka relay: every stored event published to Kafka, in log order, exactly as stored.

The relay tails the event store's notification log. Each event goes to the topic of its
aggregate type (``obsledger.executed_obs_unit`` …), keyed by the aggregate id so one
aggregate's events stay in order on one partition. The value is the event as JSON
(``obsledger.event.v1``, documented in ``docs/KAFKA.md``): the stored state, byte for byte,
inside an envelope that names the event. The last published log position is recorded in the
read-model database after each flushed batch (``acks=all``), so a restarted relay resumes
there: delivery is at-least-once and duplicates are confined to the batch in flight.

A broker outage never blocks commands: the dispatcher keeps applying them to the event store,
the relay backs off and retries, and catches up when the broker returns.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    Text,
    delete,
    insert,
    select,
    update,
)

from infra.event_store import EventStore
from infra.read_model_db import insert_missing
from infra.settings import Settings

log = logging.getLogger("obsledger.relay")

SCHEMA = "obsledger.event.v1"

#: Aggregate types whose events are published (the class name in the stored event topic).
AGGREGATE_TYPES = ("ExecutedObsUnit", "RawDataFile", "RawDataPackage", "StagingRequest",
                   "ObservationResult", "CommandReceipt", "DownloadJob", "ProcessingJob",
                   "DataProduct")

_CAMEL = re.compile(r"(?<!^)(?=[A-Z])")


@functools.cache
def snake(name: str) -> str:
    return _CAMEL.sub("_", name).lower()


@functools.cache
def kafka_topic(prefix: str, aggregate_type: str) -> str:
    """``obsledger`` + ``ExecutedObsUnit`` → ``obsledger.executed_obs_unit``."""
    return f"{prefix}.{snake(aggregate_type)}"


def all_topics(prefix: str) -> list[str]:
    return [kafka_topic(prefix, a) for a in AGGREGATE_TYPES]


@functools.cache
def event_type_of(stored_topic: str) -> tuple[str, str]:
    """``domain.obs_units:ExecutedObsUnit.Started`` → (``ExecutedObsUnit``,
    ``ExecutedObsUnit.Started``)."""
    qualname = stored_topic.rpartition(":")[2]
    return qualname.partition(".")[0], qualname


@dataclass(frozen=True, slots=True)
class EventMessage:
    """One stored event as a Kafka record."""

    topic: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]
    position: int


def event_message(prefix: str, n: Any) -> EventMessage:
    """The Kafka record for a stored notification (see ``docs/KAFKA.md``)."""
    aggregate_type, event_type = event_type_of(n.topic)
    state = bytes(n.state)
    fields = orjson.loads(state)
    aggregate_id = str(n.originator_id)
    envelope = orjson.dumps({
        "schema": SCHEMA,
        "position": n.id,
        "aggregate_type": snake(aggregate_type),
        "aggregate_id": aggregate_id,
        "aggregate_version": n.originator_version,
        "event_type": event_type,
        "event_topic": n.topic,
        "state": orjson.Fragment(state),
    })
    headers = [
        ("schema", SCHEMA.encode()),
        ("event_type", event_type.encode()),
        ("aggregate_version", str(n.originator_version).encode()),
        ("log_position", str(n.id).encode()),
    ]
    for name in ("command_id", "correlation_id", "actor"):
        value = fields.get(name)
        if value is not None:
            headers.append((name, str(value).encode()))
    return EventMessage(kafka_topic(prefix, aggregate_type), aggregate_id.encode(), envelope,
                        headers, n.id)


def murmur2(data: bytes) -> int:
    """Kafka's key hash (the Java client's ``Utils.murmur2``), a word at a time: the same value
    as kafka-python's byte-by-byte ``murmur2``, several times faster."""
    m, length = 0x5BD1E995, len(data)
    h = 0x9747B28C ^ length
    words = length // 4
    for k in struct.unpack_from(f"<{words}I", data):
        k = (k * m) & 0xFFFFFFFF
        k ^= k >> 24
        h = ((h * m) & 0xFFFFFFFF) ^ ((k * m) & 0xFFFFFFFF)
    tail = data[words * 4:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if tail:
        h ^= tail[0]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


def key_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner picks for ``key`` (Java and kafka-python)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def build_relay_positions(md: MetaData | None = None) -> Table:
    """The last log position each relay has published (and flushed, acks=all)."""
    return Table(
        "kafka_relay_positions", md or MetaData(),
        Column("name", String(200), primary_key=True),
        Column("position", BigInteger, nullable=False),
        Column("updated_at", DateTime(timezone=True), nullable=False),
    )


def build_relay_watermarks(md: MetaData | None = None) -> Table:
    """After each flushed batch: the batch's last log position and, for every partition the
    relay has written to, the offset after its last acknowledged record (JSON
    ``{"<topic>:<partition>": next_offset}``). A consumer that has consumed up to those offsets
    has seen every event at or below the position: Kafka projectors derive the position up to
    which the read models are complete from it."""
    return Table(
        "kafka_relay_watermarks", md or MetaData(),
        Column("name", String(200), primary_key=True),
        Column("position", BigInteger, primary_key=True),
        Column("partition_ends", Text, nullable=False),
        Column("recorded_at", DateTime(timezone=True), nullable=False),
    )


#: Watermarks the relay keeps when no Kafka projector prunes them (one per flushed batch).
WATERMARKS_KEPT = 10_000


def partition_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def producer_config(settings: Settings) -> dict[str, Any]:
    """What the relay's producer needs for ordered, acknowledged delivery."""
    return {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "client_id": "obsledger-relay",
        "acks": "all",
        # one request in flight per broker: a failed request is never overtaken by the next,
        # so each partition holds the log's order (the relay re-sends the batch on failure)
        "max_in_flight_requests_per_connection": 1,
        "linger_ms": 10,
        "batch_size": 256 * 1024,
        "max_request_size": 16 * 1024 * 1024,
        "request_timeout_ms": 10_000,
        "max_block_ms": 10_000,
        "retries": 3,
        "retry_backoff_ms": 200,
    }


def ensure_topics(settings: Settings) -> list[str]:
    """Create the relay's topics that are missing, with the configured partition count."""
    topics = all_topics(settings.kafka_topic_prefix)
    admin = KafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers,
                             client_id="obsledger-admin", request_timeout_ms=10_000)
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            # another relay or projector may have created them first
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([
                    NewTopic(t, num_partitions=settings.kafka_partitions,
                             replication_factor=settings.kafka_replication_factor)
                    for t in missing])
        return missing
    finally:
        admin.close()


def broker_reachable(bootstrap_servers: Sequence[str], timeout: float = 0.5) -> bool:
    """Whether one bootstrap broker accepts a connection now."""
    for server in bootstrap_servers:
        host, _, port = server.rpartition(":")
        try:
            with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout):
                return True
        except OSError:
            continue
    return False


class EventRelay:
    """Publishes the notification log to Kafka; one per deployment (or per target cluster)."""

    def __init__(self, store: EventStore, engine: Engine, settings: Settings) -> None:
        if not settings.kafka_bootstrap:
            raise ValueError("OBSLEDGER_KAFKA_BOOTSTRAP is not set")
        self.store = store
        self.engine = engine
        self.settings = settings
        self.prefix = settings.kafka_topic_prefix
        self.batch_size = settings.relay_batch_size
        self.positions = build_relay_positions()
        self.watermarks = build_relay_watermarks()
        self.name = self.prefix
        self.partition_ends: dict[str, int] = {}
        self._recorded = 0
        self.position = 0
        self.published = 0
        self.broker_reachable: bool | None = None
        self.last_error: str | None = None
        self._producer: KafkaProducer | None = None
        self._topics_ready = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self.setup()

    # -- position ------------------------------------------------------------------------
    def setup(self) -> None:
        with self.engine.begin() as conn:
            self.positions.create(conn, checkfirst=True)
            self.watermarks.create(conn, checkfirst=True)
            row = conn.execute(select(self.positions.c.position)
                               .where(self.positions.c.name == self.name)).first()
            if row is None:
                insert_missing(conn, self.positions, {
                    "name": self.name, "position": 0, "updated_at": datetime.now(UTC)})
            self.position = int(row[0]) if row else 0
            last = conn.execute(
                select(self.watermarks.c.partition_ends)
                .where(self.watermarks.c.name == self.name)
                .order_by(self.watermarks.c.position.desc()).limit(1)).first()
            self.partition_ends = orjson.loads(last[0]) if last else {}

    def _record(self, position: int, partition_ends: dict[str, int]) -> None:
        """The batch up to ``position`` is acknowledged: its position and watermark, at once."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(update(self.positions).where(self.positions.c.name == self.name)
                         .values(position=position, updated_at=now))
            # a relay set back to re-publish (or a new cluster under the same name) replaces
            # the watermarks it passes again; the older ones stay true, the new ones too
            conn.execute(delete(self.watermarks).where(self.watermarks.c.name == self.name,
                                                       self.watermarks.c.position >= position))
            conn.execute(insert(self.watermarks).values(
                name=self.name, position=position, recorded_at=now,
                partition_ends=orjson.dumps(partition_ends, option=orjson.OPT_SORT_KEYS)
                .decode()))
            self._recorded += 1
            if self._recorded % 100 == 0:
                self._prune_watermarks(conn)
        self.position = position
        self.partition_ends = partition_ends

    def _prune_watermarks(self, conn: Connection) -> None:
        w = self.watermarks
        oldest_kept = (select(w.c.position).where(w.c.name == self.name)
                       .order_by(w.c.position.desc()).offset(WATERMARKS_KEPT).limit(1)
                       .scalar_subquery())
        conn.execute(delete(w).where(w.c.name == self.name, w.c.position < oldest_kept))

    def read_position(self) -> int:
        """The published position as recorded (by this or another relay process)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(self.positions.c.position)
                               .where(self.positions.c.name == self.name)).first()
        return int(row[0]) if row else 0

    # -- running -------------------------------------------------------------------------
    def wake(self, _position: int | None = None) -> None:
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run_forever, name="kafka-relay",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._close_producer(timeout=5)

    def run_forever(self) -> None:
        idle_probe = 0.0
        while not self._stop.is_set():
            try:
                n = self.relay_once()
            except Exception as e:  # broker or store down: back off, re-send from position
                self._failed(e)
                continue
            if n == 0:
                now = time.monotonic()
                if now - idle_probe > 5.0:  # notice an outage while there is nothing to send
                    idle_probe = now
                    self.broker_reachable = broker_reachable(
                        self.settings.kafka_bootstrap_servers)
                self._wake.wait(self.settings.relay_poll_s)
                self._wake.clear()

    def _failed(self, error: Exception) -> None:
        self._failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if isinstance(error, KafkaError):
            self.broker_reachable = False
        # drop whatever is buffered: the batch is re-sent, in order, from the recorded position
        self._close_producer(timeout=0)
        delay = min(self.settings.relay_retry_max_s, 0.2 * 2 ** min(self._failures, 8))
        log.warning("relay failed (%s), retrying in %.1fs", self.last_error, delay)
        self._stop.wait(delay * random.uniform(0.5, 1.0))

    def _producer_now(self) -> KafkaProducer:
        if self._producer is None:
            if not self._topics_ready:
                ensure_topics(self.settings)
                self._topics_ready = True
            self._producer = KafkaProducer(**producer_config(self.settings))
        return self._producer

    def _close_producer(self, timeout: float) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.close(timeout=timeout, null_logger=True)
            except Exception as e:  # closing a producer whose broker is gone
                log.debug("closing the producer: %s", e)

    def relay_once(self) -> int:
        """Publish the next batch and record its last position; return how many were sent."""
        notifications = self.store.select_notifications(self.position, self.batch_size)
        if not notifications:
            return 0
        producer = self._producer_now()
        futures = []
        counts: dict[str, int] = {}  # partitions per topic, from the producer's metadata
        for n in notifications:
            m = event_message(self.prefix, n)
            count = counts.get(m.topic)
            if count is None:
                count = counts[m.topic] = len(producer.partitions_for(m.topic))
            # the default partitioner's choice, computed here: it is the costliest step of send
            futures.append(producer.send(m.topic, key=m.key, value=m.value, headers=m.headers,
                                         partition=key_partition(m.key, count)))
        producer.flush(timeout=self.settings.relay_flush_timeout_s)
        ends = dict(self.partition_ends)
        for f in futures:
            meta = f.get(timeout=0)  # raises the delivery error of any record of the batch
            key = partition_key(meta.topic, meta.partition)
            if meta.offset + 1 > ends.get(key, 0):
                ends[key] = meta.offset + 1
        self._record(notifications[-1].id, ends)
        self.published += len(notifications)
        self.broker_reachable = True
        self.last_error = None
        self._failures = 0
        return len(notifications)

    def catch_up(self, timeout: float = 60.0) -> int:
        """Publish up to the log's head as it is now (tests, command line)."""
        deadline = time.monotonic() + timeout
        while self.relay_once():
            if time.monotonic() > deadline:
                raise TimeoutError("the relay did not catch up in time")
        return self.position

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


class AnchorPublisher:
    """Publishes audit-chain anchors to ``<prefix>.audit_anchors`` (one partition, acks=all)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.topic = f"{settings.kafka_topic_prefix}.audit_anchors"
        self._producer: KafkaProducer | None = None

    def __call__(self, anchor: dict[str, Any]) -> None:
        if self._producer is None:
            admin = KafkaAdminClient(bootstrap_servers=self.settings.kafka_bootstrap_servers,
                                     client_id="obsledger-admin", request_timeout_ms=10_000)
            try:
                if self.topic not in set(admin.list_topics()):
                    with contextlib.suppress(TopicAlreadyExistsError):
                        admin.create_topics([NewTopic(
                            self.topic, num_partitions=1,
                            replication_factor=self.settings.kafka_replication_factor)])
            finally:
                admin.close()
            self._producer = KafkaProducer(**{**producer_config(self.settings),
                                              "client_id": "obsledger-anchors"})
        self._producer.send(self.topic, value=orjson.dumps(anchor)).get(timeout=10)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.close(timeout=5)
