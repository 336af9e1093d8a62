"""Degraded reads: the stores cut off while clients query and command a real server.

The server under test (``obsledger serve``, uvicorn) talks to PostgreSQL through
``tests.support.tcp_proxy.TcpProxy``; the test cuts the proxy and checks, over persistent HTTP/1.1
connections (``http.client``: one socket per client, a reconnect would be seen), that
- what the journal can answer is answered 200 from it: rows ``pending: true``,
  ``read_models: "unavailable"``, header ``X-Read-Models: unavailable``;
- everything else is 503 in the error format with Retry-After, never a 500, and the same
  connection carries the next request (a command, acknowledged);
- ``/health``, ``/ready`` and ``/metrics`` answer at once and say which part is down;
- afterwards every acknowledged command is applied exactly once (PostgreSQL itself tells).
"""

from __future__ import annotations

import asyncio
import http.client
import json
import statistics
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from bootstrap.ledger import Ledger
from commands.results import MaterializeObservationResultsRequest
from domain.raw_data import raw_data_file_id
from domain.receipts import receipt_id
from infra.event_store import StoreUnavailable
from tests.conftest import grant, make_settings
from tests.faults import test_faults as faults
from tests.faults.test_faults import (
    RECEIPT,
    _Children,
    _journal_rows,
    _pg_events,
    _proxied_settings,
    _start_server,
    _until,
)
from tests.support.tcp_proxy import TcpProxy

# the fault tests' fixtures: the server's children, PostgreSQL's proxy, a clean environment
children = faults.children
pg_proxy = faults.pg_proxy
_no_stray_env = faults._no_stray_env

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

PROBES = ("/health", "/ready", "/metrics")
#: the server without the workers these tests do not use, probing the stores often
QUIET: dict[str, Any] = {"embedded_downloader": False, "embedded_processing_worker": False,
                         "health_probe_s": 0.2}


# -- a client on one persistent connection ---------------------------------------------------
@dataclass
class Answer:
    method: str
    path: str
    status: int
    headers: dict[str, str]
    body: Any
    seconds: float

    @property
    def json(self) -> dict[str, Any]:
        assert isinstance(self.body, dict), self.body
        return self.body


class Conn:
    """One HTTP/1.1 connection kept open for every request: it fails the test if the
    server closes it (http.client would otherwise reconnect silently)."""

    def __init__(self, port: int, auth: dict[str, str], timeout: float = 30.0) -> None:
        self.http = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
        self.http.connect()
        self.sock = self.http.sock
        self.auth = auth
        self.answers: list[Answer] = []

    def request(self, method: str, path: str, body: Any = None,
                key: str | None = None, form: str | None = None) -> Answer:
        headers = dict(self.auth)
        data = form
        if form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        if body is not None:
            headers["Content-Type"] = "application/json"
            data = json.dumps(body)
        if key is not None:
            headers["Idempotency-Key"] = key
        t0 = time.monotonic()
        self.http.request(method, path, body=data, headers=headers)
        r = self.http.getresponse()
        raw = r.read()
        seconds = time.monotonic() - t0
        assert not r.will_close and self.http.sock is self.sock, \
            f"{method} {path} ({r.status}): the server closed the connection"
        kind = r.getheader("content-type", "")
        answer = Answer(method, path, r.status, {k.lower(): v for k, v in r.getheaders()},
                        json.loads(raw) if kind.startswith("application/json") else raw,
                        seconds)
        self.answers.append(answer)
        return answer

    def get(self, path: str) -> Answer:
        return self.request("GET", path)

    def close(self) -> None:
        self.http.close()


def _unavailable(a: Answer) -> None:
    """503 in the error format, with Retry-After."""
    assert a.status == 503, (a.path, a.status, a.body)
    assert a.json["status_code"] == 503 and a.json["detail"].startswith("Service unavailable")
    assert a.json["errors"] == []
    assert int(a.headers["retry-after"]) > 0


def _from_journal(a: Answer) -> dict[str, Any]:
    """200 from the journal alone, and said so."""
    assert a.status == 200, (a.path, a.status, a.body)
    assert a.headers.get("x-read-models") == "unavailable", a.headers
    return a.json


