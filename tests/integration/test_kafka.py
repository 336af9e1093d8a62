"""The Kafka relay against real Kafka-protocol brokers started here (noida-db and tansu).

Every stored event must arrive, in per-aggregate order, with its headers, and survive broker
outages and a relay killed mid-batch; an independent client (Debian's ``kcat``) reads the
topics in the end-to-end test. ``KAFKA_BOOTSTRAP`` runs the suite against a real broker.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import pkgutil
import random
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.partitioner.default import murmur2 as reference_murmur2
from sqlalchemy import select, update

from api.app import create_app
from bootstrap.ledger import Ledger
from commands.downloads import (
    DownloadFileComplete,
    DownloadFileSpec,
    DownloadFileStart,
    RequestDownload,
)
from commands.models import CommandModel
from commands.obs_units import FinishExecutedObsUnitRequest, StartExecutedObsUnitRequest
from commands.processing import (
    ClaimProcessingJob,
    ProcessingStep,
    ProductOutputFile,
    RequestProcessingJob,
    SucceedProcessingJob,
)
from commands.raw_data import (
    AddFilesToPackageRequest,
    BulkRegisterRawDataFilesRequest,
    CreateRawDataPackageRequest,
)
from commands.results import (
    ContributeAssetRequest,
    DispatchObservationResultRequest,
    EndProcessingRunRequest,
    MaterializeObservationResultsRequest,
    StartProcessingRunRequest,
)
from commands.staging import StageRequest, StagingProgressRequest
from infra.kafka_records import (
    AGGREGATE_TYPES,
    SCHEMA,
    all_topics,
    event_message,
    event_type_of,
    kafka_topic,
    key_partition,
    murmur2,
)
from infra.kafka_relay import EventRelay, ensure_topics
from infra.settings import Settings
from projections.kafka_projector import KafkaProjector
from projections.tables import build_consumer_offsets
from tests.conftest import REQUIRE_SERVICES, ROOT, grant, read_model_rows, settings_env
from tests.support.kafka_broker import KafkaBroker, kcat_binary

T0 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


class Empty(CommandModel):
    pass
BROKERS = ["external"] if os.environ.get("KAFKA_BOOTSTRAP") else ["noida", "tansu"]


@pytest.fixture(params=BROKERS)
def broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KafkaBroker]:
    b = KafkaBroker(str(request.param), tmp_path, os.environ.get("KAFKA_BOOTSTRAP"))
    yield b
    b.close()


@pytest.fixture
def kafka_settings(settings: Settings, broker: KafkaBroker) -> Settings:
    prefix = f"t{uuid.uuid4().hex[:8]}"  # fresh topics even on a shared external broker
    return settings.model_copy(update={
        "kafka_bootstrap": broker.bootstrap, "kafka_topic_prefix": prefix,
        "kafka_partitions": 3, "relay_batch_size": 100, "relay_retry_max_s": 0.5})


@pytest.fixture
def kafka_ledger(kafka_settings: Settings) -> Iterator[Ledger]:
    lg = Ledger(kafka_settings, workers=False)
    yield lg
    lg.stop()


# -- helpers ---------------------------------------------------------------------------------
def night(ledger: Ledger, units: int = 4, files: int = 5) -> None:
    """A small night: units started, files registered and packaged, units finished."""
    async def go() -> None:
        async def submit(kind: str, req: Any, path: dict[str, Any] | None = None) -> Any:
            return await ledger.commands.submit(kind, req, path=path, actor="night-script",
                                                correlation_id=f"corr-{kind}",
                                                idempotency_key=None)
        for u in range(units):
            sub = await submit("executed_obs_unit.start", StartExecutedObsUnitRequest(
                obs_unit_id=f"OU-{u % 2}", instrument="HARPS", start_time=T0, metadata={}))
            unit = sub.body["ids"]["executed_obs_unit_id"]
            bulk = BulkRegisterRawDataFilesRequest.model_validate({"files": [{
                "name": f"HARPS.{u}.{i:04d}.fits", "relative_path": f"n/HARPS.{u}.{i}.fits",
                "size": 1000 + i, "checksum": {"algorithm": "md5", "value": f"{u:08x}{i:024x}"},
                "instrument": "HARPS", "executed_obs_unit_id": unit, "file_type": "raw_science",
                "created_at": T0.isoformat()} for i in range(files)]})
            files_sub = await submit("raw_data_file.register_bulk", bulk)
            file_ids = files_sub.body["ids"]["raw_data_file_ids"]
            half = max(1, len(file_ids) // 2)
            pkg = await submit("raw_data_package.create",
                               CreateRawDataPackageRequest.model_validate({
                                   "name": f"pkg-{u}", "executed_obs_unit_id": unit,
                                   "file_ids": file_ids[:half]}))
            if file_ids[half:]:  # FilesAdded: an update that adds to the package's totals
                await submit("raw_data_package.add_files",
                             AddFilesToPackageRequest.model_validate(
                                 {"file_ids": file_ids[half:]}),
                             path={"id": uuid.UUID(pkg.body["ids"]["raw_data_package_id"])})
            await submit("executed_obs_unit.finish", FinishExecutedObsUnitRequest.model_validate(
                {"status": "success", "end_time": T0.isoformat()}), path={"id": uuid.UUID(unit)})
            package_id = uuid.UUID(pkg.body["ids"]["raw_data_package_id"])
            await submit("raw_data_package.finalize", Empty(), path={"id": package_id})
            staged = await submit("staging.stage", StageRequest(
                package_ids=[package_id], destination="archive-transfer:/stage/night"))
            await submit("staging.report_progress", StagingProgressRequest(
                status="completed", bytes_transferred=files * 1000, files_transferred=files),
                path={"id": uuid.UUID(staged.body["ids"]["staging_id"])})
            results = await submit("observation_result.materialize",
                                   MaterializeObservationResultsRequest(
                                       observation_id=u, request_id=1, samples=2))
            result = uuid.UUID(results.body["ids"]["observation_result_ids"][0])
            await submit("observation_result.dispatch", DispatchObservationResultRequest(
                executed_obs_unit_id=uuid.UUID(unit)), path={"id": result})
            await submit("observation_result.contribute_asset",
                         ContributeAssetRequest(asset_id=f"file:{file_ids[0]}"),
                         path={"id": result})
            run = await submit("observation_result.start_run", StartProcessingRunRequest(),
                               path={"id": result})
            await submit("observation_result.end_run", EndProcessingRunRequest(end="skipped"),
                         path={"id": result, "run_id": uuid.UUID(run.body["ids"]["run_id"])})
            download = await submit("download_job.request", RequestDownload(
                destination=f"n/{u}", files=[DownloadFileSpec(
                    url=f"http://mast.test/{u}.fits", filename=f"{u}.fits", size=10)]))
            job = uuid.UUID(download.body["ids"]["download_job_id"])
            await submit("download_job.start_file", DownloadFileStart(id=job, index=0, size=10))
            await submit("download_job.complete_file", DownloadFileComplete(
                id=job, index=0, size=10, sha256="cd" * 32))
            # a processing job: steps, a product and its inputs (docs/PROCESSING.md)
            processing = await submit("processing_job.request", RequestProcessingJob(
                kind="process", file_ids=[uuid.UUID(f) for f in file_ids[:2]],
                algorithm="ccd_stack", algorithm_version="1.0.0"))
            pj = uuid.UUID(processing.body["ids"]["processing_job_id"])
            held = {"id": pj, "worker": f"w{u}", "attempt": 1}
            await submit("processing_job.claim", ClaimProcessingJob(id=pj, worker=f"w{u}",
                                                                    lease_s=60))
            await submit("processing_job.start_step", ProcessingStep(name="combine", **held))
            await submit("processing_job.complete_step", ProcessingStep(name="combine",
                                                                        **held))
            await submit("processing_job.succeed", SucceedProcessingJob(products=[
                ProductOutputFile(kind="combined_image", name="c.fits", area="products",
                                  key=f"{pj}/c.fits", size=10, sha256="ef" * 32,
                                  media_type="application/fits")], **held))
    asyncio.run(go())
    assert ledger.dispatcher is not None
    ledger.dispatcher.drain()


def stored_events(ledger: Ledger) -> list[Any]:
    assert ledger.store is not None
    return list(ledger.store.select_notifications(0, 1_000_000))


def consume(settings: Settings, expected: int, timeout: float = 30.0) -> list[Any]:
    """Everything on the relay's topics (until ``expected`` distinct events, or quiet)."""
    consumer = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, group_id=None,
                             enable_auto_commit=False, fetch_max_wait_ms=50,
                             consumer_timeout_ms=3000)
    try:
        parts = [TopicPartition(t, p) for t in all_topics(settings.kafka_topic_prefix)
                 for p in range(settings.kafka_partitions)]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        records: list[Any] = []
        distinct: set[tuple[bytes, bytes]] = set()  # (aggregate id, version): not duplicates
        deadline = time.monotonic() + timeout
        while len(distinct) < expected and time.monotonic() < deadline:
            batch = consumer.poll(timeout_ms=500)
            for recs in batch.values():
                records.extend(recs)
                distinct.update((r.key, dict(r.headers)["aggregate_version"]) for r in recs)
        # anything beyond ``expected`` that is already there (duplicates) comes too
        for recs in consumer.poll(timeout_ms=1000).values():
            records.extend(recs)
        return records
    finally:
        consumer.close()


