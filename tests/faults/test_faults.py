"""Fault injection: the event store goes away, the dispatcher dies mid-batch.

What must hold whatever happens: a command acknowledged 202 is durably journaled, and is
applied to the event store exactly once (one receipt per command id, one set of events),
with the journal eventually recording the log position of its receipt.

The PostgreSQL outages go through ``tests.support.tcp_proxy.TcpProxy``: the server under
test talks to PostgreSQL through the proxy, the test checks the database directly.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from commands.obs_units import StartExecutedObsUnitRequest
from commands.raw_data import BulkRegisterRawDataFilesRequest
from commands.service import CommandService
from domain.receipts import receipt_id
from infra.journal import Journal, Outcome
from infra.read_model_db import READ_MODEL_POOL_SIZE
from infra.settings import Settings
from tests.conftest import (
    PG_HOST,
    PG_PORT,
    PG_USER,
    ROOT,
    ServerProcess,
    grant,
    make_settings,
    remember_accounts,
    settings_env,
)
from tests.support.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

RECEIPT = "%CommandReceipt%"
STARTED = "%ExecutedObsUnit.Started"
REGISTERED = "%RawDataFile.Registered"
FINISHED = "%ExecutedObsUnit.Finished"


# -- child processes -------------------------------------------------------------------------
class _Children:
    """Every process a test starts; teardown kills whatever is still running."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def add(self, proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def children() -> Iterator[_Children]:
    reg = _Children()
    try:
        yield reg
    finally:
        reg.kill_all()


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process Settings come from the test alone (child processes get settings_env)."""
    for k in list(os.environ):
        if k.startswith("OBSLEDGER_") and not k.startswith("OBSLEDGER_TEST_") \
                and k != "OBSLEDGER_REQUIRE_SERVICES":
            monkeypatch.delenv(k)


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(PG_HOST, PG_PORT)
    try:
        yield proxy
    finally:
        proxy.close()


def _proxied_settings(tmp_path: Path, dbname: str, proxy: TcpProxy, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "postgres_host": proxy.host, "postgres_port": proxy.port,
        # fail fast while the network is cut, and retry often: keeps each test well under 60 s
        "postgres_connect_timeout": 2, "dispatch_retry_max_s": 1.0,
    }
    values.update(kw)
    return make_settings(tmp_path, "postgres", dbname, **values)


def _start_server(children: _Children, settings: Settings, *extra: str) -> ServerProcess:
    class Server(ServerProcess):  # registered for teardown even if it never gets ready
        def _wait_ready(self, timeout: float = 30.0) -> None:
            children.add(self.proc)
            super()._wait_ready(timeout)

    return Server(settings, *extra)


def _dispatcher(children: _Children, settings: Settings, *args: str,
                log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - lives with the child
    try:
        return children.add(subprocess.Popen(
            [sys.executable, "-m", "api.cli", "dispatch", *args],
            env=settings_env(settings), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT))
    finally:
        if log:
            out.close()  # type: ignore[union-attr]


# -- looking at PostgreSQL and the journal directly ------------------------------------------
def _pg(dbname: str) -> psycopg.Connection[Any]:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname,
                           autocommit=True, connect_timeout=3)


def _count_receipts(conn: psycopg.Connection[Any]) -> int:
    try:
        row = conn.execute("SELECT count(*) FROM obsledger_events WHERE topic LIKE %s",
                           (RECEIPT,)).fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    return int(row[0]) if row else 0


@dataclass
class StoredEvents:
    rows: list[tuple[uuid.UUID, int, str, int]]  # originator_id, version, topic, position

    def of(self, topic_like: str) -> Counter[uuid.UUID]:
        needle = topic_like.strip("%")
        if topic_like.startswith("%") and topic_like.endswith("%"):
            return Counter(o for o, _, t, _ in self.rows if needle in t)
        return Counter(o for o, _, t, _ in self.rows if t.endswith(needle))

    def receipt_positions(self) -> dict[uuid.UUID, int]:
        return {o: p for o, v, t, p in self.rows if "CommandReceipt" in t and v == 1}


def _pg_events(dbname: str) -> StoredEvents:
    with _pg(dbname) as conn:
        rows = conn.execute(
            "SELECT originator_id, originator_version, topic, notification_id "
            "FROM obsledger_events ORDER BY notification_id").fetchall()
    return StoredEvents([(r[0], int(r[1]), str(r[2]), int(r[3])) for r in rows])


def _pg_connections(dbname: str) -> Counter[str]:
    """Connections to ``dbname`` by ``application_name`` (the event store's pool has none)."""
    with _pg("postgres") as conn:
        rows = conn.execute("SELECT application_name FROM pg_stat_activity WHERE datname=%s",
                            (dbname,)).fetchall()
    return Counter(str(r[0]) for r in rows)


def _journal_rows(path: Path) -> list[tuple[str, str, str, int | None]]:
    """(command_id, command_type, status, position) of every journaled command, in order."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return [(r[0], r[1], r[2], r[3]) for r in conn.execute(
            "SELECT command_id, command_type, status, position FROM commands ORDER BY seq")]
    finally:
        conn.close()


def _journal_applied(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT count(*) FROM commands WHERE status='applied'").fetchone()
    return int(row[0])


def _until(what: str, predicate: Callable[[], Any], timeout: float,
           interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


# -- the commands ----------------------------------------------------------------------------
def _start_body(i: int, tag: str) -> dict[str, Any]:
    return {"obs_unit_id": f"OU-{tag}-{i}", "instrument": "HARPS",
            "metadata": {"i": i, "tag": tag}}


def _bulk_body(i: int, tag: str, unit_id: str | None, n: int = 4) -> dict[str, Any]:
    files = []
    for j in range(n):
        name = f"HARPS.{tag}.{i:05d}.{j}.fits"
        files.append({
            "name": name, "relative_path": f"{tag}/{name}", "size": 1000 + j,
            "checksum": {"algorithm": "md5", "value": uuid.uuid4().hex},
            "instrument": "HARPS", "file_type": "raw_science",
            **({"executed_obs_unit_id": unit_id} if unit_id else {}),
        })
    return {"files": files}


@dataclass
class Sent:
    key: str
    path: str
    body: dict[str, Any]
    phase: str
    status: int
    answer: dict[str, Any]
    latency: float


class CommandStream(threading.Thread):
    """Keeps sending critical commands (starts, and bulk registrations linked to started
    units), each with its own Idempotency-Key, until stopped."""

    def __init__(self, url: str, tag: str, auth: dict[str, str]) -> None:
        super().__init__(name="command-stream", daemon=True)
        self.url = url
        self.auth = auth
        self.tag = tag
        self.phase = "before"
        self.sent: list[Sent] = []
        self.errors: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        assert not self.is_alive(), "command stream did not stop"

    def run(self) -> None:
        last_unit: str | None = None
        running: deque[str] = deque()  # started units, oldest first
        i = 0
        with httpx.Client(base_url=self.url, timeout=15, headers=self.auth) as c:
            while not self._halt.is_set():
                if i % 4 == 3 and len(running) > 5:
                    unit = running.popleft()
                    key, path = f"finish-{self.tag}-{i}", f"/executed_obs_units/{unit}/finish"
                    body = {"status": "success", "metadata": {"i": i}}
                    method = "PUT"
                elif i % 4 == 2:
                    key, path = f"bulk-{self.tag}-{i}", "/raw_data_files/bulk"
                    body = _bulk_body(i, self.tag, last_unit if i % 2 else None)
                    method = "POST"
                else:
                    key, path = f"start-{self.tag}-{i}", "/executed_obs_units/start"
                    body = _start_body(i, self.tag)
                    method = "POST"
                phase = self.phase
                t0 = time.monotonic()
                try:
                    r = c.request(method, path, json=body,
                                  headers={"Idempotency-Key": key})
                except httpx.HTTPError as e:
                    self.errors.append(f"{key}: {e!r}")
                    time.sleep(0.05)
                    i += 1
                    continue
                latency = time.monotonic() - t0
                answer: dict[str, Any] = r.json() if r.headers.get(
                    "content-type", "").startswith("application/json") else {"raw": r.text}
                self.sent.append(Sent(key, path, body, phase, r.status_code, answer, latency))
                if r.status_code == 202 and path.endswith("/start"):
                    last_unit = answer["ids"]["executed_obs_unit_id"]
                    running.append(last_unit)
                i += 1
                time.sleep(0.004)


def _health(c: httpx.Client) -> dict[str, Any]:
    r = c.get("/health")
    assert r.status_code == 200, r.text
    return dict(r.json())


def _wait_drained(c: httpx.Client, timeout: float) -> dict[str, Any]:
    def drained() -> dict[str, Any] | None:
        h = _health(c)
        return h if h["journal"]["depth"] == 0 and h["store"]["reachable"] else None

    return dict(_until("the journal to drain", drained, timeout, interval=0.2))


def _check_applied_once(dbname: str, sent: list[Sent]) -> StoredEvents:
    """Every acknowledged command applied exactly once, as the store itself tells."""
    ev = _pg_events(dbname)
    keys = [s.key for s in sent]
    assert len(set(keys)) == len(keys)
    # no event stored twice (the primary key says so; so must the log)
    assert len({(o, v) for o, v, _, _ in ev.rows}) == len(ev.rows)
    assert len({p for *_, p in ev.rows}) == len(ev.rows)
    # one receipt per acknowledged command, and nothing else
    receipts = ev.of(RECEIPT)
    assert set(receipts) == {receipt_id(k) for k in keys}
    assert all(n == 1 for n in receipts.values()), "a receipt recorded twice"
    assert sum(receipts.values()) == len(sent)
    # each started unit started once; each registered file registered once
    started = ev.of(STARTED)
    units = [uuid.UUID(s.answer["ids"]["executed_obs_unit_id"]) for s in sent
             if s.path.endswith("/start")]
    assert sorted(started) == sorted(units)
    assert all(n == 1 for n in started.values())
    registered = ev.of(REGISTERED)
    files = [uuid.UUID(f) for s in sent if s.path.endswith("/bulk")
             for f in s.answer["ids"]["raw_data_file_ids"]]
    assert sorted(registered) == sorted(files)
    assert all(n == 1 for n in registered.values())
    finished = ev.of(FINISHED)
    ended = [uuid.UUID(s.answer["ids"]["executed_obs_unit_id"]) for s in sent
             if s.path.endswith("/finish")]
    assert sorted(finished) == sorted(ended)
    assert all(n == 1 for n in finished.values())
    assert len(ev.rows) == len(sent) + len(units) + len(files) + len(ended)
    return ev


# -- 2. store outage while commands keep arriving --------------------------------------------
def test_store_outage_while_commands_keep_arriving(
    tmp_path: Path, pg_database: Callable[[], str], pg_proxy: TcpProxy, children: _Children
) -> None:
    dbname = pg_database()
    settings = _proxied_settings(tmp_path, dbname, pg_proxy)
    auth = grant(settings)
    server = _start_server(children, settings)
    stream = CommandStream(server.url, "outage", auth)
    with httpx.Client(base_url=server.url, timeout=30, headers=auth) as c:
        _until("the store to be reachable", lambda: _health(c)["store"]["reachable"], 20)
        stream.start()
        try:
            _until("commands applied before the cut",
                   lambda: len(stream.sent) >= 30 and _health(c)["journal"]["commands"].get(
                       "applied", 0) >= 10, 15)
            stream.phase = "cut"
            pg_proxy.cut()
            cut_at = time.monotonic()
            seen: list[dict[str, Any]] = []

            slowest_health = 0.0

            def noticed() -> bool:
                nonlocal slowest_health
                t0 = time.monotonic()
                h = _health(c)
                slowest_health = max(slowest_health, time.monotonic() - t0)
                seen.append(h)
                return not h["store"]["reachable"] and h["journal"]["depth"] > 0

            # /health answers promptly (bounded by the connect timeout, 2 s here) and tells
            _until("/health to report the outage", noticed, 8, interval=0.2)
            # keep the store away a few seconds while commands keep coming
            while time.monotonic() - cut_at < 4:
                time.sleep(0.1)
            t0 = time.monotonic()
            during = _health(c)
            slowest_health = max(slowest_health, time.monotonic() - t0)
            assert not during["store"]["reachable"] and during["status"] == "degraded"
            assert during["journal"]["depth"] > 0
            assert slowest_health < 5.0, f"/health took {slowest_health:.1f}s during the cut"
            stream.phase = "after"
            pg_proxy.restore()
            restored_at = time.monotonic()
            time.sleep(1.5)
        finally:
            stream.stop()
        health = _wait_drained(c, 30)
        recovery_s = time.monotonic() - restored_at

        assert not stream.errors, stream.errors[:5]
        sent = stream.sent
        lat = {k: max((s.latency for s in sent if s.phase == "cut" and k in s.path),
                      default=0.0) for k in ("start", "bulk", "finish")}
        print(f"sent {Counter(s.phase for s in sent)}; slowest ack during the cut "
              f"{ {k: round(v, 3) for k, v in lat.items()} }; drained {recovery_s:.1f}s "
              f"after restore")
        # the journal is local: the outage must not slow acknowledgements down
        slow = max((s for s in sent if s.phase == "cut"), key=lambda s: s.latency)
        assert slow.latency < 1.0, f"{slow.key} acknowledged in {slow.latency:.3f}s"
        by_phase = Counter(s.phase for s in sent)
        assert by_phase["cut"] >= 20, by_phase
        kinds_cut = Counter(s.path.rsplit("/", 1)[-1] for s in sent if s.phase == "cut")
        assert kinds_cut["start"] and kinds_cut["bulk"] and kinds_cut["finish"], kinds_cut
        bad = [(s.key, s.status, s.answer) for s in sent if s.status != 202]
        assert not bad, bad[:5]
        assert health["journal"]["commands"] == {"applied": len(sent)}, health
        assert recovery_s < 30

        # exactly once, as PostgreSQL itself tells (not through the proxy)
        ev = _check_applied_once(dbname, sent)
        receipt_pos = ev.receipt_positions()

        # and as the API tells: applied, at the position of the command's receipt
        positions = []
        for s in sent:
            r = c.get(f"/commands/{s.key}")
            assert r.status_code == 200, r.text
            st = r.json()
            assert st["status"] == "applied", st
            assert st["position"] == receipt_pos[receipt_id(s.key)], (s.key, st)
            assert st["ids"] == s.answer["ids"]
            positions.append(st["position"])
        assert len(set(positions)) == len(positions)

        # retries with the same Idempotency-Key: the first answer, and nothing new applied
        head = max(p for *_, p in ev.rows)  # (health reads its head before the depth)
        retried = [s for s in sent if s.phase == "cut"][:10] + sent[:5] + sent[-5:]
        for s in retried:
            r = c.request("PUT" if s.path.endswith("/finish") else "POST", s.path,
                          json=s.body, headers={"Idempotency-Key": s.key})
            assert r.status_code == 202, r.text
            assert r.json() == s.answer
            assert r.headers.get("Idempotent-Replayed") == "true"
        time.sleep(1.0)
        after = _wait_drained(c, 10)
        assert after["journal"]["commands"] == {"applied": len(sent)}
        again = _pg_events(dbname)
        assert len(again.rows) == len(ev.rows)
        assert max(p for *_, p in again.rows) == head == after["store"]["head_position"]
    server.stop()


# -- 4. PostgreSQL unreachable when the API starts -------------------------------------------
def test_accepts_commands_when_store_unreachable_at_startup(
    tmp_path: Path, pg_database: Callable[[], str], pg_proxy: TcpProxy, children: _Children
) -> None:
    dbname = pg_database()
    settings = _proxied_settings(tmp_path, dbname, pg_proxy)
    auth = grant(settings)  # while the database answers
    # the API ran here before (or the token came from `obsledger service-token`): its
    # accounts snapshot on disk knows the token, which it cannot check while the database is
    # down (tokens are never trusted on their signature alone)
    remember_accounts(settings)
    pg_proxy.cut()
    started_at = time.monotonic()
    server = _start_server(children, settings)
    sent: list[Sent] = []
    with httpx.Client(base_url=server.url, timeout=20, headers=auth) as c:
        h = _health(c)
        assert not h["store"]["reachable"] and h["status"] == "degraded"
        unit: str | None = None
        for i in range(40):
            if i % 4 == 3:
                key, path, body = f"bulk-down-{i}", "/raw_data_files/bulk", _bulk_body(
                    i, "down", unit)
            else:
                key, path, body = f"start-down-{i}", "/executed_obs_units/start", _start_body(
                    i, "down")
            t0 = time.monotonic()
            r = c.post(path, json=body, headers={"Idempotency-Key": key})
            latency = time.monotonic() - t0
            assert r.status_code == 202, r.text
            assert latency < 1.0, f"{key} took {latency:.3f}s to acknowledge"
            sent.append(Sent(key, path, body, "down", r.status_code, r.json(), latency))
            if path.endswith("/start"):
                unit = r.json()["ids"]["executed_obs_unit_id"]
        h = _health(c)
        assert not h["store"]["reachable"]
        assert h["journal"]["depth"] == len(sent)
        st = c.get(f"/commands/{sent[0].key}").json()
        assert st["status"] == "accepted" and st["position"] is None
        # the database stays untouched while unreachable
        with _pg(dbname) as conn:
            assert _count_receipts(conn) == 0
        # a queued repeat is answered from the journal, even now
        r = c.post(sent[1].path, json=sent[1].body,
                   headers={"Idempotency-Key": sent[1].key})
        assert r.status_code == 202 and r.json() == sent[1].answer

        # several background reconnection attempts fail before the store comes back
        while time.monotonic() - started_at < 8:
            time.sleep(0.1)
        assert pg_proxy.refused >= 3, pg_proxy.refused
        pg_proxy.restore()
        h = _wait_drained(c, 40)
        assert h["journal"]["commands"] == {"applied": len(sent)}
        assert h["dispatcher"]["store_reachable"]
        ev = _check_applied_once(dbname, sent)
        receipt_pos = ev.receipt_positions()
        for s in sent:
            st = c.get(f"/commands/{s.key}").json()
            assert st["status"] == "applied"
            assert st["position"] == receipt_pos[receipt_id(s.key)]
        # the failed connection attempts while the store was down leave nothing behind:
        # once it is back, the server holds no more connections than a server that started
        # with the store up (dispatcher pool, projector, LISTEN, read models)
        time.sleep(2.0)
        conns = _pg_connections(dbname)
        print(f"connections after recovery: {conns}; proxy refused {pg_proxy.refused}")
    server.stop()
    # the same server started with the store up, on the same database, doing the same work
    baseline_server = _start_server(children, settings)
    with httpx.Client(base_url=baseline_server.url, timeout=20, headers=auth) as c:
        r = c.post("/executed_obs_units/start", json=_start_body(99, "up"),
                   headers={"Idempotency-Key": "start-up-99"})
        assert r.status_code == 202, r.text
        _wait_drained(c, 40)
        time.sleep(2.0)
        baseline = _pg_connections(dbname)
    baseline_server.stop()
    print(f"connections of a server started with the store up: {baseline}")
    # The read-model pool keeps as many connections as requests once ran at the same time (up
    # to its size), and the outage's requests ran more at once than the baseline's: compare it
    # with its size. Every other part holds a fixed number, the baseline's; a pool leaked by a
    # failed attempt would add 4 or more. One more than the baseline is a pool's busy moment.
    read_models = conns.pop("obsledger-read-models", 0)
    baseline.pop("obsledger-read-models", 0)
    assert read_models <= READ_MODEL_POOL_SIZE, conns
    assert conns.total() <= baseline.total() + 1, \
        f"{dict(conns)} connections to {dbname} after recovery " \
        f"({dict(baseline)} for a server that started with the store up)"


def test_store_flaps_while_the_server_reconnects(
    tmp_path: Path, pg_database: Callable[[], str], pg_proxy: TcpProxy,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Down at start; on the way back the database drops again right after the event store
    connected, while the read models are being set up. The background reconnection must
    survive that and try again, not die and leave the commands in the journal forever."""
    import sqlalchemy.exc

    from bootstrap.ledger import Ledger
    from projections.projector import Projector

    dbname = pg_database()
    settings = _proxied_settings(tmp_path, dbname, pg_proxy)
    pg_proxy.cut()
    ledger = Ledger(settings)
    try:
        assert ledger.store is None and ledger.dispatcher is None
        keys = asyncio.run(_journal_starts(ledger.journal, 30, "flap"))
        real_setup = Projector.setup
        failures: list[str] = []

        def flaky_setup(self: Projector) -> None:
            if not failures:
                failures.append("read models")
                raise sqlalchemy.exc.OperationalError(
                    "SELECT 1", {}, Exception("server closed the connection unexpectedly"))
            real_setup(self)

        monkeypatch.setattr(Projector, "setup", flaky_setup)
        ledger.start_workers()
        pg_proxy.restore()
        _until("the journal to drain", lambda: ledger.journal.depth() == 0, 20)
        assert failures, "the injected failure did not happen"
        assert ledger.dispatcher is not None and ledger.dispatcher.store_reachable
        assert Counter(ledger.journal.get(k).status for k in keys  # type: ignore[union-attr]
                       ) == {"applied": len(keys)}
        with _pg(dbname) as conn:
            assert _count_receipts(conn) == len(keys)
    finally:
        ledger.stop()


# -- 3. the dispatcher killed mid-batch ------------------------------------------------------
async def _journal_starts(journal: Journal, n: int, tag: str) -> list[str]:
    """Journal ``n`` start commands the way the API does (with no store: no dispatcher)."""
    svc = CommandService(journal, None)
    keys: list[str] = []
    for lo in range(0, n, 2000):
        subs = await asyncio.gather(*(
            svc.submit("executed_obs_unit.start",
                       StartExecutedObsUnitRequest.model_validate(_start_body(i, tag)),
                       actor="fault-test", correlation_id=f"corr-{i}",
                       idempotency_key=f"start-{tag}-{i}")
            for i in range(lo, min(n, lo + 2000))))
        assert all(not s.replayed for s in subs)
        keys.extend(s.entry.command_id for s in subs)
    return keys


def _check_journal_and_store(dbname: str, journal_path: Path, keys: list[str]) -> None:
    rows = _journal_rows(journal_path)
    assert [r[0] for r in rows] == keys
    assert Counter(r[2] for r in rows) == {"applied": len(keys)}
    ev = _pg_events(dbname)
    receipts = ev.of(RECEIPT)
    assert set(receipts) == {receipt_id(k) for k in keys}
    assert all(n == 1 for n in receipts.values())
    receipt_pos = ev.receipt_positions()
    positions = [r[3] for r in rows]
    assert all(isinstance(p, int) for p in positions)
    assert len(set(positions)) == len(keys), "two commands share a position"
    wrong = [(cid, pos, receipt_pos[receipt_id(cid)]) for cid, _, _, pos in rows
             if pos != receipt_pos[receipt_id(cid)]]
    assert not wrong, wrong[:5]
    started = ev.of(STARTED)
    assert len(started) == len(keys) and all(n == 1 for n in started.values())
    assert len(ev.rows) == 2 * len(keys)
    assert len({(o, v) for o, v, _, _ in ev.rows}) == len(ev.rows)


def test_dispatcher_killed_mid_batch(
    tmp_path: Path, pg_database: Callable[[], str], children: _Children
) -> None:
    n = 20_000
    dbname = pg_database()
    settings = make_settings(tmp_path, "postgres", dbname, embedded_workers=False)
    settings.prepare_dirs()
    journal = Journal(settings.journal_file)
    t0 = time.monotonic()
    try:
        keys = asyncio.run(_journal_starts(journal, n, "kill"))
    finally:
        journal.close()
    assert len(keys) == n

    t_start = time.monotonic()
    print(f"journaled {n} commands in {time.monotonic() - t0:.1f}s")
    jconn = sqlite3.connect(f"file:{settings.journal_file}?mode=ro", uri=True, timeout=30)
    kills: list[tuple[int, int]] = []  # (receipts, journal applied) just after each kill
    windows = 0  # kills that hit "committed to the store, not yet recorded in the journal"
    try:
        with _pg(dbname) as pg:
            for _attempt in range(4):
                proc = _dispatcher(children, settings, log=tmp_path / "dispatch.log")
                floor = _count_receipts(pg)
                deadline = time.monotonic() + 15
                killed = False
                while time.monotonic() < deadline and proc.poll() is None:
                    r = _count_receipts(pg)  # the store first, then the journal: if the
                    a = _journal_applied(jconn)  # store is ahead, we are inside the window
                    if r - floor >= 1000 and r > a and r < n:
                        proc.send_signal(signal.SIGKILL)
                        killed = True
                        break
                    time.sleep(0.002)
                if not killed:  # missed the window this time: kill it anyway, mid-run
                    proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                r, a = _count_receipts(pg), _journal_applied(jconn)
                kills.append((r, a))
                print(f"t={time.monotonic() - t_start:.1f}s killed at {r} receipts, {a} applied")
                windows += r > a
                assert a <= r <= n
                if r >= n - 2000 or windows >= 2:
                    break
            # restart: drain what is left (and what the killed dispatcher did not record)
            out = tmp_path / "drain.log"
            drain = _dispatcher(children, settings, "--drain", "--timeout", "40", log=out)
            rc = drain.wait(timeout=50)
            assert rc == 0, out.read_text()[-3000:]
            print(f"t={time.monotonic() - t_start:.1f}s drained")
    finally:
        jconn.close()
    print(f"kills (receipts, journal applied): {kills}")
    assert kills and kills[0][0] > 0, kills
    assert windows >= 1, f"never killed between the store commit and the journal: {kills}"
    _check_journal_and_store(dbname, settings.journal_file, keys)


# -- 3b. deterministic: crash after the store commit, before the journal records outcomes ----
def test_crash_between_store_commit_and_journal_outcomes(
    tmp_path: Path, store_kind: str, pg_database_if_needed: str | None,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    from bootstrap.ledger import Ledger

    settings = make_settings(tmp_path, store_kind, pg_database_if_needed,
                             embedded_workers=False, dispatch_batch_size=50)
    ledger = Ledger(settings, workers=False)
    assert ledger.dispatcher is not None and ledger.store is not None

    async def submit_all() -> list[str]:
        keys: list[str] = []
        svc = ledger.commands
        twin = str(uuid.uuid4())  # two starts of the same execution id: the second refused
        for i in range(60):
            if i % 5 == 4:
                req: Any = BulkRegisterRawDataFilesRequest.model_validate(
                    _bulk_body(i, "crash", None, n=3))
                ctype = "raw_data_file.register_bulk"
            else:
                body = _start_body(i, "crash")
                if i in (10, 11):
                    body["id"] = twin
                req, ctype = StartExecutedObsUnitRequest.model_validate(body), \
                    "executed_obs_unit.start"
            sub = await svc.submit(ctype, req, actor="fault-test", correlation_id=f"c{i}",
                                   idempotency_key=f"crash-{i}")
            keys.append(sub.entry.command_id)
        return keys

    keys = asyncio.run(submit_all())
    recorded: list[list[Outcome]] = []
    real = Journal.record_outcomes

    def crash_once(self: Journal, outcomes: Any) -> None:
        outcomes = list(outcomes)
        if not recorded:
            recorded.append(outcomes)
            raise RuntimeError("simulated crash after the event store commit")
        real(self, outcomes)

    monkeypatch.setattr(Journal, "record_outcomes", crash_once)
    with pytest.raises(RuntimeError, match="simulated crash"):
        ledger.dispatcher.dispatch_once()
    [first] = recorded
    assert len(first) == 50
    events_before = _count_events(ledger.store)
    assert events_before > 0, "the first batch should be in the store"
    assert ledger.journal.depth() == len(keys), "nothing recorded in the journal"
    ledger.stop()  # the process "dies" here
    monkeypatch.setattr(Journal, "record_outcomes", real)

    # a new process: the same journal, the same store
    ledger = Ledger(settings, workers=False)
    try:
        assert ledger.dispatcher is not None and ledger.store is not None
        ledger.dispatcher.drain(timeout=30)
        assert ledger.journal.depth() == 0
        by_seq = {o.seq: o for o in first}
        entries = [ledger.journal.get(k) for k in keys]
        assert all(e is not None for e in entries)
        for e in entries:
            assert e is not None
            o = by_seq.get(e.seq)
            if o is None:  # the second batch: never tried before the crash
                continue
            # recognised through its receipt: the same outcome at the original position
            assert (e.status, e.position, e.reason_code) == (o.status, o.position,
                                                              o.reason_code), (e, o)
        statuses = Counter(e.status for e in entries if e is not None)
        assert statuses == {"applied": len(keys) - 1, "rejected": 1}, statuses
        twin_second = ledger.journal.get("crash-11")
        assert twin_second is not None and twin_second.reason_code == "conflict"
        # nothing applied twice: the first batch added no events, the second its own only
        applied = [e for e in entries if e is not None and e.status == "applied"]
        second = [e for e in applied if e.seq not in by_seq]
        n_events = sum(2 if e.command_type.endswith("start") else 1 + len(
            e.payload["files"]) for e in second)
        assert _count_events(ledger.store) == events_before + n_events
        positions = [e.position for e in applied]
        assert len(set(positions)) == len(positions)
        for e in applied:
            assert e.position == ledger.store.position_of(receipt_id(e.command_id))
        _check_store_once(ledger, keys)
    finally:
        ledger.stop()


def _count_events(store: Any) -> int:
    total, after = 0, 0
    while page := store.select_notifications(after, 1000):
        total += len(page)
        after = page[-1].id
    return total


def _check_store_once(ledger: Any, keys: list[str]) -> None:
    """Count every event in the store through the log: one receipt per applied command."""
    store = ledger.store
    topics: Counter[str] = Counter()
    seen: set[tuple[uuid.UUID, int]] = set()
    receipts: Counter[uuid.UUID] = Counter()
    after = 0
    while True:
        page = store.select_notifications(after, 1000)
        if not page:
            break
        for n in page:
            assert (n.originator_id, n.originator_version) not in seen
            seen.add((n.originator_id, n.originator_version))
            topics[n.topic.rsplit(":", 1)[-1]] += 1
            if "CommandReceipt" in n.topic:
                receipts[n.originator_id] += 1
        after = page[-1].id
    applied = [k for k in keys if (e := ledger.journal.get(k)) and e.status == "applied"]
    assert set(receipts) == {receipt_id(k) for k in applied}
    assert all(v == 1 for v in receipts.values())
    assert topics["ExecutedObsUnit.Started"] == sum(
        1 for k in applied if ledger.journal.get(k).command_type.endswith("start"))