def _files(tag: str, unit: str | None, n: int) -> list[dict[str, Any]]:
    return [{"name": f"HARPS.{tag}.{j:04d}.fits", "relative_path": f"{tag}/{j:04d}.fits",
             "size": 1000 + j, "checksum": {"algorithm": "md5", "value": uuid.uuid4().hex},
             "instrument": "HARPS", "file_type": "raw_science",
             **({"executed_obs_unit_id": unit} if unit else {})} for j in range(n)]


def _check_applied_once(dbname: str, journal: Path, keys: list[str]) -> None:
    """Each acknowledged command applied exactly once: one receipt, the journal says
    applied at that receipt's position, no event stored twice."""
    ev = _pg_events(dbname)
    assert len({(o, v) for o, v, _, _ in ev.rows}) == len(ev.rows)
    receipts = ev.of(RECEIPT)
    assert all(n == 1 for n in receipts.values()), "a receipt recorded twice"
    assert {receipt_id(k) for k in keys} <= set(receipts)
    positions = ev.receipt_positions()
    rows = {cid: (status, pos) for cid, _, status, pos in _journal_rows(journal)}
    for k in keys:
        assert rows[k] == ("applied", positions[receipt_id(k)]), (k, rows[k])


def _wait_all_up(c: Conn, timeout: float = 30) -> dict[str, Any]:
    def up() -> dict[str, Any] | None:
        h = c.get("/health").json
        return h if h["down"] == [] and h["journal"]["depth"] == 0 else None
    return dict(_until("every store to answer and the journal to drain", up, timeout, 0.1))


