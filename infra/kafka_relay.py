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

An acknowledgement is not a proof that Kafka still holds a record: a broker restarted on a log
it had not synced (or a memory-only broker) loses acknowledged records, and later records take
their offsets. So the relay verifies (``EventRelay.verify``): at start, after any failure and
every ``relay_verify_s``, it reads back, on every partition it has written to, the record just
below the end it recorded and checks it is the one it wrote there. A partition that ends below
that, or holds another record there, a record acknowledged at an offset below a recorded end,
and the producer's sequence errors (``OutOfOrderSequenceNumberError`` and kin) all mean the
broker lost data: the relay rewinds to the last watermark whose offsets the broker still holds
and re-publishes everything after it (duplicates are allowed by the contract, gaps are not).
What was last proven present is the *verified* position, beside the *sent* (acknowledged and
recorded) one. ``obsledger check-kafka`` (``infra.kafka_consumer.check_kafka``) reads every
record back and compares it with the log.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError
from sqlalchemy import Connection, Engine, delete, insert, select, update

from infra.event_store import EventStore
from infra.kafka_records import all_topics, event_message, key_partition, partition_key
from infra.kafka_relay_tables import (
    WATERMARKS_KEPT,
    build_relay_positions,
    build_relay_verification,
    build_relay_watermarks,
)
from infra.kafka_verification import SEQUENCE_ERRORS, read_back
from infra.read_model_db import insert_missing
from infra.settings import Settings
from infra.worker import PollingWorker, retry_delay

log = logging.getLogger("obsledger.relay")


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


