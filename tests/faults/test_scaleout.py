"""More than one API process on one PostgreSQL store (journal slots, api/scaleout.py), each a
real ``obsledger serve`` process: a SIGKILLed process loses nothing it acknowledged, an
Idempotency-Key is one command whichever process a retry reaches, per-entity order holds
for a client that waits for each acknowledgement, and one process leads the projector."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from domain.receipts import receipt_id
from infra.settings import Settings
from tests.conftest import PG_HOST, PG_PORT, PG_USER, ServerProcess, grant, make_settings
from tests.http.test_api import file_spec

RECEIPT = "CommandReceipt.Recorded"


class Servers:
    """Every server a test starts; teardown stops whatever still runs."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started: list[ServerProcess] = []

    def start(self, *extra: str) -> ServerProcess:
        server = ServerProcess(self.settings, *extra)
        self.started.append(server)
        return server

    def stop_all(self) -> None:
        for s in self.started:
            if s.proc.poll() is None:
                s.stop()


@pytest.fixture
def dbname(pg_database: Callable[[], str]) -> str:
    return pg_database()


@pytest.fixture
def settings(tmp_path: Path, dbname: str) -> Settings:
    return make_settings(tmp_path, "postgres", dbname, journal_slots=True,
                         missing_target_deadline_s=60)


@pytest.fixture
def auth(settings: Settings) -> dict[str, str]:
    return grant(settings)


@pytest.fixture
def servers(settings: Settings) -> Iterator[Servers]:
    reg = Servers(settings)
    try:
        yield reg
    finally:
        reg.stop_all()


def _events(dbname: str) -> list[tuple[uuid.UUID, str, int]]:
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=dbname,
                         autocommit=True, connect_timeout=3) as conn:
        rows = conn.execute("SELECT originator_id, topic, notification_id FROM obsledger_events "
                            "ORDER BY notification_id").fetchall()
    return [(r[0], str(r[1]), int(r[2])) for r in rows]


def _receipts(dbname: str) -> Counter[uuid.UUID]:
    return Counter(o for o, t, _ in _events(dbname) if t.endswith(RECEIPT))


def _until(what: str, predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _command(c: httpx.Client, key: str) -> dict[str, Any]:
    r = c.get(f"/commands/{key}")
    return r.json() if r.status_code == 200 else {"status": r.status_code}


def _slots(settings: Settings) -> list[Path]:
    return sorted(settings.journal_file.parent.glob("journal-*.sqlite3"))


def _journal_status(path: Path) -> Counter[str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return Counter(r[0] for r in conn.execute("SELECT status FROM commands"))
    finally:
        conn.close()


def _start(i: int, tag: str) -> dict[str, Any]:
    return {"obs_unit_id": f"OU-{tag}-{i}", "instrument": "HARPS"}


def test_each_process_has_its_own_journal_and_one_leads(
        settings: Settings, servers: Servers, auth: dict[str, str], dbname: str) -> None:
    a, b = servers.start(), servers.start()
    with httpx.Client(base_url=a.url, headers=auth, timeout=30) as ca, \
            httpx.Client(base_url=b.url, headers=auth, timeout=30) as cb:
        ra = ca.post("/executed_obs_units/start?wait=true", json=_start(1, "own"))
        rb = cb.post("/executed_obs_units/start?wait=true", json=_start(2, "own"))
        assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
        slots = _slots(settings)
        assert [p.name for p in slots] == ["journal-0.sqlite3", "journal-1.sqlite3"]
        assert [_journal_status(p) for p in slots] == [Counter(applied=1)] * 2
        # the projector runs in one process only, and each process's queries see it
        pos = max(ra.json()["position"], rb.json()["position"])
        for c in (ca, cb):
            r = c.get("/executed_obs_units", params={"min_position": pos})
            assert r.status_code == 200, r.text
            rows = {u["obs_unit_id"]: u for u in r.json()["items"]}
            assert {"OU-own-1", "OU-own-2"} <= set(rows)
            assert not any(u["pending"] for u in rows.values())
        reports = [c.get("/health").json()["processes"] for c in (ca, cb)]
        assert sorted(r["journal_slot"] for r in reports) == [0, 1]
        assert sorted(r["leader"] for r in reports) == [False, True]
        assert all(r["other_journals_depth"] == 0 for r in reports)
    with psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
                         autocommit=True) as conn:
        holders = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid=l.pid "
            "WHERE l.locktype='advisory' AND a.datname=%s AND l.granted", (dbname,)).fetchone()
    assert holders is not None and holders[0] == 1