# -- 1. the whole database cut: what an operator and a dashboard see -------------------------
def test_queries_during_a_store_outage(tmp_path: Path, pg_database: Callable[[], str],
                                       pg_proxy: TcpProxy, children: _Children) -> None:
    dbname = pg_database()
    settings = _proxied_settings(tmp_path, dbname, pg_proxy, **QUIET)
    server = _start_server(children, settings)
    c = Conn(server.port, grant(settings))
    keys: list[str] = []

    def command(method: str, path: str, body: Any, key: str) -> dict[str, Any]:
        a = c.request(method, path, body, key)
        assert a.status == 202, (path, a.status, a.body)
        keys.append(key)
        return a.json

    _until("the stores to answer", lambda: c.get("/health").json["down"] == [], 20)
    before = command("POST", "/executed_obs_units/start", {
        "obs_unit_id": "OU-BEFORE", "instrument": "HARPS"}, "before-start")
    old_unit = before["ids"]["executed_obs_unit_id"]
    _until("the unit projected", lambda: c.get(
        f"/executed_obs_units/execution/{old_unit}").json["pending"] is False, 20)

    pg_proxy.cut()
    down = _until("/health to say both stores are down", lambda: (
        h := c.get("/health").json)["down"][:2] == ["event_store", "read_models"] and h, 10)
    assert down["status"] == "degraded"
    assert down["parts"]["event_store"]["reachable"] is False
    assert down["parts"]["read_models"]["error"]

    # what the journal cannot answer: 503 — and the same connection carries a command at once
    _unavailable(a := c.get(f"/executed_obs_units/execution/{old_unit}"))
    assert a.headers["x-read-models"] == "unavailable"
    unit = command("POST", "/executed_obs_units/start", {
        "obs_unit_id": "OU-OUTAGE", "instrument": "HARPS",
        "metadata": {"night": "outage"}}, "outage-start")["ids"]["executed_obs_unit_id"]

    # an execution started during the outage, from the journal
    row = _from_journal(c.get(f"/executed_obs_units/execution/{unit}"))
    assert row["id"] == unit and row["status"] == "running" and row["pending"] is True
    assert row["read_models"] == "unavailable" and row["command_status"] == "accepted"
    assert row["pending_command_ids"] == ["outage-start"]
    command("PUT", f"/executed_obs_units/{unit}/finish", {"status": "success"},
            "outage-finish")
    row = _from_journal(c.get(f"/executed_obs_units/execution/{unit}"))
    assert row["status"] == "success"
    assert row["pending_command_ids"] == ["outage-start", "outage-finish"]
    of_unit = _from_journal(c.get("/executed_obs_units/OU-OUTAGE"))
    assert [e["id"] for e in of_unit["executions"]] == [unit]
    assert of_unit["read_models"] == "unavailable" and of_unit["read_model_position"] >= 1

    # its files, in a list too (the first page: pending rows only, total unknown)
    files = _files("outage", unit, 3)
    ids = command("POST", "/raw_data_files/bulk", {"files": files},
                  "outage-files")["ids"]["raw_data_file_ids"]
    assert ids == [str(raw_data_file_id("HARPS", f["name"])) for f in files]
    row = _from_journal(c.get(f"/raw_data_files/{ids[0]}"))
    assert row["name"] == files[0]["name"] and row["executed_obs_unit_id"] == unit
    assert row["pending"] is True and row["read_models"] == "unavailable"
    page = _from_journal(c.get(f"/raw_data_files?executed_obs_unit_id={unit}"))
    assert sorted(i["id"] for i in page["items"]) == sorted(ids)
    assert page["total"] is None and page["pending_count"] == 3
    assert page["read_models"] == "unavailable"
    assert all(i["read_models"] == "unavailable" for i in page["items"])
    _unavailable(c.get(f"/raw_data_files?executed_obs_unit_id={unit}&offset=100"))
    listed = _from_journal(c.get("/executed_obs_units"))
    assert [i["id"] for i in listed["items"]] == [unit]  # the projected one is not known

    # its package (made of those files) and a staging request for it
    package = command("POST", "/raw_data_package", {
        "name": "PKG-OUTAGE", "executed_obs_unit_id": unit, "file_ids": ids},
        "outage-package")["ids"]["raw_data_package_id"]
    pkg = _from_journal(c.get(f"/raw_data_package/{package}"))
    assert pkg["status"] == "building" and pkg["file_count"] == 3
    assert pkg["total_size"] == sum(f["size"] for f in files)
    assert sorted(f["id"] for f in pkg["files"]) == sorted(ids)
    assert all(f["package_id"] == package and f["pending"] for f in pkg["files"])
    command("PUT", f"/raw_data_package/{package}/finalize", None, "outage-finalize")
    assert _from_journal(c.get(f"/raw_data_package/{package}"))["status"] == "complete"
    staging = command("POST", "/staging/stage", {
        "package_ids": [package], "destination": "archive:/outage"},
        "outage-stage")["ids"]["staging_id"]
    st = _from_journal(c.get(f"/staging/status/{staging}"))
    assert st["status"] == "pending" and st["package_ids"] == [package] and st["pending"]
    # … in the lists of packages and of the staging queue (the first page, total unknown)
    a = c.get("/raw_data_package?status=complete")
    packages = _from_journal(a)
    assert [p["id"] for p in packages["items"]] == [package] and packages["total"] is None
    assert packages["items"][0]["read_models"] == "unavailable" and "link" not in a.headers
    queue = _from_journal(c.get("/staging"))
    assert [s["id"] for s in queue["items"]] == [staging] and queue["total"] is None
    assert queue["items"][0]["pending"] and queue["pending_count"] == 1
    _unavailable(c.get("/staging?offset=100"))

    # the other command families the overlay knows: results, MAST downloads
    rid = command("POST", "/observation_results/materialize", {
        "observation_id": 77, "request_id": 7}, "outage-materialize",
    )["ids"]["observation_result_ids"][0]
    command("POST", f"/observation_results/{rid}/dispatch", {}, "outage-dispatch")
    result = _from_journal(c.get(f"/observation_results/{rid}"))
    assert result["fulfillment_status"] == "dispatched" and result["pending"]
    assert [t["status"] for t in result["tasks"]] == ["open"]
    results = _from_journal(c.get("/observation_results?request_id=7"))
    assert [r["id"] for r in results["items"]] == [rid]
    job = command("POST", "/mast/download/start", {
        "products": [{"data_uri": "mast:HST/product/u9o40504m_c3m.fits", "size": 207360}],
        "destination": "outage"}, "outage-download")["ids"]["download_job_id"]
    dl = _from_journal(c.get(f"/mast/download/progress/{job}"))
    assert dl["status"] == "requested" and dl["pending"] and dl["read_models"] == "unavailable"
    assert [j["id"] for j in _from_journal(c.get("/mast/download/jobs"))["items"]] == [job]

    # nothing the journal knows: 503 (not 404: the read models might know it)
    for path in (f"/raw_data_files/{uuid.uuid4()}", f"/staging/status/{uuid.uuid4()}",
                 "/executed_obs_units/OU-BEFORE", "/observation_results/counts",
                 "/observation_results/due", "/products", f"/products/{uuid.uuid4()}",
                 f"/products/{uuid.uuid4()}/download", f"/products/{uuid.uuid4()}/lineage",
                 "/ops/jobs", "/mast/download/resumable", "/auth/me", "/audit/events",
                 f"/audit/trail/{unit}", "/audit/requests", "/raw_data_package/counts",
                 "/staging/counts", "/executed_obs_units/counts", "/raw_data_files/counts",
                 "/mast/download/counts", "/ops/jobs/counts", "/products/counts"):
        _unavailable(c.get(path))
        # … and the connection is still there for the next command
        command("POST", "/executed_obs_units/start", {"obs_unit_id": "OU-NEXT",
                                                      "instrument": "HARPS"},
                f"after-503-{len(keys)}")

    _unavailable(c.request("POST", "/auth/token", form="username=admin&password=wrong-pw"))

    # where a command stands: from the journal
    st = c.get("/commands/outage-finish")
    assert st.status == 200 and st.json["status"] == "accepted"
    assert "x-read-models" not in st.headers

    # the probes answer at once and say what is down
    for path in PROBES * 5:
        a = c.get(path)
        assert a.seconds < 0.1, (path, a.seconds)
    # accounts: the snapshot tokens are checked against could not be read again
    h = _until("accounts down", lambda: (h := c.get("/health").json)["down"] == [
        "event_store", "read_models", "accounts"] and h, 10)
    assert h["parts"]["accounts"] == {"reachable": False}
    assert h["store"] == {"kind": "postgres", "reachable": False, "head_position": None}
    assert h["journal"]["depth"] == len(keys) - 1
    ready = c.get("/ready")
    assert ready.status == 503 and ready.json["status_code"] == 503
    assert [e["field"] for e in ready.json["errors"]][:2] == [
        "store_reachable", "read_models_reachable"]
    metrics = c.get("/metrics").body.decode()
    assert "obsledger_event_store_up 0.0" in metrics
    assert "obsledger_read_models_up 0.0" in metrics

    pg_proxy.restore()
    _wait_all_up(c)
    row = c.get(f"/executed_obs_units/execution/{unit}")
    assert row.status == 200 and "x-read-models" not in row.headers
    assert row.json["read_models"] == "available" and row.json["status"] == "success"
    assert c.get(f"/executed_obs_units/execution/{old_unit}").status == 200
    assert c.get(f"/raw_data_package/{package}").json["files"][0]["pending"] is False

    statuses = Counter(a.status for a in c.answers)
    print(f"answers on one connection: {dict(statuses)}")
    assert 500 not in statuses
    c.close()
    _check_applied_once(dbname, settings.journal_file, keys)
    server.stop()


