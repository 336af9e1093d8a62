"""The relay's Kafka records: one topic per aggregate type, the event envelope and headers
(``obsledger.event.v1``, ``docs/KAFKA.md``), the digest ``check-kafka`` compares, and the
partition Kafka's default partitioner picks for a key."""

from __future__ import annotations

import functools
import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from infra.event_store import stored_fields

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
    fields = stored_fields(state)
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


def record_digest(topic: str, key: bytes | None, value: bytes | None,
                  headers: Sequence[tuple[str, bytes]]) -> int:
    """64 bits that change with the topic or any byte of a record's key, value or headers
    (``check-kafka`` compares what it reads with what the relay writes); never 0."""
    h = hashlib.blake2b(digest_size=8)
    for part in (topic.encode(), key or b"", value or b""):
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    for name, v in headers:
        raw = name.encode()
        h.update(len(raw).to_bytes(8, "little"))
        h.update(raw)
        h.update(len(v).to_bytes(8, "little"))
        h.update(v)
    return int.from_bytes(h.digest(), "little") or 1


def message_digest(m: EventMessage) -> int:
    return record_digest(m.topic, m.key, m.value, m.headers)


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


def partition_key(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def split_partition_key(key: str) -> tuple[str, int]:
    topic, _, partition = key.rpartition(":")
    return topic, int(partition)
