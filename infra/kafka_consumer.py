"""Reading the relay's topics back: one member of a consumer group whose offsets the caller keeps,
and ``check-kafka`` (every record compared with the event log).

Kafka projectors (``projections.kafka_projector``) store the offsets of their partitions in the
read-model database, in the transaction that applies the records, so the group's offsets in
Kafka are never used: on every assignment the consumer seeks to the offsets the caller reads
from its own table. Records are turned back into the event store's ``Notification`` (position,
aggregate id and version, event topic and stored state), so the application's mapper decodes
them exactly as it decodes the log.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from eventsourcing.persistence import Notification
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import KafkaError

from infra.event_store import EventStore
from infra.kafka_records import (
    SCHEMA,
    all_topics,
    event_message,
    event_type_of,
    key_partition,
    message_digest,
    record_digest,
)
from infra.kafka_relay import ensure_topics, producer_config
from infra.prefetch import prefetched
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



# -- check-kafka: every topic read back and compared with the log ------------------------------
#: Examples of each topic's differences kept in the report.
EXAMPLES = 10
KINDS = ("missing", "mismatched", "out_of_order", "unknown", "malformed")


class KafkaCheckFailed(RuntimeError):
    """Kafka did not answer (or stopped answering) while the check read it."""


class _TopicReport:
    def __init__(self) -> None:
        self.partitions = 0
        self.events = 0  # stored events (up to the checked position) that belong here
        self.records = 0
        self.duplicates = 0
        self.counts = dict.fromkeys(KINDS, 0)
        self.examples: list[dict[str, Any]] = []

    def add(self, kind: str, example: dict[str, Any]) -> None:
        self.counts[kind] += 1
        if len(self.examples) < EXAMPLES:
            self.examples.append({"problem": kind, **example})

    def as_json(self) -> dict[str, Any]:
        return {"partitions": self.partitions, "events": self.events, "records": self.records,
                "duplicates": self.duplicates, **self.counts, "examples": self.examples}


class KafkaCheck:
    """``obsledger check-kafka``: read every record of the relay's topics and compare them
    with the event log up to ``through`` (the relay's sent position: later events may not be
    published yet).

    An event is *missing* when no faithful copy of it (the topic, key, value and headers the
    relay writes, on its key's partition) is in Kafka; *out of order* when copies exist but a
    consumer following the dedup rule of ``docs/KAFKA.md`` (apply a record when its version
    is the next one of its aggregate, skip it otherwise), reading the topic from the
    beginning, never applies it: every copy comes before an earlier event of its aggregate.
    A record is *mismatched* when it names a stored event but differs from it (or sits on
    another partition than its key's), *unknown* when it names no stored event, *malformed*
    when it is not an ``obsledger.event.v1`` record. ``repair()`` re-publishes, in log order,
    every event such a consumer does not get (missing or out of order: per aggregate, from
    the first it lacks to its last); a mismatched record cannot be taken back.

    Memory: ~11 bytes per log position up to ``through`` (a digest, a topic index, two
    flags), and one partition's aggregates at a time; the log is read a page at a time.
    """

    def __init__(self, store: EventStore, settings: Settings, through: int,
                 progress: Callable[..., None] | None = None,
                 records_progress: Callable[..., None] | None = None) -> None:
        self.store = store
        self.settings = settings
        self.prefix = settings.kafka_topic_prefix
        self.head = store.max_position()
        self.through = min(through, self.head)
        self.advance = progress or (lambda *_a, **_k: None)  # log positions read
        self.advance_records = records_progress or (lambda *_a, **_k: None)  # records read
        size = self.through + 1
        self.expected = np.zeros(size, dtype=np.uint64)  # each event's record digest; 0: none
        self.topic_index = np.zeros(size, dtype=np.uint8)
        self.present = np.zeros(size, dtype=np.bool_)  # a faithful copy is in Kafka
        self.delivered = np.zeros(size, dtype=np.bool_)  # a consumer following the rule has it
        self.topics = all_topics(self.prefix)
        self.reports = {t: _TopicReport() for t in self.topics}
        self.records = 0
        self._saved: dict[tuple[str, int, int], tuple[Any, Any, list[Any]]] = {}
        self._applied: dict[bytes, int] = {}  # the partition being read: aggregate → version

    def run(self) -> dict[str, Any]:
        self._read_log()
        self._read_kafka()
        return self.report()

    # -- 1. the log: what each record must be ----------------------------------------------
    def _pages(self, after: int, stop: int) -> Iterator[Sequence[Notification]]:
        while after < stop:
            page = [n for n in self.store.select_notifications(after, 5000) if n.id <= stop]
            if not page:
                return
            yield page
            after = page[-1].id

    def _read_log(self) -> None:
        index_of = {t: i for i, t in enumerate(self.topics)}
        for page in prefetched(self._pages(0, self.through)):
            for n in page:
                m = event_message(self.prefix, n)
                i = index_of.get(m.topic)
                if i is None:  # an aggregate type the relay's list lacks: read its topic too
                    i = index_of[m.topic] = len(self.topics)
                    self.topics.append(m.topic)
                    self.reports[m.topic] = _TopicReport()
                self.expected[n.id] = message_digest(m)
                self.topic_index[n.id] = i
                self.reports[m.topic].events += 1
            self.advance(page[-1].id)

    # -- 2. Kafka, one partition at a time ---------------------------------------------------
    def _read_kafka(self) -> None:
        try:
            consumer = KafkaConsumer(
                bootstrap_servers=self.settings.kafka_bootstrap_servers,
                client_id="obsledger-check-kafka", group_id=None, enable_auto_commit=False,
                # an empty partition answers within fetch_max_wait_ms: keep it short
                auto_offset_reset="earliest", fetch_max_wait_ms=10, max_poll_records=5000,
                request_timeout_ms=30_000, bootstrap_timeout_ms=10_000)
        except KafkaError as e:
            raise KafkaCheckFailed(f"Kafka does not answer: {type(e).__name__}: {e}") from e
        try:
            existing = consumer.topics()
            for topic in self.topics:
                if topic not in existing:  # every event of it is missing
                    continue
                partitions = sorted(consumer.partitions_for_topic(topic) or ())
                self.reports[topic].partitions = len(partitions)
                for partition in partitions:
                    self._applied.clear()
                    for r in _read_partition(consumer, TopicPartition(topic, partition)):
                        self._check(r, topic, partition, len(partitions))
        except KafkaError as e:
            raise KafkaCheckFailed(f"Kafka does not answer: {type(e).__name__}: {e}") from e
        finally:
            consumer.close()

    def _check(self, r: Any, topic: str, partition: int, partitions: int) -> None:
        self.records += 1
        if self.records % 5000 == 0:
            self.advance_records(self.records)
        report = self.reports[topic]
        report.records += 1
        where = {"partition": partition, "offset": r.offset}
        try:
            headers = dict(r.headers or ())
            position = int(headers["log_position"])
            version = int(headers["aggregate_version"])
        except (KeyError, ValueError, TypeError):
            try:  # headers gone or altered: the envelope may still name the event
                n = notification_of(r.value)
                position, version = n.id, n.originator_version
            except MalformedRecord as e:
                report.add("malformed", {**where, "error": str(e)})
                return
        if position > self.through:  # published after the checked position
            return
        if position <= 0 or self.expected[position] == 0:
            report.add("unknown", {**where, "position": position})
            return
        digest = record_digest(topic, r.key, r.value, r.headers or [])
        if digest != int(self.expected[position]) or r.key is None or \
                key_partition(r.key, partitions) != partition:
            report.add("mismatched", {**where, "position": position})
            if len(self._saved) < 1000:
                self._saved[(topic, partition, r.offset)] = (r.key, r.value,
                                                             list(r.headers or ()))
            return
        self.present[position] = True
        highest = self._applied.get(r.key, 0)
        if version == highest + 1:
            self._applied[r.key] = version
            self.delivered[position] = True
        elif version <= highest:
            report.duplicates += 1
        # else: ahead of an event of its aggregate not seen yet; a consumer skips it

    # -- 3. the report ---------------------------------------------------------------------
    def lacking(self) -> Any:
        """Positions of the stored events a consumer following the rule does not get."""
        return np.flatnonzero((self.expected != 0) & ~self.delivered)

    def report(self) -> dict[str, Any]:
        for p in self.lacking():
            p = int(p)
            kind = "out_of_order" if self.present[p] else "missing"
            report = self.reports[self.topics[int(self.topic_index[p])]]
            report.counts[kind] += 1
            if len(report.examples) < EXAMPLES:
                n = self._stored(p)
                report.examples.append({
                    "problem": kind, "position": p,
                    "aggregate_id": str(n.originator_id) if n else None,
                    "aggregate_version": n.originator_version if n else None,
                    "event_type": event_type_of(n.topic)[1] if n else None})
        self._explain_mismatches()
        totals = {k: sum(r.counts[k] for r in self.reports.values()) for k in KINDS}
        return {
            "ok": not any(totals.values()), "position": self.through, "head": self.head,
            "not_yet_published": self.head - self.through,
            "events": int(np.count_nonzero(self.expected)), "records": self.records,
            **totals, "duplicates": sum(r.duplicates for r in self.reports.values()),
            "topics": {t: r.as_json() for t, r in self.reports.items()
                       if r.events or r.records},
            "repaired": None,
        }

    def _stored(self, position: int) -> Notification | None:
        page = self.store.select_notifications(position - 1, 1)
        return page[0] if page and page[0].id == position else None

    def _explain_mismatches(self) -> None:
        """Say in the examples what differs from the stored event."""
        for topic, report in self.reports.items():
            for example in report.examples:
                if example["problem"] != "mismatched" or "differs" in example:
                    continue
                record = self._saved.get((topic, example["partition"], example["offset"]))
                n = self._stored(example["position"])
                if record is None or n is None:
                    continue
                key, value, headers = record
                m = event_message(self.prefix, n)
                example.update(
                    aggregate_id=str(n.originator_id), aggregate_version=n.originator_version,
                    differs=[name for name, same in (
                        ("topic", m.topic == topic), ("key", m.key == key),
                        ("value", m.value == value), ("headers", m.headers == headers),
                        ("partition", key is not None and key_partition(
                            key, report.partitions or 1) == example["partition"]),
                    ) if not same])

    # -- 4. repair -------------------------------------------------------------------------
    def repair(self) -> int:
        """Publish again, in log order, every event a consumer following the rule does not
        get; every record is acknowledged (acks=all) before this returns the count."""
        lacking = self.lacking()
        if not len(lacking):
            return 0
        wanted = set(lacking.tolist())
        try:
            ensure_topics(self.settings)
            producer = KafkaProducer(**{**producer_config(self.settings),
                                        "client_id": "obsledger-check-kafka"})
        except KafkaError as e:
            raise KafkaCheckFailed(f"Kafka does not answer: {type(e).__name__}: {e}") from e
        sent = 0
        counts: dict[str, int] = {}
        try:
            for page in self._pages(int(lacking[0]) - 1, int(lacking[-1])):
                futures = []
                for n in page:
                    if n.id not in wanted:
                        continue
                    m = event_message(self.prefix, n)
                    count = counts.get(m.topic)
                    if count is None:
                        count = counts[m.topic] = len(producer.partitions_for(m.topic))
                    futures.append(producer.send(m.topic, key=m.key, value=m.value,
                                                 headers=m.headers,
                                                 partition=key_partition(m.key, count)))
                producer.flush(timeout=self.settings.relay_flush_timeout_s)
                for f in futures:
                    f.get(timeout=0)
                sent += len(futures)
        except KafkaError as e:
            raise KafkaCheckFailed(f"re-publishing failed after {sent} events: "
                                   f"{type(e).__name__}: {e}") from e
        finally:
            producer.close(timeout=5)
        log.warning("check-kafka re-published %d events", sent)
        return sent


def _read_partition(consumer: KafkaConsumer, tp: TopicPartition,
                    idle_timeout_s: float = 30.0) -> Iterator[Any]:
    """Every record of ``tp`` from its beginning up to the end it had when reading began
    (the high watermark of the first fetch answer: ListOffsets is not answered right by
    every Kafka-protocol broker), in offset order."""
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    end: int | None = None
    last_progress = time.monotonic()
    while True:
        batches = consumer.poll(timeout_ms=10)  # (returns at once when records arrive)
        if end is None:
            end = consumer.highwater(tp)
        records = batches.get(tp, ())
        for record in records:
            if end is not None and record.offset >= end:
                return
            yield record
        if end is not None and consumer.position(tp) >= end:
            return
        now = time.monotonic()
        if records:
            last_progress = now
        elif now - last_progress > idle_timeout_s:
            raise KafkaCheckFailed(f"{tp.topic}[{tp.partition}]: no answer for "
                                   f"{idle_timeout_s:.0f}s")