def check_complete_and_ordered(events: list[Any], records: list[Any], batch: int) -> None:
    """Every stored event arrived; each aggregate's events in version order (duplicates
    aside); duplicates only as a re-sent batch."""
    want = {(str(n.originator_id), n.originator_version) for n in events}
    got = Counter((r.key.decode(), int(dict(r.headers)["aggregate_version"]))
                  for r in records)
    assert want - set(got) == set(), "events missing from Kafka"
    assert set(got) - want == set()
    duplicates = sum(c - 1 for c in got.values())
    assert duplicates <= 2 * batch, f"{duplicates} duplicates"
    by_partition: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for r in records:
        by_partition[(r.topic, r.partition)].append(r)
    for recs in by_partition.values():
        recs.sort(key=lambda r: r.offset)
        latest: dict[bytes, int] = {}
        for r in recs:
            version = int(dict(r.headers)["aggregate_version"])
            # a re-sent batch may start again below the latest version, never skip ahead
            assert version <= latest.get(r.key, 0) + 1, "an aggregate's events out of order"
            latest[r.key] = max(latest.get(r.key, 0), version)


def read_topic(broker: KafkaBroker, topic: str, count: int) -> list[dict[str, Any]]:
    """``count`` records of ``topic`` as {partition, offset, key, headers, payload}, read by
    Debian's kcat (librdkafka), a client independent of ours. tansu 0.6.0 answers ApiVersions
    in a form librdkafka 2.0.2 cannot parse ("Read underflow"), so there kafka-python reads."""
    if broker.kind == "tansu":
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, group_id=None,
                                 fetch_max_wait_ms=50, consumer_timeout_ms=3000)
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        out = [{"partition": r.partition, "offset": r.offset, "key": r.key.decode(),
                "headers": {k: v.decode() for k, v in r.headers},
                "payload": r.value.decode()} for r in consumer]
        consumer.close()
        return out
    kcat = kcat_binary()
    if kcat is None:
        msg = "kcat is not installed (make test installs Debian's kcat)"
        pytest.fail(msg) if REQUIRE_SERVICES else pytest.skip(msg)
    done = subprocess.run([kcat, "-C", "-b", broker.bootstrap, "-t", topic, "-o", "beginning",
                           "-c", str(count), "-J", "-q"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    received = []
    for line in done.stdout.splitlines():
        if line.strip():
            msg = json.loads(line)
            h = msg["headers"]
            msg["headers"] = dict(zip(h[0::2], h[1::2], strict=True))
            received.append(msg)
    return received


# -- tests -----------------------------------------------------------------------------------
def test_every_stored_event_reaches_kcat_in_order_with_its_headers(
        kafka_ledger: Ledger, kafka_settings: Settings, broker: KafkaBroker) -> None:
    night(kafka_ledger)
    relay = kafka_ledger.relay
    assert relay is not None
    head = relay.catch_up()
    events = stored_events(kafka_ledger)
    assert head == events[-1].id and relay.read_position() == head
    by_topic: dict[str, list[Any]] = defaultdict(list)
    for n in events:
        by_topic[kafka_topic(kafka_settings.kafka_topic_prefix, event_type_of(n.topic)[0])
                 ].append(n)
    assert set(by_topic) <= set(all_topics(kafka_settings.kafka_topic_prefix))
    # units, files, packages, staging, results, receipts, downloads, processing jobs, products
    assert len(by_topic) == 9
    for topic, expected in by_topic.items():
        received = read_topic(broker, topic, len(expected))
        assert len(received) == len(expected)
        stored = {(str(n.originator_id), n.originator_version): n for n in expected}
        last_version: dict[str, int] = {}
        for msg in sorted(received, key=lambda m: (m["partition"], m["offset"])):
            headers = msg["headers"]
            n = stored[(msg["key"], int(headers["aggregate_version"]))]
            state = orjson.loads(n.state)
            assert headers["event_type"] == event_type_of(n.topic)[1]
            assert headers["log_position"] == str(n.id)
            assert headers["command_id"] == state["command_id"]
            assert headers["correlation_id"] == state["correlation_id"]
            assert headers["actor"] == "night-script" and headers["schema"] == SCHEMA
            value = json.loads(msg["payload"])
            assert value["schema"] == SCHEMA and value["position"] == n.id
            assert value["aggregate_id"] == msg["key"]
            assert value["state"] == state  # the stored state, unchanged
            assert last_version.get(msg["key"], 0) + 1 == n.originator_version
            last_version[msg["key"]] = n.originator_version


def test_a_restarted_relay_resumes_after_the_last_flushed_batch(
        kafka_settings: Settings) -> None:
    first = Ledger(kafka_settings, workers=False)
    night(first, units=8)
    assert first.relay is not None
    assert first.relay.relay_once() == 100  # one batch, recorded
    first.stop()
    second = Ledger(kafka_settings, workers=False)
    try:
        assert second.relay is not None and second.relay.position == 100
        head = second.relay.catch_up()
        events = stored_events(second)
        records = consume(kafka_settings, len(events))
        assert head == events[-1].id
        assert len(records) == len(events)  # resumed exactly where it stopped: no duplicate
        check_complete_and_ordered(events, records, batch=100)
    finally:
        second.stop()


def test_a_broker_outage_never_blocks_commands_and_the_relay_catches_up(
        kafka_settings: Settings, broker: KafkaBroker) -> None:
    if not broker.can_fail:
        pytest.skip("outages are simulated only on the brokers the tests start")
    app = create_app(kafka_settings)
    with TestClient(app, headers=grant(kafka_settings)) as client:
        night(app.state.ledger, units=2)
        ledger: Ledger = app.state.ledger
        relay = ledger.relay
        assert relay is not None and relay.running
        wait_until(lambda: relay.position == ledger.store.max_position())  # type: ignore[union-attr]
        with broker.outage():
            for i in range(20):  # commands keep being accepted and applied
                r = client.post("/executed_obs_units/start?wait=true", json={
                    "obs_unit_id": f"OU-OUT-{i}", "instrument": "HARPS",
                    "start_time": T0.isoformat()})
                assert r.status_code == 200, r.text
                assert r.json()["status"] == "applied"
            health = wait_until(lambda: _health_while_down(client))
            assert health["kafka"]["lag"]["events"] >= 40  # 20 units and their receipts
            assert health["status"] == "ok"  # the store is fine: commands are not blocked
        wait_until(lambda: relay.position == ledger.store.max_position(),  # type: ignore[union-attr]
                   timeout=60)
        health = client.get("/health").json()["kafka"]
        assert health["broker_reachable"] is True and health["lag"]["events"] == 0
        events = stored_events(ledger)
        check_complete_and_ordered(events, consume(kafka_settings, len(events)),
                                   batch=kafka_settings.relay_batch_size)


def _health_while_down(client: TestClient) -> dict[str, Any] | None:
    health: dict[str, Any] = client.get("/health").json()
    kafka = health["kafka"]
    if kafka["broker_reachable"] is False and kafka["lag"] and kafka["lag"]["events"] >= 40:
        return health
    return None


def wait_until(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


@pytest.mark.slow
def test_a_relay_killed_mid_batch_loses_nothing(kafka_settings: Settings) -> None:
    settings = kafka_settings.model_copy(update={"relay_batch_size": 500})
    ledger = Ledger(settings, workers=False)
    try:
        night(ledger, units=8, files=400)  # ~3,300 events
        head = stored_events(ledger)[-1].id
        env = settings_env(settings)
        relay = subprocess.Popen([sys.executable, "-m", "api.cli", "relay"], env=env, cwd=ROOT)
        try:
            assert ledger.relay is not None
            wait_until(lambda: 0 < ledger.relay.read_position() < head,  # type: ignore[union-attr]
                       timeout=60)
        finally:
            relay.send_signal(signal.SIGKILL)
            relay.wait()
        killed_at = ledger.relay.read_position()
        assert killed_at < head
        done = subprocess.run([sys.executable, "-m", "api.cli", "relay", "--once"], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert ledger.relay.read_position() == head
        events = stored_events(ledger)
        check_complete_and_ordered(events, consume(settings, len(events)), batch=500)
    finally:
        ledger.stop()


def test_relay_requires_a_bootstrap(ledger: Ledger) -> None:
    assert ledger.store is not None
    with pytest.raises(ValueError):
        EventRelay(ledger.store, ledger.engine, ledger.settings)


# -- projectors consuming from Kafka ---------------------------------------------------------
@pytest.fixture
def kafka_projection_settings(kafka_settings: Settings) -> Settings:
    return kafka_settings.model_copy(update={
        "projection_source": "kafka", "kafka_consumer_group": f"g{uuid.uuid4().hex[:8]}",
        "embedded_projector": False, "projection_page_size": 200})


def assert_equals_a_build_from_the_log(ledger: Ledger) -> None:
    """The live read models, row for row, equal a fresh build from the event log."""
    assert ledger.projector is not None
    fresh, _ = ledger.projector.build_fresh()
    try:
        live, rebuilt = read_model_rows(ledger.engine), read_model_rows(ledger.engine, fresh)
        assert all(rebuilt.values()), "every read model has rows"
        for model in rebuilt:
            assert live[model] == rebuilt[model], model
    finally:
        ledger.projector.drop(fresh)


def consumer_offsets(ledger: Ledger, group: str) -> list[dict[str, Any]]:
    o = build_consumer_offsets()
    with ledger.engine.connect() as conn:
        return [dict(r) for r in conn.execute(
            select(o).where(o.c.group_id == group).order_by(o.c.topic, o.c.partition))
            .mappings()]


def projected_records(ledger: Ledger) -> int:
    """How many records the relay put on the topics the projectors read (no receipts)."""
    return sum(1 for n in stored_events(ledger)
               if event_type_of(n.topic)[0] != "CommandReceipt")


def test_two_kafka_projector_processes_build_what_the_log_builds(
        kafka_projection_settings: Settings) -> None:
    settings = kafka_projection_settings
    group = settings.kafka_consumer_group
    ledger = Ledger(settings, workers=False)
    env = settings_env(settings)
    members = [subprocess.Popen([sys.executable, "-m", "api.cli", "project"], env=env,
                                cwd=ROOT) for _ in range(2)]
    try:
        # both members hold a share of the partitions before the night starts
        wait_until(lambda: len({r["member"] for r in consumer_offsets(ledger, group)}) == 2,
                   timeout=90)
        night(ledger, units=6, files=20)
        assert ledger.relay is not None
        head = ledger.relay.catch_up()
        wait_until(lambda: ledger.queries.read_model_position() == head, timeout=60)
        offsets = consumer_offsets(ledger, group)
        assert sum(r["next_offset"] for r in offsets) == projected_records(ledger)
        assert len({r["member"] for r in offsets}) == 2  # both applied records
    finally:
        for m in members:
            m.send_signal(signal.SIGTERM)
        for m in members:
            assert m.wait(timeout=30) == 0
        try:
            assert_equals_a_build_from_the_log(ledger)
        finally:
            ledger.stop()


def test_duplicates_from_the_relay_change_nothing(kafka_projection_settings: Settings) -> None:
    settings = kafka_projection_settings
    ledger = Ledger(settings, workers=False)
    try:
        night(ledger, units=4, files=10)
        assert ledger.relay is not None and isinstance(ledger.projector, KafkaProjector)
        head = ledger.relay.catch_up()
        assert ledger.projector.catch_up() == head
        once = read_model_rows(ledger.engine)
        # the relay is set back and publishes everything again: every record twice
        with ledger.engine.begin() as conn:
            conn.execute(update(ledger.relay.positions).values(position=0))
        ledger.relay.position = 0
        assert ledger.relay.catch_up() == head
        total = 2 * projected_records(ledger)
        group = settings.kafka_consumer_group
        wait_until(lambda: ledger.projector.project_once() >= 0 and  # type: ignore[union-attr]
                   sum(r["next_offset"] for r in consumer_offsets(ledger, group)) == total)
        assert read_model_rows(ledger.engine) == once
        assert ledger.queries.read_model_position() == head
        assert_equals_a_build_from_the_log(ledger)
    finally:
        ledger.stop()


@pytest.mark.slow
def test_a_kafka_projector_killed_mid_batch_resumes_without_applying_twice(
        kafka_projection_settings: Settings, broker: KafkaBroker) -> None:
    settings = kafka_projection_settings.model_copy(update={"projection_page_size": 100})
    group = settings.kafka_consumer_group
    ledger = Ledger(settings, workers=False)
    try:
        night(ledger, units=8, files=300)  # ~2,500 records on the projected topics
        assert ledger.relay is not None
        head = ledger.relay.catch_up()
        total = projected_records(ledger)
        env = settings_env(settings)
        member = subprocess.Popen([sys.executable, "-m", "api.cli", "project"], env=env,
                                  cwd=ROOT)
        try:
            wait_until(lambda: 0 < sum(r["next_offset"] for r in consumer_offsets(ledger, group))
                       < total, timeout=60)
        finally:
            member.send_signal(signal.SIGKILL)
            member.wait()
        assert sum(r["next_offset"] for r in consumer_offsets(ledger, group)) < total
        broker.forget_dead_members()
        done = subprocess.run([sys.executable, "-m", "api.cli", "project", "--once",
                               "--timeout", "90"], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert ledger.queries.read_model_position() == head
        assert sum(r["next_offset"] for r in consumer_offsets(ledger, group)) == total
        assert_equals_a_build_from_the_log(ledger)
    finally:
        ledger.stop()


def test_smart_queries_read_their_writes_with_a_kafka_projector(
        kafka_projection_settings: Settings) -> None:
    settings = kafka_projection_settings.model_copy(update={"embedded_projector": True})
    with TestClient(create_app(settings), headers=grant(settings)) as client:
        ids = []
        for _ in range(5):
            r = client.post("/executed_obs_units/start", json={
                "obs_unit_id": "OU-RYW", "instrument": "HARPS", "start_time": T0.isoformat()})
            assert r.status_code == 202, r.text
            ids.append(r.json()["ids"]["executed_obs_unit_id"])
        seen = client.get("/executed_obs_units/OU-RYW").json()
        assert sorted(e["id"] for e in seen["executions"]) == sorted(ids)  # at once

        def projected() -> dict[str, Any] | None:
            body: dict[str, Any] = client.get("/executed_obs_units/OU-RYW").json()
            return body if not any(e["pending"] for e in body["executions"]) else None

        body = wait_until(projected)
        assert sorted(e["id"] for e in body["executions"]) == sorted(ids)

        def caught_up() -> dict[str, Any] | None:  # the receipts' partitions may trail a moment
            health: dict[str, Any] = client.get("/health").json()["projector"]
            return health if health["lag_events"] == 0 else None

        health = wait_until(caught_up)
        assert health["source"] == "kafka"
        assert health["kafka"]["group"] == settings.kafka_consumer_group
        topics = len(AGGREGATE_TYPES) - 1  # every aggregate type's but the receipts'
        assert len(health["kafka"]["assigned_partitions"]) == topics * settings.kafka_partitions


def test_kafka_projection_requires_a_bootstrap(settings: Settings) -> None:
    with pytest.raises(ValueError, match="KAFKA_BOOTSTRAP"):
        Settings.model_validate({**settings.model_dump(), "projection_source": "kafka",
                                 "kafka_bootstrap": None})


def test_the_relay_partitions_keys_as_kafkas_default_partitioner_does() -> None:
    """The relay picks partitions itself (faster): the same as Java's and kafka-python's."""
    assert murmur2(b"21") == -973932308 & 0xFFFFFFFF  # Apache Kafka's UtilsTest vector
    rng = random.Random(7)
    for length in range(0, 80):
        for _ in range(25):
            key = rng.randbytes(length)
            for partitions in (1, 3, 6, 50):
                assert key_partition(key, partitions) == \
                    (reference_murmur2(key) & 0x7FFFFFFF) % partitions


# -- proof: check-kafka, and a relay that notices what a broker lost --------------------------
def check_kafka(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    """``obsledger check-kafka`` in its own process: (exit code, its JSON report)."""
    done = subprocess.run([sys.executable, "-m", "api.cli", "check-kafka", "--quiet", *args],
                          env=settings_env(settings), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode in (0, 1), (done.returncode, done.stderr)
    report: dict[str, Any] = json.loads(done.stdout)
    assert report["ok"] is (done.returncode == 0)
    return done.returncode, report


def follow_the_dedup_rule(records: list[Any]) -> dict[str, list[int]]:
    """What a consumer following docs/KAFKA.md applies, reading every partition from the
    beginning: per aggregate, a record whose version is the next one; nothing else."""
    by_partition: dict[tuple[str, int], list[Any]] = defaultdict(list)
    for r in records:
        by_partition[(r.topic, r.partition)].append(r)
    applied: dict[str, list[int]] = defaultdict(list)
    for recs in by_partition.values():
        for r in sorted(recs, key=lambda r: r.offset):
            versions = applied[r.key.decode()]
            if int(dict(r.headers)["aggregate_version"]) == len(versions) + 1:
                versions.append(len(versions) + 1)
    return applied


def assert_a_consumer_gets_every_event(ledger: Ledger, settings: Settings) -> None:
    events = stored_events(ledger)
    want: dict[str, int] = {}
    for n in events:
        want[str(n.originator_id)] = max(want.get(str(n.originator_id), 0),
                                         n.originator_version)
    applied = follow_the_dedup_rule(consume(settings, len(events)))
    assert {k: len(v) for k, v in applied.items() if v} == want


def publish_by_hand(settings: Settings, messages: list[tuple[str, Any, Any, Any]]) -> None:
    """Records written straight to the relay's topics (``(topic, key, value, headers)``), on
    the partition of their key, in order: a stand-in for a broker that lost or changed some."""
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all",
                             max_in_flight_requests_per_connection=1)
    try:
        for topic, key, value, headers in messages:
            producer.send(topic, key=key, value=value, headers=headers,
                          partition=key_partition(key or b"", settings.kafka_partitions))
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=5)


def claim_published(ledger: Ledger, position: int) -> None:
    """Record ``position`` as the relay's sent position (what check-kafka checks up to)."""
    relay = ledger.relay
    assert relay is not None
    with ledger.engine.begin() as conn:
        conn.execute(update(relay.positions).where(relay.positions.c.name == relay.relay_name)
                     .values(position=position))


def test_check_kafka_is_clean_after_the_relay_published_everything(
        kafka_ledger: Ledger, kafka_settings: Settings) -> None:
    night(kafka_ledger, units=2, files=3)
    assert kafka_ledger.relay is not None
    head = kafka_ledger.relay.catch_up()
    code, report = check_kafka(kafka_settings)
    assert code == 0, report
    assert report["position"] == report["head"] == head
    assert report["events"] == len(stored_events(kafka_ledger)) == report["records"]
    assert report["missing"] == report["mismatched"] == report["out_of_order"] == 0
    # every aggregate type's topic (the ones of docs/KAFKA.md's table) holds its events
    assert set(report["topics"]) == set(all_topics(kafka_settings.kafka_topic_prefix))
    assert report["repaired"] is None


def test_check_kafka_finds_missing_and_out_of_order_events_and_repairs_them(
        kafka_ledger: Ledger, kafka_settings: Settings) -> None:
    night(kafka_ledger, units=2, files=3)
    events = stored_events(kafka_ledger)
    prefix = kafka_settings.kafka_topic_prefix
    lost = [n for n in events if event_type_of(n.topic)[0] == "CommandReceipt"][3]
    package = next(n.originator_id for n in events if n.topic.endswith(
        "RawDataPackage.Finalized") and n.originator_version == 3)
    second, third = (n for n in events if n.originator_id == package
                     and n.originator_version in (2, 3))
    messages = []
    for n in events:
        if n.id == lost.id:
            continue  # never reached Kafka
        m = event_message(prefix, n if n.id != second.id else third)
        if n.id == third.id:
            m = event_message(prefix, second)  # the package's 3rd event before its 2nd
        messages.append((m.topic, m.key, m.value, m.headers))
    publish_by_hand(kafka_settings, messages)
    claim_published(kafka_ledger, events[-1].id)

    code, report = check_kafka(kafka_settings)
    assert code == 1
    assert (report["missing"], report["out_of_order"], report["mismatched"]) == (1, 1, 0)
    receipts = report["topics"][f"{prefix}.command_receipt"]
    assert receipts["missing"] == 1 and receipts["examples"] == [{
        "problem": "missing", "position": lost.id, "aggregate_id": str(lost.originator_id),
        "aggregate_version": 1, "event_type": "CommandReceipt.Recorded"}]
    [example] = report["topics"][f"{prefix}.raw_data_package"]["examples"]
    assert (example["problem"], example["position"]) == ("out_of_order", third.id)

    code, repaired = check_kafka(kafka_settings, "--repair")
    assert code == 1 and repaired["repaired"] == {"republished": 2}
    code, report = check_kafka(kafka_settings)
    assert code == 0, report
    assert report["duplicates"] == 0  # the re-published ones came after the strays
    assert_a_consumer_gets_every_event(kafka_ledger, kafka_settings)


def test_check_kafka_finds_altered_messages(kafka_ledger: Ledger,
                                            kafka_settings: Settings) -> None:
    night(kafka_ledger, units=1, files=2)
    events = stored_events(kafka_ledger)
    prefix = kafka_settings.kafka_topic_prefix
    started = next(n for n in events if n.topic.endswith("ExecutedObsUnit.Started"))
    receipt = [n for n in events if event_type_of(n.topic)[0] == "CommandReceipt"][1]
    other_key = str(uuid.uuid4()).encode()
    messages = []
    for n in events:
        m = event_message(prefix, n)
        if n.id == started.id:  # the payload changed on its way
            messages.append((m.topic, m.key, m.value.replace(b"HARPS", b"HARPX"), m.headers))
        elif n.id == receipt.id:  # under another key (and so on that key's partition)
            messages.append((m.topic, other_key, m.value, m.headers))
        else:
            messages.append((m.topic, m.key, m.value, m.headers))
    messages.append((f"{prefix}.executed_obs_unit", b"k", b"not an event", []))
    publish_by_hand(kafka_settings, messages)
    claim_published(kafka_ledger, events[-1].id)

    code, report = check_kafka(kafka_settings)
    assert code == 1
    assert (report["mismatched"], report["malformed"]) == (2, 1)
    # no faithful copy of either; the unit's next event waits for its first
    assert (report["missing"], report["out_of_order"]) == (2, 1)
    units = report["topics"][f"{prefix}.executed_obs_unit"]["examples"]
    altered = next(e for e in units if e["problem"] == "mismatched")
    assert (altered["position"], altered["differs"]) == (started.id, ["value"])
    assert any(e["problem"] == "malformed" for e in units)
    rekeyed = next(e for e in report["topics"][f"{prefix}.command_receipt"]["examples"]
                   if e["problem"] == "mismatched")
    assert (rekeyed["position"], rekeyed["differs"]) == (receipt.id, ["key"])

    code, repaired = check_kafka(kafka_settings, "--repair")
    assert repaired["repaired"] == {"republished": 3}
    code, report = check_kafka(kafka_settings)  # a changed record cannot be taken back
    assert code == 1 and (report["missing"], report["out_of_order"]) == (0, 0)
    assert (report["mismatched"], report["malformed"]) == (2, 1)


def start_units(client: TestClient, count: int, tag: str) -> None:
    for i in range(count):
        r = client.post("/executed_obs_units/start", json={
            "obs_unit_id": f"OU-{tag}-{i % 7}", "instrument": "HARPS",
            "start_time": T0.isoformat()})
        assert r.status_code == 202, r.text
        if i % 3 == 0:
            unit = r.json()["ids"]["executed_obs_unit_id"]
            r = client.put(f"/executed_obs_units/{unit}/finish", json={"status": "success"})
            assert r.status_code == 202, r.text


@pytest.mark.slow
def test_the_relay_republishes_what_restarted_brokers_lost(
        kafka_settings: Settings, broker: KafkaBroker) -> None:
    """The broker is stopped (SIGTERM) and started again mid-stream, four times: noida-db on
    its data dir, tansu with an empty memory (every restart loses everything). The relay
    notices and re-publishes; check-kafka then finds nothing missing, and a consumer following
    the dedup rule gets every event of every aggregate."""
    if not broker.can_fail:
        pytest.skip("restarts are simulated only on the brokers the tests start")
    settings = kafka_settings.model_copy(update={"relay_batch_size": 50,
                                                 "relay_verify_s": 0.5})
    app = create_app(settings)
    with TestClient(app, headers=grant(settings)) as client:
        ledger: Ledger = app.state.ledger
        relay = ledger.relay
        assert relay is not None and relay.running and ledger.store is not None
        restarted = threading.Event()

        def restart_the_broker() -> None:
            for _ in range(4):
                time.sleep(random.uniform(0.5, 1.5))
                broker.restart()
            restarted.set()

        restarts = threading.Thread(target=restart_the_broker)
        restarts.start()
        rounds = 0
        while not restarted.is_set():  # the relay publishes all along
            start_units(client, 10, f"R{rounds}")
            rounds += 1
        restarts.join()
        start_units(client, 30, "END")
        store = ledger.store
        wait_until(lambda: ledger.journal.depth() == 0, timeout=60)

        def proven() -> dict[str, Any] | None:
            kafka: dict[str, Any] = client.get("/health").json()["kafka"]
            head = store.max_position()
            return kafka if kafka["verified_position"] == kafka["published_position"] == head \
                else None

        health = wait_until(proven, timeout=120)
        assert health["unverified_positions"] == 0 and health["lag"]["events"] == 0
        metrics = client.get("/metrics").text
        assert f"obsledger_relay_verified_position {float(store.max_position())}" in metrics
        if broker.kind == "tansu":  # each restart lost everything published before it
            assert health["data_losses"] >= 1 and health["last_data_loss"]["rewound_to"] == 0
            assert "obsledger_relay_broker_data_losses_total 0.0" not in metrics
        code, report = check_kafka(settings)
        assert code == 0, report  # the relay alone made up for what the broker lost
        assert_a_consumer_gets_every_event(ledger, settings)


def test_kafka_md_names_every_topic_and_event_type() -> None:
    """docs/KAFKA.md's topic table against the code: one row per published aggregate type,
    every event class it can store (the table once lacked obsledger.download_job)."""
    import inspect

    from eventsourcing.domain import Aggregate, _created_event_classes

    import domain

    text = (ROOT / "docs" / "KAFKA.md").read_text()
    table = text[text.index("| topic | events |"):].split("\n\n", 1)[0].splitlines()[2:]
    documented: dict[str, set[str]] = {}
    for row in table:
        _, topic, events, _ = row.split("|")
        aggregate = None
        names = set()
        for name in re.findall(r"`([A-Za-z.]+)`", events):
            if not name.startswith("."):
                aggregate = name.partition(".")[0]
            names.add(name if not name.startswith(".") else f"{aggregate}{name}")
        documented[topic.strip().strip("`")] = names
    classes = {}
    for info in pkgutil.iter_modules(domain.__path__):
        module = importlib.import_module(f"domain.{info.name}")
        for name, cls in vars(module).items():
            if inspect.isclass(cls) and issubclass(cls, Aggregate) and \
                    cls.__module__ == module.__name__:
                classes[name] = cls
    assert set(AGGREGATE_TYPES) == set(classes)  # every aggregate is published
    in_code = {}
    for aggregate in AGGREGATE_TYPES:
        cls = classes[aggregate]
        # the event that creates it (``@event("Started")``); eventsourcing's own ``Created``
        # is defined on every aggregate but stored only where it is the creating one
        creating = {c.__name__ for c in _created_event_classes[cls]}
        in_code[kafka_topic("obsledger", aggregate)] = {
            f"{aggregate}.{n}" for n, c in vars(cls).items()
            if inspect.isclass(c) and issubclass(c, Aggregate.Event) and n != "Event"
            and (n != "Created" or "Created" in creating)}
    assert documented == in_code


def test_check_kafka_and_relay_once_say_when_kafka_does_not_answer(
        kafka_ledger: Ledger, kafka_settings: Settings, broker: KafkaBroker) -> None:
    if not broker.can_fail:
        pytest.skip("outages are simulated only on the brokers the tests start")
    night(kafka_ledger, units=1, files=1)
    assert kafka_ledger.relay is not None
    kafka_ledger.relay.catch_up()
    env = settings_env(kafka_settings)
    with broker.outage():
        for command in (["check-kafka", "--quiet"], ["relay", "--once", "--timeout", "5"]):
            done = subprocess.run([sys.executable, "-m", "api.cli", *command], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert done.returncode == 2, (command, done.stdout, done.stderr)
            # (kafka-python may log its own exceptions on the way; the command ends in a line)
            last = done.stderr.strip().splitlines()[-1]
            assert last.startswith(f"{command[0]}: Kafka does not answer"), done.stderr
    unset = {k: v for k, v in env.items() if k != "OBSLEDGER_KAFKA_BOOTSTRAP"}
    done = subprocess.run([sys.executable, "-m", "api.cli", "check-kafka"], env=unset,
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "OBSLEDGER_KAFKA_BOOTSTRAP is not set" in done.stderr