# -- 2. clients commanding and querying through an outage ------------------------------------
@dataclass
class Tally:
    by_status: Counter[tuple[str, str, int]] = field(default_factory=Counter)  # phase, what
    pending_rows: int = 0
    acknowledged: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Client(threading.Thread):
    """An automation script and its dashboard on one connection: starts units, registers
    their files, finishes them, and reads back each thing it wrote."""

    def __init__(self, n: int, port: int, auth: dict[str, str], tally: Tally,
                 phase: Callable[[], str], halt: threading.Event) -> None:
        super().__init__(name=f"client-{n}", daemon=True)
        self.n, self.port, self.auth = n, port, auth
        self.tally, self.phase, self.halt = tally, phase, halt

    def run(self) -> None:
        try:
            self._run()
        except Exception as e:  # a dropped connection, a timeout: the test fails on it
            self.tally.errors.append(f"{self.name}: {e!r}")

    def _note(self, what: str, a: Answer) -> None:
        with self.tally.lock:
            self.tally.by_status[(self.phase(), what, a.status)] += 1
            if a.status == 200 and isinstance(a.body, dict):
                rows = a.body.get("items") or a.body.get("executions") or [a.body]
                self.tally.pending_rows += sum(1 for r in rows if r.get("pending"))

    def _command(self, c: Conn, method: str, path: str, body: Any, key: str) -> Answer:
        a = c.request(method, path, body, key)
        self._note("command", a)
        if a.status == 202:
            with self.tally.lock:
                self.tally.acknowledged.append(key)
        return a

    def _run(self) -> None:
        c = Conn(self.port, self.auth)
        i = 0
        while not self.halt.is_set():
            tag = f"c{self.n}-{i}"
            a = self._command(c, "POST", "/executed_obs_units/start", {
                "obs_unit_id": f"OU-{tag}", "instrument": "HARPS"}, f"start-{tag}")
            unit = a.json["ids"]["executed_obs_unit_id"]
            self._note("query", c.get(f"/executed_obs_units/execution/{unit}"))
            a = self._command(c, "POST", "/raw_data_files/bulk",
                              {"files": _files(tag, unit, 2)}, f"files-{tag}")
            self._note("query", c.get(f"/raw_data_files/{a.json['ids']['raw_data_file_ids'][0]}"))
            self._note("query", c.get(f"/raw_data_files?executed_obs_unit_id={unit}"))
            self._command(c, "PUT", f"/executed_obs_units/{unit}/finish",
                          {"status": "success"}, f"finish-{tag}")
            self._note("query", c.get(f"/executed_obs_units/OU-{tag}"))
            self._note("query", c.get("/executed_obs_units?limit=5"))
            i += 1
            time.sleep(0.02)
        c.close()


