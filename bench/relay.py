"""Kafka relay benchmarks (issue: Kafka), against a broker this script starts (noida-db from
PyPI, as the tests do) or ``--bootstrap host:port``, and a PostgreSQL event store.

1. ``relay_per_s``: the relay publishing a filled log (read the page, wrap each stored event,
   send with acks=all, flush, record the position), beside ``producer_per_s``: a plain
   kafka-python producer with the same settings sending the same serialized records in the
   same run, best of ``--rounds`` alternating rounds. ``relay_ratio`` = relay / producer
   (target >= 0.8). ``check_kafka_per_s``: ``obsledger check-kafka`` over what the last relay
   round published (the log read, then every record read back and compared), events per second.
2. ``e2e_p50_ms`` / ``e2e_p99_ms``: from an event's recorded timestamp (when the dispatcher
   applied its command) until a consumer reads it from Kafka, with the dispatcher and the
   relay running and start commands arriving at a steady ``--rate`` (500/s) (target p99 <= 250).

Usage: ``python -m bench.relay [--events N] [--rate R --seconds S] [--bootstrap H:P]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from commands.obs_units import ObsUnitCommand

# `python -m bench.x` puts bench/ on sys.path; the benchmarks import the project and bench.common
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench, bench_parser, drain_journal, fresh_settings, journal_commands, note


def start_requests(n: int) -> list[Any]:
    from commands.obs_units import StartExecutedObsUnitRequest

    now = datetime.now(UTC)
    return [StartExecutedObsUnitRequest(obs_unit_id=f"OU-{i % 97}", instrument="HARPS",
                                        start_time=now, metadata={"airmass": 1.12, "seq": i})
            for i in range(n)]


def measure_throughput(args: argparse.Namespace, settings: Any) -> None:
    from kafka import KafkaProducer

    from bootstrap.ledger import Ledger
    from infra.kafka_consumer import KafkaCheck
    from infra.kafka_records import event_message
    from infra.kafka_relay import EventRelay, ensure_topics, producer_config

    ledger = Ledger(settings, workers=False)
    published = settings
    relay_rates: list[float] = []
    plain_rates: list[float] = []
    try:
        n = args.events // 2  # each start command stores the unit's event and a receipt
        asyncio.run(journal_commands(ledger, ObsUnitCommand.EXECUTED_OBS_UNIT_START,
                                     start_requests(n)))
        drain_journal(ledger, n, "fill")
        assert ledger.store is not None
        events = list(ledger.store.select_notifications(0, 10 ** 9))
        note(f"log: {len(events)} events; relay batch {settings.relay_batch_size}, "
             f"{settings.kafka_partitions} partitions per topic, acks=all; best of "
             f"{args.rounds} rounds, relay and plain producer alternating, fresh topics each")
        for _ in range(args.rounds):
            # the relay: a fresh relay name (= topic prefix) publishes the whole log
            fresh = settings.model_copy(update={"kafka_topic_prefix": "relay" +
                                                uuid.uuid4().hex[:6]})
            ensure_topics(fresh)
            relay = EventRelay(ledger.store, ledger.engine, fresh)
            relay.relay_once()  # warm-up: connections and metadata (not counted below)
            warm = relay.position
            t = time.perf_counter()
            relay.catch_up(timeout=600)
            relay_rates.append((len(events) - warm) / (time.perf_counter() - t))
            relay.stop()
            published = fresh

            # the plain producer: the same records, serialized beforehand, the same settings
            plain = settings.model_copy(update={"kafka_topic_prefix": "plain" +
                                                uuid.uuid4().hex[:6]})
            ensure_topics(plain)
            messages = [event_message(plain.kafka_topic_prefix, e) for e in events[warm:]]
            producer = KafkaProducer(**producer_config(plain))
            m0 = event_message(plain.kafka_topic_prefix, events[0])
            producer.send(m0.topic, key=m0.key, value=m0.value, headers=m0.headers).get(30)
            t = time.perf_counter()
            futures = [producer.send(m.topic, key=m.key, value=m.value, headers=m.headers)
                       for m in messages]
            producer.flush()
            for f in futures:
                f.get(timeout=0)
            plain_rates.append(len(messages) / (time.perf_counter() - t))
            producer.close()
            note(f"round: relay {relay_rates[-1]:.0f}/s, plain producer {plain_rates[-1]:.0f}/s")
        # check-kafka over what the last relay published: the log, then every record read back
        t = time.perf_counter()
        report = KafkaCheck(ledger.store, published, events[-1].id).run()
        check_rate = len(events) / (time.perf_counter() - t)
        if not report["ok"]:
            raise SystemExit(f"check-kafka found differences: {report}")
    finally:
        ledger.stop()
    bench("relay_per_s", round(max(relay_rates), 1))
    bench("producer_per_s", round(max(plain_rates), 1))
    bench("relay_ratio", round(max(relay_rates) / max(plain_rates), 3))
    bench("check_kafka_per_s", round(check_rate, 1))


def measure_e2e(args: argparse.Namespace, settings: Any) -> None:
    import orjson
    from kafka import KafkaConsumer

    from bootstrap.ledger import Ledger
    from infra.kafka_records import kafka_topic
    from infra.kafka_relay import ensure_topics

    ensure_topics(settings)
    topic = kafka_topic(settings.kafka_topic_prefix, "ExecutedObsUnit")
    lags: list[float] = []
    stop = threading.Event()
    ready = threading.Event()

    def consume() -> None:
        consumer = KafkaConsumer(topic, bootstrap_servers=settings.kafka_bootstrap,
                                 group_id=f"bench-{uuid.uuid4().hex[:6]}",
                                 auto_offset_reset="latest", fetch_max_wait_ms=10,
                                 session_timeout_ms=6000, heartbeat_interval_ms=1000)
        while not consumer.assignment():
            consumer.poll(timeout_ms=100)
        ready.set()
        while not stop.is_set():
            for records in consumer.poll(timeout_ms=100).values():
                now = datetime.now(UTC)
                for r in records:
                    stamp = orjson.loads(r.value)["state"]["timestamp"]["_data_"]
                    lags.append((now - datetime.fromisoformat(stamp)).total_seconds() * 1000)
        consumer.close()

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    if not ready.wait(60):
        raise SystemExit("the consumer never got its partitions")
    ledger = Ledger(settings)
    ledger.start_workers()
    try:
        total = int(args.rate * args.seconds)
        requests = start_requests(total)

        async def paced() -> None:
            t0 = time.perf_counter()
            for i, req in enumerate(requests):
                delay = t0 + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ledger.commands.submit(ObsUnitCommand.EXECUTED_OBS_UNIT_START, req, path=None,
                                             actor="bench", correlation_id=str(uuid.uuid4()),
                                             idempotency_key=None)

        asyncio.run(paced())
        deadline = time.monotonic() + 60
        while len(lags) < total and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        ledger.stop()
        reader.join(timeout=10)
    if len(lags) < total:
        raise SystemExit(f"e2e: only {len(lags)} of {total} events were consumed")
    lags.sort()
    note(f"e2e: {total} start commands at {args.rate}/s for {args.seconds}s, dispatcher and "
         f"relay embedded; lag = consumer read time - event recorded time; max {lags[-1]:.1f}ms")
    bench("e2e_p50_ms", round(statistics.median(lags), 2))
    bench("e2e_p99_ms", round(lags[int(0.99 * (len(lags) - 1))], 2))


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--bootstrap", help="an existing broker instead of a noida-db started here")
    p.add_argument("--events", type=int, default=40_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=500.0)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--only", nargs="*", choices=["throughput", "e2e"])
    args = p.parse_args(argv)
    only = set(args.only or ["throughput", "e2e"])

    from tests.support.kafka_broker import KafkaBroker

    with tempfile.TemporaryDirectory(prefix="obsledger-broker-") as broker_dir:
        broker = (KafkaBroker("external", Path(broker_dir), args.bootstrap) if args.bootstrap
                  else KafkaBroker("noida", Path(broker_dir)))
        note(f"broker: {broker.kind} at {broker.bootstrap}")
        try:
            # one database per phase: the e2e relay must start at an empty log, not behind
            # the throughput phase's 40,000 events
            for phase, measure in (("throughput", measure_throughput), ("e2e", measure_e2e)):
                if phase not in only:
                    continue
                with fresh_settings(args, f"obsledger_bench_{phase}",
                                    kafka_bootstrap=broker.bootstrap,
                                    kafka_topic_prefix=f"{phase}{uuid.uuid4().hex[:6]}",
                                    ) as settings:
                    measure(args, settings)
        finally:
            broker.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
