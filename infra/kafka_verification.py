"""Reading Kafka back: whether each partition the relay wrote to still holds, just below
the end the relay recorded, the record the relay wrote there (``EventRelay.verify``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import (
    DuplicateSequenceNumberError,
    InvalidProducerEpochError,
    InvalidProducerIdMappingError,
    KafkaTimeoutError,
    OffsetOutOfRangeError,
    OutOfOrderSequenceNumberError,
    UnknownProducerIdError,
)

from infra.kafka_records import split_partition_key
from infra.settings import Settings

#: Producer errors that say the broker no longer has the producer's state or sequence: it
#: lost (or never kept) what it acknowledged.
SEQUENCE_ERRORS = (OutOfOrderSequenceNumberError, UnknownProducerIdError,
                   DuplicateSequenceNumberError, InvalidProducerEpochError,
                   InvalidProducerIdMappingError)


@dataclass(frozen=True, slots=True)
class PartitionCheck:
    """What reading a partition back showed: its end (high watermark) and whether the record
    just below the recorded end is the one the relay wrote there."""

    end: int
    tail_ok: bool


def read_back(settings: Settings, ends: dict[str, int], tails: dict[str, int],
              sent: int) -> dict[str, PartitionCheck]:
    """Read, on every partition the relay has written to, the record at its recorded end
    minus one (a missing topic reads as empty); ``tails``: the log position of each of those
    records, ``sent``: the relay's sent position. The end is the high watermark of the
    fetch responses: ListOffsets is not answered right by every Kafka-protocol broker."""
    wanted = {key: end for key, end in ends.items() if end > 0}
    if not wanted:
        return {}
    consumer = KafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap_servers,
        client_id="obsledger-relay-verify", group_id=None, enable_auto_commit=False,
        auto_offset_reset="none",  # an offset beyond the end raises: the log is shorter
        fetch_max_wait_ms=50, max_partition_fetch_bytes=64 * 1024,
        request_timeout_ms=10_000, bootstrap_timeout_ms=5_000)
    try:
        existing = consumer.topics()
        checks: dict[str, PartitionCheck] = {}
        parts: dict[TopicPartition, str] = {}
        for key in wanted:
            topic, partition = split_partition_key(key)
            if topic in existing:
                parts[TopicPartition(topic, partition)] = key
            else:  # the topic is gone: the broker lost everything in it
                checks[key] = PartitionCheck(0, True)
        if not parts:
            return checks
        consumer.assign(list(parts))
        for tp, key in parts.items():
            consumer.seek(tp, wanted[key] - 1)
        pending, from_start = set(parts), set()
        deadline = time.monotonic() + settings.relay_flush_timeout_s
        while pending:
            if time.monotonic() > deadline:
                raise KafkaTimeoutError(f"verification: {len(pending)} partitions did "
                                        "not answer")
            try:
                batches = consumer.poll(timeout_ms=200)
            except OffsetOutOfRangeError as e:  # below the recorded end: find the end
                out = e.args[0] if e.args and isinstance(e.args[0], dict) else pending
                for tp in out:
                    if tp in pending and tp not in from_start:
                        from_start.add(tp)
                        consumer.seek_to_beginning(tp)
                continue
            for tp, records in batches.items():
                key = parts[tp]
                if tp not in pending or tp in from_start:
                    continue
                for r in records:
                    if r.offset == wanted[key] - 1:
                        checks[key] = PartitionCheck(
                            max(consumer.highwater(tp) or 0, r.offset + 1),
                            is_tail(r, tails.get(key), sent))
                        pending.discard(tp)
                        consumer.pause(tp)
                        break
            for tp in list(pending):
                end = consumer.highwater(tp)
                if end is not None and (tp in from_start or end < wanted[parts[tp]]):
                    checks[parts[tp]] = PartitionCheck(end, True)
                    pending.discard(tp)
                    consumer.pause(tp)
        return checks
    finally:
        consumer.close()


def is_tail(record: Any, expected: int | None, sent: int) -> bool:
    """Whether ``record`` is the one the relay wrote there (its log position; without a
    recorded one, any record of an event the relay has sent, up to ``sent``)."""
    try:
        position = int(dict(record.headers)["log_position"])
    except (KeyError, ValueError, TypeError):
        return False
    return position == expected if expected is not None else position <= sent