def test_clients_through_a_store_outage(tmp_path: Path, pg_database: Callable[[], str],
                                        pg_proxy: TcpProxy, children: _Children) -> None:
    dbname = pg_database()
    settings = _proxied_settings(tmp_path, dbname, pg_proxy, **QUIET)
    server = _start_server(children, settings)
    auth = grant(settings)
    probe = Conn(server.port, auth)
    _until("the stores to answer", lambda: probe.get("/health").json["down"] == [], 20)
    tally, halt = Tally(), threading.Event()
    phase = ["before"]
    clients = [Client(n, server.port, auth, tally, lambda: phase[0], halt) for n in range(4)]
    for t in clients:
        t.start()
    probe_seconds: dict[str, list[float]] = {p: [] for p in PROBES}
    try:
        for p in PROBES:
            probe.get(p)  # (FastAPI builds a route's validators on its first request)
        time.sleep(2)
        phase[0] = "outage"
        pg_proxy.cut()
        cut_at = time.monotonic()
        while time.monotonic() - cut_at < 6:  # the probes, polled from the first instant
            for p in PROBES:
                a = probe.get(p)
                assert a.status in (200, 503), (p, a.status)
                probe_seconds[p].append(a.seconds)
            time.sleep(0.02)
        phase[0] = "after"
        pg_proxy.restore()
        time.sleep(2)
    finally:
        halt.set()
        for t in clients:
            t.join(30)
    assert not tally.errors, tally.errors[:5]
    _wait_all_up(probe, 60)
    probe.close()

    by = tally.by_status
    outage = Counter({(w, s): n for (ph, w, s), n in by.items() if ph == "outage"})
    print(f"outage answers {dict(outage)}; pending rows served {tally.pending_rows}; "
          f"acknowledged {len(tally.acknowledged)}")
    for p, secs in probe_seconds.items():
        print(f"{p} during the outage: n={len(secs)} median {statistics.median(secs):.4f}s "
              f"max {max(secs):.4f}s")
        assert max(secs) < 0.5 and statistics.quantiles(secs, n=10)[-1] < 0.1, (p, max(secs))
    assert not any(s == 500 for (_, _, s) in by), by
    assert outage[("command", 202)] >= 20, outage
    assert outage[("query", 200)] >= 20, outage  # pending rows answered from the journal
    assert set(s for (w, s) in outage if w == "command") == {202}, outage
    assert set(s for (w, s) in outage if w == "query") <= {200, 503}, outage
    _check_applied_once(dbname, settings.journal_file, tally.acknowledged)
    server.stop()