def test_sigkilled_process_loses_nothing_it_acknowledged(
        settings: Settings, servers: Servers, auth: dict[str, str], dbname: str) -> None:
    # A only journals (no dispatcher): everything it acknowledged is still pending when
    # it is killed; B, a peer, adopts A's journal and applies it
    a = servers.start("--no-workers")
    b = servers.start()
    sent: list[tuple[str, str]] = []
    with httpx.Client(base_url=a.url, headers=auth, timeout=30) as ca:
        for i in range(40):
            key = f"kill-{i}"
            r = ca.post("/executed_obs_units/start", json=_start(i, "kill"),
                        headers={"Idempotency-Key": key})
            assert r.status_code == 202, r.text
            sent.append((key, r.json()["ids"]["executed_obs_unit_id"]))
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    orphan = _slots(settings)[0]
    assert _journal_status(orphan)["accepted"] == 40  # journaled durably, not applied
    _until("the orphaned journal applied",
           lambda: _journal_status(orphan) == Counter(applied=40), 60)
    receipts = _receipts(dbname)
    assert receipts == Counter({receipt_id(k): 1 for k, _ in sent})
    with httpx.Client(base_url=b.url, headers=auth, timeout=30) as cb:
        # the peer answers for the dead process's commands (its journal is read)
        assert {_command(cb, k)["status"] for k, _ in sent} == {"applied"}
    started = Counter(o for o, t, _ in _events(dbname) if t.endswith("ExecutedObsUnit.Started"))
    assert started == Counter({uuid.UUID(u): 1 for _, u in sent})
    # A comes back: it claims a free slot and answers; its old commands are not applied twice
    a2 = servers.start()
    with httpx.Client(base_url=a2.url, headers=auth, timeout=30) as c:
        r = c.post("/executed_obs_units/start", json=_start(0, "kill"),
                   headers={"Idempotency-Key": "kill-0"})
        assert r.status_code == 202 and r.headers["Idempotent-Replayed"] == "true"
        assert r.json()["ids"]["executed_obs_unit_id"] == sent[0][1]
        assert _command(c, "kill-0")["status"] == "applied"
    assert _receipts(dbname) == receipts


def test_a_killed_process_applies_its_journal_when_it_returns(
        settings: Settings, servers: Servers, auth: dict[str, str], dbname: str) -> None:
    # alone: no peer adopts its journal; the restarted process claims the free slot
    a = servers.start("--no-workers")
    with httpx.Client(base_url=a.url, headers=auth, timeout=30) as ca:
        keys = []
        for i in range(10):
            r = ca.post("/executed_obs_units/start", json=_start(i, "back"),
                        headers={"Idempotency-Key": f"back-{i}"})
            assert r.status_code == 202, r.text
            keys.append(f"back-{i}")
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    [slot] = _slots(settings)
    assert _journal_status(slot) == Counter(accepted=10)
    back = servers.start()
    _until("its journal applied", lambda: _journal_status(slot) == Counter(applied=10), 60)
    assert _slots(settings) == [slot]  # it took its own slot back
    assert _receipts(dbname) == Counter({receipt_id(k): 1 for k in keys})
    with httpx.Client(base_url=back.url, headers=auth, timeout=30) as c:
        report = c.get("/health").json()["processes"]
        assert report["journal_slot"] == 0 and report["leader"] is True