class EventRelay(PollingWorker):
    """Publishes the notification log to Kafka; one per deployment (or per target cluster)."""

    name = "kafka-relay"
    join_timeout = 30.0

    def __init__(self, store: EventStore, engine: Engine, settings: Settings) -> None:
        if not settings.kafka_bootstrap:
            raise ValueError("OBSLEDGER_KAFKA_BOOTSTRAP is not set")
        super().__init__(settings.relay_poll_s)
        self.store = store
        self.engine = engine
        self.settings = settings
        self.prefix = settings.kafka_topic_prefix
        self.batch_size = settings.relay_batch_size
        self.positions = build_relay_positions()
        self.watermarks = build_relay_watermarks()
        self.verification = build_relay_verification()
        self.relay_name = self.prefix  # its rows in the relay's tables
        self.partition_ends: dict[str, int] = {}
        # per partition, the log position of the record at partition_ends - 1
        self.partition_tails: dict[str, int] = {}
        self._recorded = 0
        self.position = 0  # sent: acknowledged and recorded
        self.verified_position = 0  # proven present in Kafka when last verified
        self.verified_at: datetime | None = None
        self.data_losses = 0
        self.last_loss: dict[str, Any] | None = None
        self.sequence_errors = 0
        self.published = 0
        self.broker_reachable: bool | None = None
        self._producer: KafkaProducer | None = None
        self._topics_ready = False
        self._verify_due = True  # before the first send: the broker may have lost data since
        self._verify_reason = "verification at start"
        self._next_verify = 0.0
        self._idle_probe = 0.0
        self._failures = 0
        self.setup()

    # -- position ------------------------------------------------------------------------
    def setup(self) -> None:
        with self.engine.begin() as conn:
            self.positions.create(conn, checkfirst=True)
            self.watermarks.create(conn, checkfirst=True)
            self.verification.create(conn, checkfirst=True)
            row = conn.execute(select(self.positions.c.position)
                               .where(self.positions.c.name == self.relay_name)).first()
            if row is None:
                insert_missing(conn, self.positions, {
                    "name": self.relay_name, "position": 0, "updated_at": datetime.now(UTC)})
            self.position = int(row[0]) if row else 0
            last = conn.execute(
                select(self.watermarks.c.partition_ends)
                .where(self.watermarks.c.name == self.relay_name)
                .order_by(self.watermarks.c.position.desc()).limit(1)).first()
            self.partition_ends = orjson.loads(last[0]) if last else {}
            v = self.verification.c
            checked = conn.execute(select(v.partition_tails, v.verified_position, v.verified_at,
                                          v.data_losses, v.last_loss)
                                   .where(v.name == self.relay_name)).first()
            if checked is None:
                insert_missing(conn, self.verification, {
                    "name": self.relay_name, "partition_tails": "{}", "verified_position": 0,
                    "verified_at": None, "data_losses": 0, "last_loss": None})
            else:
                self.partition_tails = orjson.loads(checked[0])
                self.verified_position = int(checked[1])
                self.verified_at = checked[2]
                self.data_losses = int(checked[3])
                self.last_loss = orjson.loads(checked[4]) if checked[4] else None

    def _record(self, position: int, partition_ends: dict[str, int],
                partition_tails: dict[str, int]) -> None:
        """The batch up to ``position`` is acknowledged: its position and watermark, at once."""
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            self._write_position(conn, position, partition_ends, partition_tails, now)
            self._recorded += 1
            if self._recorded % 100 == 0:
                self._prune_watermarks(conn)
        self.position = position
        self.partition_ends = partition_ends
        self.partition_tails = partition_tails

    def _write_position(self, conn: Connection, position: int, partition_ends: dict[str, int],
                        partition_tails: dict[str, int], now: datetime) -> None:
        conn.execute(update(self.positions).where(self.positions.c.name == self.relay_name)
                     .values(position=position, updated_at=now))
        # a relay set back to re-publish (or a new cluster under the same name) replaces
        # the watermarks it passes again; the older ones stay true, the new ones too
        conn.execute(delete(self.watermarks).where(self.watermarks.c.name == self.relay_name,
                                                   self.watermarks.c.position >= position))
        conn.execute(insert(self.watermarks).values(
            name=self.relay_name, position=position, recorded_at=now,
            partition_ends=orjson.dumps(partition_ends, option=orjson.OPT_SORT_KEYS)
            .decode()))
        conn.execute(update(self.verification).where(self.verification.c.name == self.relay_name)
                     .values(partition_tails=orjson.dumps(
                         partition_tails, option=orjson.OPT_SORT_KEYS).decode()))

    def _prune_watermarks(self, conn: Connection) -> None:
        w = self.watermarks
        oldest_kept = (select(w.c.position).where(w.c.name == self.relay_name)
                       .order_by(w.c.position.desc()).offset(WATERMARKS_KEPT).limit(1)
                       .scalar_subquery())
        conn.execute(delete(w).where(w.c.name == self.relay_name, w.c.position < oldest_kept))

    def read_position(self) -> int:
        """The published position as recorded (by this or another relay process)."""
        with self.engine.connect() as conn:
            row = conn.execute(select(self.positions.c.position)
                               .where(self.positions.c.name == self.relay_name)).first()
        return int(row[0]) if row else 0

    def read_state(self) -> dict[str, Any]:
        """Sent and verified positions, and the broker data losses detected, as recorded (by
        this or another relay process): what ``/health`` and ``/metrics`` show."""
        v = self.verification.c
        with self.engine.connect() as conn:
            sent = conn.execute(select(self.positions.c.position)
                                .where(self.positions.c.name == self.relay_name)).scalar()
            row = conn.execute(select(v.verified_position, v.verified_at, v.data_losses,
                                      v.last_loss).where(v.name == self.relay_name)).first()
        verified_at = row[1] if row else None
        if verified_at is not None and verified_at.tzinfo is None:  # SQLite
            verified_at = verified_at.replace(tzinfo=UTC)
        return {
            "sent_position": int(sent or 0),
            "verified_position": int(row[0]) if row else 0,
            "verified_at": verified_at,
            "data_losses": int(row[2]) if row else 0,
            "last_loss": orjson.loads(row[3]) if row and row[3] else None,
        }

    # -- running -------------------------------------------------------------------------
    def once(self) -> int:
        return self.relay_once()

    def idle_timeout(self) -> float:
        now = time.monotonic()
        if now - self._idle_probe > 5.0:  # notice an outage while there is nothing to send
            self._idle_probe = now
            self.broker_reachable = broker_reachable(self.settings.kafka_bootstrap_servers)
        return max(0.0, min(self.interval, self._next_verify - now))

    def stop(self) -> None:
        super().stop()
        self._close_producer(timeout=5)

    def failed(self, error: Exception) -> None:
        """Broker or store down: back off, then re-send from the recorded position."""
        self._failures += 1
        self.last_error = f"{type(error).__name__}: {error}"
        if isinstance(error, KafkaError):
            self.broker_reachable = False
        # before sending again, prove that Kafka still holds what was recorded
        self._verify_due = True
        self._verify_reason = f"verification after {type(error).__name__}"
        if isinstance(error, SEQUENCE_ERRORS):
            self.sequence_errors += 1
            log.error("the broker refused the producer's sequence (%s): it may have lost "
                      "acknowledged records; verifying before re-sending", self.last_error)
        # drop whatever is buffered: the batch is re-sent, in order, from the recorded position
        self._close_producer(timeout=0)
        delay = retry_delay(self._failures, self.settings.relay_retry_max_s)
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
        """Publish the next batch and record its last position; return how many were sent
        (verifying first when due: at start, after a failure, every ``relay_verify_s``)."""
        if self._verify_due or time.monotonic() >= self._next_verify:
            self.verify(reason=self._verify_reason if self._verify_due else "verification")
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
        recorded = self.partition_ends
        ends = dict(recorded)
        tails = dict(self.partition_tails)
        reused: dict[str, int] = {}
        for n, f in zip(notifications, futures, strict=True):
            meta = f.get(timeout=0)  # raises the delivery error of any record of the batch
            key = partition_key(meta.topic, meta.partition)
            if meta.offset < recorded.get(key, 0):  # acknowledged before, for another record
                reused[key] = min(meta.offset, reused.get(key, meta.offset))
            if meta.offset + 1 > ends.get(key, 0):
                ends[key] = meta.offset + 1
                tails[key] = n.id
        if reused:  # the broker lost the records it had at those offsets
            self.verify(known_ends=reused, reason="offsets acknowledged before were "
                        "given to new records")
            return len(notifications)
        self._record(notifications[-1].id, ends, tails)
        self.published += len(notifications)
        self.broker_reachable = True
        self.last_error = None
        self._failures = 0
        return len(notifications)

    # -- verification ----------------------------------------------------------------------
    def verify(self, known_ends: dict[str, int] | None = None,
               reason: str = "verification") -> bool:
        """Prove that every partition still holds what the relay recorded: it ends at or
        beyond the recorded end and the record just below that end is the one written there.
        True: the recorded position is now the verified one. False: the broker lost data (or
        ``known_ends`` says so), and the relay went back to re-publish what it may have lost.
        Raises when the broker does not answer (the caller retries)."""
        position = self.position
        ends = dict(self.partition_ends)
        checks = read_back(self.settings, ends, self.partition_tails, position)
        lost = {key: c.end if c.tail_ok else 0 for key, c in checks.items()
                if c.end < ends[key] or not c.tail_ok}
        for key, end in (known_ends or {}).items():
            lost[key] = min(end, lost.get(key, end))
        if lost:
            self._rewind(position, ends, lost, reason)
            return False
        now = datetime.now(UTC)
        with self.engine.begin() as conn:
            conn.execute(update(self.verification)
                         .where(self.verification.c.name == self.relay_name)
                         .values(verified_position=position, verified_at=now))
        self.verified_position, self.verified_at = position, now
        self._verify_due = False
        self._next_verify = time.monotonic() + self.settings.relay_verify_s
        return True

    def _rewind(self, position: int, ends: dict[str, int], lost: dict[str, int],
                reason: str) -> None:
        """Go back to the last watermark whose offsets the broker still holds on the
        partitions that lost records, and re-publish everything after it."""
        w = self.watermarks
        target, base = 0, None
        with self.engine.connect() as conn:
            for wm_position, wm_ends in conn.execute(
                    select(w.c.position, w.c.partition_ends)
                    .where(w.c.name == self.relay_name, w.c.position <= position)
                    .order_by(w.c.position.desc())).yield_per(500):
                found = orjson.loads(wm_ends)
                if all(found.get(key, 0) <= end for key, end in lost.items()):
                    target, base = int(wm_position), found
                    break
        new_ends = {**ends, **lost}
        tails = {k: v for k, v in self.partition_tails.items() if k not in lost}
        now = datetime.now(UTC)
        loss = {
            "detected_at": now.isoformat(), "reason": reason,
            "partitions": {key: {"recorded_end": ends.get(key, 0), "found_end": end}
                           for key, end in sorted(lost.items())},
            "sent_position": position, "rewound_to": target,
            "watermark_found": base is not None,
        }
        with self.engine.begin() as conn:
            self._write_position(conn, target, new_ends, tails, now)
            conn.execute(update(self.verification)
                         .where(self.verification.c.name == self.relay_name)
                         .values(verified_position=target, verified_at=now,
                                 data_losses=self.verification.c.data_losses + 1,
                                 last_loss=orjson.dumps(loss).decode()))
        log.error("Kafka lost records it had acknowledged (%s) on %s: re-publishing from log "
                  "position %d (sent up to %d)", reason,
                  ", ".join(f"{k} ends at {e}, recorded {ends.get(k, 0)}"
                            for k, e in sorted(lost.items())), target, position)
        self.position, self.partition_ends, self.partition_tails = target, new_ends, tails
        self.verified_position, self.verified_at = target, now
        self.data_losses += 1
        self.last_loss = loss
        self._topics_ready = False  # a broker that lost its log may have lost the topics
        self._close_producer(timeout=0)
        self._verify_due = False
        self._next_verify = time.monotonic() + self.settings.relay_verify_s

    def catch_up(self, timeout: float = 60.0) -> int:
        """Publish up to the log's head as it is now, and verify it (tests, command line)."""
        deadline = time.monotonic() + timeout
        while True:
            while self.relay_once():
                if time.monotonic() > deadline:
                    raise TimeoutError("the relay did not catch up in time")
            if self.verify():
                return self.position
            if time.monotonic() > deadline:
                raise TimeoutError("the relay did not catch up in time")

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