# -- 3. only the read models down: the event store (SQLite) keeps applying -------------------
def test_read_models_down_event_store_up(tmp_path: Path, pg_database: Callable[[], str],
                                         pg_proxy: TcpProxy, children: _Children) -> None:
    """SQLite event store, read models on PostgreSQL behind the proxy: commands are applied
    during the cut; queries answer from the journal what was applied after the read models'
    last position this server saw; the projector catches up afterwards."""
    dbname = pg_database()
    settings = make_settings(
        tmp_path, "sqlite", **QUIET, postgres_connect_timeout=2,
        read_model_url=f"postgresql+psycopg://postgres@{pg_proxy.host}:{pg_proxy.port}/{dbname}")
    server = _start_server(children, settings)
    c = Conn(server.port, grant(settings))
    _until("the stores to answer", lambda: c.get("/health").json["down"] == [], 20)
    first = c.request("POST", "/executed_obs_units/start?wait=true",
                      {"obs_unit_id": "OU-1", "instrument": "HARPS"}, "rm-1")
    assert first.status == 200
    old = first.json["ids"]["executed_obs_unit_id"]
    _until("projected", lambda: c.get(f"/executed_obs_units/execution/{old}").json[
        "pending"] is False, 20)

    pg_proxy.cut()
    _until("read models down", lambda: c.get("/health").json["down"][:1] == ["read_models"], 10)
    h = c.get("/health").json
    assert h["store"]["reachable"] is True and "event_store" not in h["down"]
    a = c.request("POST", "/executed_obs_units/start?wait=true",
                  {"obs_unit_id": "OU-2", "instrument": "HARPS"}, "rm-2")
    assert a.status == 200 and a.json["status"] == "applied"  # the event store answers
    unit = a.json["ids"]["executed_obs_unit_id"]
    row = _from_journal(c.get(f"/executed_obs_units/execution/{unit}"))
    assert row["pending"] is True and row["command_status"] == "applied"
    _unavailable(c.get(f"/executed_obs_units/execution/{old}"))
    file = {"name": "rm.fits", "relative_path": "rm.fits", "size": 10, "instrument": "HARPS",
            "checksum": {"algorithm": "md5", "value": "0" * 32}, "file_type": "raw_science"}
    fid = c.request("POST", "/raw_data_files?wait=true", file, "rm-file").json["ids"][
        "raw_data_file_id"]
    # a processing job on that file: its inputs come from the journal and the event store
    job = c.request("POST", "/ops/ingest", {"file_ids": [fid]}, "rm-ingest")
    assert job.status == 202, job.body
    jid = job.json["ids"]["processing_job_id"]
    pj = _from_journal(c.get(f"/ops/jobs/{jid}"))
    assert pj["status"] == "requested" and pj["pending"] and pj["read_models"] == "unavailable"
    assert [j["id"] for j in _from_journal(c.get("/ops/jobs"))["items"]] == [jid]
    assert c.get(f"/audit/trail/{unit}").status == 200  # the event store answers

    pg_proxy.restore()
    _wait_all_up(c)
    row = _until("projected", lambda: (a := c.get(f"/executed_obs_units/execution/{unit}"))
                 .json["pending"] is False and a, 20)
    assert row.status == 200 and "x-read-models" not in row.headers
    assert not any(x.status == 500 for x in c.answers)
    c.close()
    server.stop()


# -- 4. only the event store down: queries as usual, event-log reads 503 at once -------------
def test_event_store_down_read_models_up(tmp_path: Path, pg_database: Callable[[], str],
                                         pg_proxy: TcpProxy, children: _Children) -> None:
    """PostgreSQL event store behind the proxy, SQLite read models."""
    dbname = pg_database()
    settings = make_settings(
        tmp_path, "postgres", dbname, postgres_host=pg_proxy.host, postgres_port=pg_proxy.port,
        postgres_connect_timeout=2, dispatch_retry_max_s=1.0, **QUIET,
        read_model_url=f"sqlite:///{(tmp_path / 'read_models.sqlite3').resolve()}")
    server = _start_server(children, settings)
    c = Conn(server.port, grant(settings))
    _until("the stores to answer", lambda: c.get("/health").json["down"] == [], 20)
    for path in ("/audit/events", f"/audit/state/{uuid.uuid4()}", "/audit/verify", "/ready"):
        c.get(path)  # (FastAPI builds a route's validators on its first request: ~0.1 s)
    pg_proxy.cut()
    _until("event store down", lambda: c.get("/health").json["down"] == ["event_store"], 10)
    a = c.request("POST", "/executed_obs_units/start", {"obs_unit_id": "OU-E",
                                                        "instrument": "HARPS"}, "es-1")
    assert a.status == 202
    unit = a.json["ids"]["executed_obs_unit_id"]
    row = c.get(f"/executed_obs_units/execution/{unit}")
    assert row.status == 200 and row.json["read_models"] == "available"
    assert row.json["pending"] is True and "x-read-models" not in row.headers
    page = c.get("/executed_obs_units")
    assert page.status == 200 and page.json["total"] == 0 and page.json["pending_count"] == 1
    for path in ("/audit/events", f"/audit/state/{unit}", "/audit/verify"):
        a = c.get(path)
        _unavailable(a)
        assert a.seconds < 0.1 and "x-read-models" not in a.headers, (path, a.seconds)
    ready = c.get("/ready").json
    assert [e["field"] for e in ready["errors"]] == ["store_reachable"]
    pg_proxy.restore()
    _wait_all_up(c)
    assert c.get(f"/executed_obs_units/execution/{unit}").json["pending"] is False
    c.close()
    server.stop()