def test_sigkill_under_load_applies_every_acknowledged_command(
        settings: Settings, servers: Servers, auth: dict[str, str], dbname: str) -> None:
    a, b = servers.start(), servers.start()
    acked: list[tuple[str, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=a.url, headers=auth, timeout=5) as c:
            i = 0
            while not stop.is_set():
                key = f"load-{i}"
                try:
                    r = c.post("/executed_obs_units/start", json=_start(i, "load"),
                               headers={"Idempotency-Key": key})
                except httpx.HTTPError:
                    return  # the process is gone: what was not answered was not promised
                if r.status_code == 202:
                    acked.append((key, r.json()["ids"]["executed_obs_unit_id"]))
                i += 1

    t = threading.Thread(target=load)
    t.start()
    _until("commands acknowledged", lambda: len(acked) >= 100, 60)
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait(10)
    stop.set()
    t.join(30)
    receipts = _until("every acknowledged command applied",
                      lambda: (r := _receipts(dbname)) and
                      {receipt_id(k) for k, _ in acked} <= set(r) and r, 60)
    assert all(n == 1 for n in receipts.values())
    started = Counter(o for o, t, _ in _events(dbname) if t.endswith("ExecutedObsUnit.Started"))
    assert {uuid.UUID(u) for _, u in acked} <= set(started)
    assert all(n == 1 for n in started.values())
    with httpx.Client(base_url=b.url, headers=auth, timeout=30) as cb:
        assert cb.get("/health").status_code == 200


def test_idempotency_key_is_one_command_across_processes(
        settings: Settings, servers: Servers, auth: dict[str, str], dbname: str) -> None:
    a, b = servers.start(), servers.start()
    with httpx.Client(base_url=a.url, headers=auth, timeout=30) as ca, \
            httpx.Client(base_url=b.url, headers=auth, timeout=30) as cb:
        key = {"Idempotency-Key": "night-1121-start-7"}
        first = ca.post("/executed_obs_units/start", json=_start(7, "idem"), headers=key)
        assert first.status_code == 202, first.text
        # the retry reaches the other process: the first answer, replayed
        retry = cb.post("/executed_obs_units/start", json=_start(7, "idem"), headers=key)
        assert retry.status_code == 202 and retry.headers["Idempotent-Replayed"] == "true"
        assert retry.json() == first.json()
        # another request under the same key, on the other process: refused
        other = cb.post("/executed_obs_units/start", json=_start(8, "idem"), headers=key)
        assert other.status_code == 409, other.text

        # both processes get the same key at once (neither has journaled it yet)
        answers: list[httpx.Response] = []
        barrier = threading.Barrier(2)

        def send(c: httpx.Client) -> None:
            barrier.wait()
            answers.append(c.post("/executed_obs_units/start", json=_start(9, "idem"),
                                  headers={"Idempotency-Key": "race-9"}))

        threads = [threading.Thread(target=send, args=(c,)) for c in (ca, cb)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [r.status_code for r in answers] == [202, 202]
        assert answers[0].json()["ids"] == answers[1].json()["ids"]
        unit = uuid.UUID(answers[0].json()["ids"]["executed_obs_unit_id"])
        for client in (ca, cb):
            def applied(c: httpx.Client = client) -> bool:
                return bool(_command(c, "race-9")["status"] == "applied")

            _until("the command applied", applied)
        positions = {_command(c, "race-9")["position"] for c in (ca, cb)}
        assert len(positions) == 1  # one outcome, whichever process answers
    receipts = _receipts(dbname)
    assert receipts[receipt_id("race-9")] == 1
    assert receipts[receipt_id("night-1121-start-7")] == 1
    started = Counter(o for o, t, _ in _events(dbname) if t.endswith("ExecutedObsUnit.Started"))
    assert started[unit] == 1 and len(started) == 2


def test_order_kept_for_a_client_that_waits_for_each_acknowledgement(
        settings: Settings, servers: Servers, auth: dict[str, str], dbname: str) -> None:
    # A journals without applying (its dispatcher is held back: --no-workers), so without
    # the order rule B would finalize the package before A's files are added
    a, b = servers.start("--no-workers"), servers.start()
    with httpx.Client(base_url=a.url, headers=auth, timeout=30) as ca, \
            httpx.Client(base_url=b.url, headers=auth, timeout=30) as cb:
        r = cb.post("/raw_data_package?wait=true", json={
            "name": "P-order", "files": [file_spec("order-1.fits", 10)]})
        assert r.status_code == 200, r.text
        pkg = r.json()["ids"]["raw_data_package_id"]
        files = cb.post("/raw_data_files/bulk?wait=true", json={"files": [
            file_spec("order-2.fits", 20), file_spec("order-3.fits", 30)]})
        assert files.status_code == 200, files.text
        add = ca.post(f"/raw_data_package/{pkg}/files",
                      json={"file_ids": files.json()["ids"]["raw_data_file_ids"]},
                      headers={"Idempotency-Key": "order-add"})
        assert add.status_code == 202, add.text
        fin = cb.put(f"/raw_data_package/{pkg}/finalize",
                     headers={"Idempotency-Key": "order-finalize"})
        assert fin.status_code == 202, fin.text
        time.sleep(1.5)  # B's dispatcher has had many turns: the finalize still waits
        waiting = _command(cb, "order-finalize")
        assert waiting["status"] == "accepted" and waiting["reason_code"] == "waiting", waiting
        a.proc.send_signal(signal.SIGKILL)  # B adopts A's journal: add, then finalize
        a.proc.wait(10)
        done = _until("the finalize applied",
                      lambda: (c := _command(cb, "order-finalize"))["status"] == "applied"
                      and c, 60)
        r = cb.get(f"/raw_data_package/{pkg}", params={"min_position": done["position"]})
        assert r.status_code == 200, r.text
        p = r.json()
        assert (p["status"], p["file_count"], p["total_size"]) == ("complete", 3, 60)
    receipts = {o: pos for o, t, pos in _events(dbname) if t.endswith(RECEIPT)}
    assert receipts[receipt_id("order-add")] < receipts[receipt_id("order-finalize")]


def test_serve_workers_runs_processes_with_their_own_journals(
        tmp_path: Path, dbname: str) -> None:
    settings = make_settings(tmp_path, "postgres", dbname)  # --workers sets the slots itself
    auth = grant(settings)
    server = ServerProcess(settings, "--workers", "2")
    try:
        with httpx.Client(base_url=server.url, headers=auth, timeout=30) as c:
            for i in range(20):  # new connections: the kernel spreads them over both
                r = httpx.post(f"{server.url}/executed_obs_units/start?wait=true",
                               json=_start(i, "workers"), headers=auth, timeout=30)
                assert r.status_code == 200, r.text
            _until("both processes up", lambda: len(_slots(settings)) == 2, 30)
            assert c.get("/health").status_code == 200
        total = sum(_journal_status(p)["applied"] for p in _slots(settings))
        assert total == 20
        assert len(_receipts(dbname)) == 20
    finally:
        server.stop()
        assert server.proc.returncode is not None
    assert isinstance(server.proc, subprocess.Popen)


def _workers_of(pid: int) -> set[int]:
    """The API processes uvicorn's supervisor ``pid`` runs (not multiprocessing's helpers)."""
    found = set()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in map(int, children):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmdline and b"resource_tracker" not in cmdline:
            found.add(child)
    return found


def test_serve_workers_a_sigkilled_worker_loses_nothing_and_is_replaced(
        tmp_path: Path, dbname: str) -> None:
    settings = make_settings(tmp_path, "postgres", dbname)
    auth = grant(settings)
    server = ServerProcess(settings, "--workers", "2")
    try:
        workers = _until("two API processes", lambda: len(w := _workers_of(server.proc.pid))
                         == 2 and w, 30)
        keys = []
        for i in range(30):
            r = httpx.post(f"{server.url}/executed_obs_units/start", json=_start(i, "wk"),
                           headers={**auth, "Idempotency-Key": f"wk-{i}"}, timeout=30)
            assert r.status_code == 202, r.text
            keys.append(f"wk-{i}")
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _until("every acknowledged command applied",
               lambda: set(_receipts(dbname)) >= {receipt_id(k) for k in keys}, 60)
        assert all(n == 1 for n in _receipts(dbname).values())
        # the supervisor started another process in the dead one's place
        _until("a replacement process", lambda: len(w := _workers_of(server.proc.pid)) == 2
               and victim not in w, 30)
        r = httpx.post(f"{server.url}/executed_obs_units/start?wait=true",
                       json=_start(99, "wk"), headers=auth, timeout=30)
        assert r.status_code == 200, r.text
    finally:
        server.stop()
