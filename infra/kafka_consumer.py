"""Reading the relay's topics back: one member of a consumer group whose offsets the caller keeps.

Kafka projectors (``projections.kafka_projector``) store the offsets of their partitions in the
read-model database, in the transaction that applies the records, so the group's offsets in
Kafka are never used: on every assignment the consumer seeks to the offsets the caller reads
from its own table. Records are turned back into the event store's ``Notification`` (position,
aggregate id and version, event topic and stored state), so the application's mapper decodes
them exactly as it decodes the log.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from eventsourcing.persistence import Notification
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener

from infra.kafka_relay import SCHEMA, ensure_topics
from infra.settings import Settings

log = logging.getLogger("obsledger.kafka_consumer")

Partition = tuple[str, int]  # (topic, partition)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One consumed record: where it was in Kafka, and the stored event it carries (None for
    a malformed record, which is skipped but still counts as consumed)."""

    topic: str
    partition: int
    offset: int
    notification: Notification | None


class MalformedRecord(ValueError):
    """A record on an obsledger topic that is not an ``obsledger.event.v1`` envelope."""


def notification_of(value: bytes | None) -> Notification:
    """The stored event inside a relay record (``docs/KAFKA.md``, schema v1)."""
    try:
        envelope = orjson.loads(value or b"")
        if envelope.get("schema") != SCHEMA:
            raise MalformedRecord(f"schema {envelope.get('schema')!r}, expected {SCHEMA}")
        return Notification(
            id=int(envelope["position"]),
            originator_id=uuid.UUID(envelope["aggregate_id"]),
            originator_version=int(envelope["aggregate_version"]),
            topic=str(envelope["event_topic"]),
            state=orjson.dumps(envelope["state"]),
        )
    except MalformedRecord:
        raise
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise MalformedRecord(f"not an obsledger event envelope: {e}") from e


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, feed: EventConsumer) -> None:
        self.feed = feed

    def on_partitions_revoked(self, revoked: Any) -> None:
        log.info("partitions revoked: %s", sorted((tp.topic, tp.partition) for tp in revoked))

    def on_partitions_assigned(self, assigned: Any) -> None:
        self.feed._seek_to_stored(list(assigned))


class EventConsumer:
    """A consumer-group member on ``topics``; ``stored_offsets`` says where each newly
    assigned partition resumes (the next offset to apply; 0 = the beginning)."""

    def __init__(self, settings: Settings, topics: Sequence[str], group_id: str,
                 client_id: str,
                 stored_offsets: Callable[[list[Partition]], dict[Partition, int]]) -> None:
        self.settings = settings
        self.topics = list(topics)
        self.stored_offsets = stored_offsets
        ensure_topics(settings)
        self._consumer = KafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap_servers,
            group_id=group_id,
            client_id=client_id,
            enable_auto_commit=False,  # the offsets live in the read-model database
            auto_offset_reset="earliest",
            max_poll_records=settings.projection_page_size,
            session_timeout_ms=10_000,
            heartbeat_interval_ms=1_000,
            request_timeout_ms=30_000,
            fetch_max_wait_ms=100,
            # a member that died is replaced within this (the rebalance timeout), not 5 min
            max_poll_interval_ms=30_000,
        )
        self._consumer.subscribe(topics=self.topics, listener=_Listener(self))

    def _seek_to_stored(self, assigned: list[TopicPartition]) -> None:
        offsets = self.stored_offsets([(tp.topic, tp.partition) for tp in assigned])
        for tp in assigned:
            self._consumer.seek(tp, offsets.get((tp.topic, tp.partition), 0))
        log.info("partitions assigned: %s", sorted(offsets.items()))

    def poll(self, timeout_s: float) -> list[EventRecord]:
        """The next records (at most ``projection_page_size``), oldest first per partition."""
        batches = self._consumer.poll(timeout_ms=int(timeout_s * 1000))
        records: list[EventRecord] = []
        for tp, batch in batches.items():
            for r in batch:
                n: Notification | None = None
                try:
                    n = notification_of(r.value)
                except MalformedRecord as e:  # skipped and logged, never applied
                    log.error("skipping %s[%d]@%d: %s", tp.topic, tp.partition, r.offset, e)
                records.append(EventRecord(tp.topic, tp.partition, r.offset, n))
        return records

    def assignment(self) -> list[Partition]:
        return sorted((tp.topic, tp.partition) for tp in self._consumer.assignment())

    def close(self) -> None:
        try:
            self._consumer.close(autocommit=False)
        except Exception as e:  # closing while the broker is gone
            log.debug("closing the consumer: %s", e)