# -- 5. a long outage: the event store's connections come back at once ---------------------
def test_commands_applied_soon_after_a_long_outage(
        tmp_path: Path, pg_database: Callable[[], str], pg_proxy: TcpProxy,
        children: _Children) -> None:
    """psycopg_pool retries a lost connection after 1, 2, 4, 8, 16… s: after a 20-s outage
    its next try would come ~11 s after the store is back. The event store's pool gives up
    early instead, and connects again as soon as it is asked."""
    dbname = pg_database()
    settings = _proxied_settings(tmp_path, dbname, pg_proxy, **QUIET)
    server = _start_server(children, settings)
    c = Conn(server.port, grant(settings))
    _until("the stores to answer", lambda: c.get("/health").json["down"] == [], 20)
    assert c.request("POST", "/executed_obs_units/start?wait=true", {
        "obs_unit_id": "OU-0", "instrument": "HARPS"}, "long-0").status == 200
    pg_proxy.cut()
    keys = [f"long-{i}" for i in range(1, 6)]
    for k in keys:
        assert c.request("POST", "/executed_obs_units/start", {
            "obs_unit_id": f"OU-{k}", "instrument": "HARPS"}, k).status == 202
    c.close()
    time.sleep(20)
    pg_proxy.restore()
    restored = time.monotonic()
    c = Conn(server.port, c.auth)  # (uvicorn closes a connection idle for 5 s)
    _until("the outage's commands applied", lambda: all(
        c.get(f"/commands/{k}").json["status"] == "applied" for k in keys), 40, 0.1)
    took = time.monotonic() - restored
    print(f"applied {took:.1f}s after a 20-s outage")
    assert took < 5, took
    c.close()
    _check_applied_once(dbname, settings.journal_file, ["long-0", *keys])
    server.stop()


# -- 6. the dispatcher meets the outage inside a handler: the command waits, not rejected ----
def test_a_handler_that_meets_the_outage_leaves_its_command_waiting(
        tmp_path: Path, pg_database: Callable[[], str], pg_proxy: TcpProxy) -> None:
    """A materialization looks its cells up in the event store (``EventStore.existing``)
    before saving: the store going away there is an outage (retry), not a refusal."""
    dbname = pg_database()
    settings = _proxied_settings(tmp_path, dbname, pg_proxy)
    ledger = Ledger(settings, workers=False)
    try:
        sub = asyncio.run(ledger.commands.submit(
            "observation_result.materialize",
            MaterializeObservationResultsRequest(observation_id=5, request_id=5),
            actor="tests", correlation_id=None, idempotency_key="materialize-in-outage"))
        assert ledger.dispatcher is not None
        pg_proxy.cut()
        with pytest.raises(StoreUnavailable):
            ledger.dispatcher.dispatch_once()
        entry = ledger.journal.get("materialize-in-outage")
        assert entry is not None and entry.status == "accepted", entry
        pg_proxy.restore()
        _until("applied", lambda: ledger.dispatcher is not None and _dispatched(ledger), 20)
        entry = ledger.journal.get("materialize-in-outage")
        assert entry is not None and entry.status == "applied", entry
        assert sub.body["ids"]["observation_result_ids"]
    finally:
        ledger.stop()
    _check_applied_once(dbname, settings.journal_file, ["materialize-in-outage"])


def _dispatched(ledger: Ledger) -> bool:
    assert ledger.dispatcher is not None
    try:
        ledger.dispatcher.dispatch_once()
    except StoreUnavailable:  # the pool reconnects a moment after the network is back
        return False
    return ledger.journal.depth() == 0
