"""An outage drill over HTTP: clients command and query while PostgreSQL is cut off.

``obsledger serve`` talks to PostgreSQL through a TCP proxy
(``tests/support/tcp_proxy.py``). Automation clients (each on one persistent HTTP/1.1
connection) start executed obs units, register their files, package, finalize and stage
them, finish the units, and read back everything they wrote; an operator polls ``/health``,
``/ready`` and ``/metrics``. After ``--before-s`` the proxy is cut for ``--outage-s``, then
restored; the drill waits for the backlog to drain and the read models to catch up, and
checks in PostgreSQL itself (not through the proxy) that every acknowledged command was
applied exactly once.

    python -m bench.outage --clients 6 --outage-s 45

Figures (``BENCH <name> <value>``): answers during the outage by kind and status
(``outage_query_200`` …), ``pending_rows_served`` (rows marked pending in 200 answers during
the outage), ``commands_acknowledged``, ``commands_applied_once``, ``dropped_connections``,
the probes' latency during the outage (``health_median_ms``, ``health_max_ms`` …) and
``backlog_at_most`` (the deepest journal seen during the outage), ``stores_back_s`` and
``backlog_drained_s`` (from the restore until ``/health`` sees every part answer, then no more
pending commands than clients, while they keep commanding) and ``settled_s``
(until, the clients stopped, the journal is empty and the read models caught up).
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

# `python -m bench.x` puts bench/ on sys.path; the benchmarks import the project and bench.common
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Server,
    bench,
    bench_parser,
    make_settings,
    note,
    pg_from_args,
    service_token,
    temp_database,
    temp_dir,
)
from domain.receipts import receipt_id
from tests.support.tcp_proxy import TcpProxy

PROBES = ("/health", "/ready", "/metrics")


class Drill:
    """What every client saw, by phase."""

    def __init__(self) -> None:
        self.phase = "before"
        self.answers: Counter[tuple[str, str, int]] = Counter()  # phase, kind, status
        self.pending_rows: Counter[str] = Counter()  # phase → rows marked pending
        self.acknowledged: list[str] = []
        self.dropped = 0  # connections the server closed under a client
        self.errors: list[str] = []
        self.probe_ms: dict[str, list[float]] = {p: [] for p in PROBES}
        self.lock = threading.Lock()
        self.halt = threading.Event()
        self.clients = 0
        self.backlog = 0  # the deepest journal /health showed during the outage
        self.restored = 0.0  # monotonic time the proxy was restored
        self.stores_back_s: float | None = None  # /health first saw every part answer
        self.drained_s: float | None = None  # … and then the journal empty
        self.depths: list[tuple[float, int, int | None]] = []  # after the restore, each second


class Client(threading.Thread):
    """One HTTP/1.1 connection; a closed one is counted and opened again."""

    def __init__(self, name: str, port: int, token: str, drill: Drill) -> None:
        super().__init__(name=name, daemon=True)
        self.port, self.drill = port, drill
        self.headers = {"Authorization": f"Bearer {token}"}
        self.http = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.connect()
        return conn

    def call(self, kind: str, method: str, path: str, body: Any = None,
             key: str | None = None) -> tuple[int, Any, float]:
        headers = dict(self.headers)
        if body is not None:
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        sock = self.http.sock
        t0 = time.monotonic()
        try:
            self.http.request(method, path, json.dumps(body) if body is not None else None,
                              headers)
            r = self.http.getresponse()
            raw = r.read()
        except (OSError, http.client.HTTPException) as e:
            with self.drill.lock:
                self.drill.dropped += 1
                self.drill.errors.append(f"{method} {path}: {e!r}")
            self.http.close()
            self.http = self._connect()
            return 0, None, time.monotonic() - t0
        seconds = time.monotonic() - t0
        if r.will_close or self.http.sock is not sock:
            with self.drill.lock:
                self.drill.dropped += 1
            self.http.close()
            self.http = self._connect()
        data = json.loads(raw) if r.getheader("content-type", "").startswith(
            "application/json") else raw
        phase = self.drill.phase
        with self.drill.lock:
            self.drill.answers[(phase, kind, r.status)] += 1
            if kind == "command" and r.status == 202:
                self.drill.acknowledged.append(key or "")
            if kind == "query" and r.status == 200 and isinstance(data, dict):
                rows = data.get("items") or data.get("executions") or [data]
                rows = rows + [f for row in rows for f in row.get("files", [])]
                self.drill.pending_rows[phase] += sum(1 for x in rows if x.get("pending"))
        return r.status, data, seconds


class Automation(Client):
    def run(self) -> None:
        try:
            self._loop()
        except Exception as e:
            self.drill.errors.append(f"{self.name}: {e!r}")

    def _loop(self) -> None:
        i = 0
        first_unit: str | None = None
        while not self.drill.halt.is_set():
            tag = f"{self.name}-{i}"
            st, body, _ = self.call("command", "POST", "/executed_obs_units/start", {
                "obs_unit_id": f"OU-{tag}", "instrument": "HARPS"}, f"start-{tag}")
            if st != 202:
                continue
            unit = body["ids"]["executed_obs_unit_id"]
            first_unit = first_unit or unit
            self.call("query", "GET", f"/executed_obs_units/execution/{unit}")
            files = [{"name": f"HARPS.{tag}.{j}.fits", "relative_path": f"{tag}/{j}.fits",
                      "size": 1000 + j, "instrument": "HARPS", "file_type": "raw_science",
                      "checksum": {"algorithm": "md5", "value": uuid.uuid4().hex},
                      "executed_obs_unit_id": unit} for j in range(3)]
            st, body, _ = self.call("command", "POST", "/raw_data_files/bulk",
                                    {"files": files}, f"files-{tag}")
            ids = body["ids"]["raw_data_file_ids"] if st == 202 else []
            if ids:
                self.call("query", "GET", f"/raw_data_files/{ids[0]}")
            self.call("query", "GET", f"/raw_data_files?executed_obs_unit_id={unit}")
            if ids and i % 3 == 0:
                st, body, _ = self.call("command", "POST", "/raw_data_package", {
                    "name": f"PKG-{tag}", "executed_obs_unit_id": unit, "file_ids": ids},
                    f"package-{tag}")
                if st == 202:
                    package = body["ids"]["raw_data_package_id"]
                    self.call("command", "PUT", f"/raw_data_package/{package}/finalize", None,
                              f"finalize-{tag}")
                    self.call("query", "GET", f"/raw_data_package/{package}")
                    st, body, _ = self.call("command", "POST", "/staging/stage", {
                        "package_ids": [package], "destination": f"archive:/{tag}"},
                        f"stage-{tag}")
                    if st == 202:
                        self.call("query", "GET", f"/staging/status/{body['ids']['staging_id']}")
            self.call("command", "PUT", f"/executed_obs_units/{unit}/finish",
                      {"status": "success"}, f"finish-{tag}")
            self.call("query", "GET", f"/executed_obs_units/OU-{tag}")
            self.call("query", "GET", "/executed_obs_units?limit=10")
            self.call("query", "GET", f"/executed_obs_units/execution/{first_unit}")
            self.call("query", "GET", f"/commands/finish-{tag}")
            i += 1
            time.sleep(0.05)


class Operator(Client):
    def run(self) -> None:
        while not self.drill.halt.is_set():
            for p in PROBES:
                _, data, seconds = self.call("probe", "GET", p)
                if self.drill.phase == "outage":
                    self.drill.probe_ms[p].append(seconds * 1000)
                if p == "/health" and isinstance(data, dict):
                    if self.drill.phase == "outage":
                        self.drill.backlog = max(self.drill.backlog, data["journal"]["depth"])
                    elif self.drill.phase == "after":
                        self._after(data)
            time.sleep(0.1)

    def _after(self, health: dict[str, Any]) -> None:
        since = time.monotonic() - self.drill.restored
        d = self.drill
        if not d.depths or since - d.depths[-1][0] >= 1.0:
            d.depths.append((since, health["journal"]["depth"],
                             health["projector"]["lag_events"]))
        if d.stores_back_s is None and health["down"] == []:
            d.stores_back_s = since
        if d.stores_back_s is not None and d.drained_s is None and \
                health["journal"]["depth"] <= d.clients:  # only what is in flight
            d.drained_s = since


def _health(port: int, token: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", "/health", headers={"Authorization": f"Bearer {token}"})
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


def _until(what: str, predicate: Any, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if predicate():
            return time.monotonic() - t0
        time.sleep(0.1)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = bench_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--before-s", type=float, default=10)
    parser.add_argument("--outage-s", type=float, default=45)
    parser.add_argument("--after-s", type=float, default=10)
    args = parser.parse_args()
    pg = pg_from_args(args)
    with temp_database(pg, "obsledger_outage") as dbname, temp_dir(args.keep_dir) as data, \
            TcpProxy(pg.host, pg.port) as proxy:
        settings = make_settings(pg, dbname, data, postgres_host=proxy.host,
                                 postgres_port=proxy.port, postgres_connect_timeout=2,
                                 dispatch_retry_max_s=1.0)
        token = service_token(settings)
        with Server.obsledger(settings) as server:
            _until("the stores", lambda: _health(server.port, token)["down"] == [], 30)
            drill = Drill()
            drill.clients = args.clients
            clients: list[Client] = [Automation(f"a{n}", server.port, token, drill)
                                     for n in range(args.clients)]
            clients.append(Operator("operator", server.port, token, drill))
            for c in clients:
                c.start()
            time.sleep(args.before_s)
            drill.phase = "outage"
            proxy.cut()
            note(f"PostgreSQL cut for {args.outage_s:.0f} s")
            time.sleep(args.outage_s)
            drill.restored = time.monotonic()
            drill.phase = "after"
            proxy.restore()
            restored = drill.restored
            time.sleep(args.after_s)
            drill.halt.set()
            for c in clients:
                c.join(60)

            def settled() -> bool:
                h = _health(server.port, token)
                return h["down"] == [] and h["journal"]["depth"] == 0 and \
                    h["projector"]["lag_events"] == 0
            _until("the backlog and the read models", settled, 120)
            drain_s = time.monotonic() - restored
            counts = _health(server.port, token)["journal"]["commands"]

        with pg.connect(dbname) as conn:  # PostgreSQL itself, not through the proxy
            receipts = Counter(r[0] for r in conn.execute(
                "SELECT originator_id FROM obsledger_events WHERE topic LIKE "
                "'%CommandReceipt%'").fetchall())
            duplicates = conn.execute(
                "SELECT count(*) FROM (SELECT originator_id, originator_version FROM "
                "obsledger_events GROUP BY 1, 2 HAVING count(*) > 1) d").fetchone()[0]

    applied_once = sum(1 for k in drill.acknowledged if receipts.get(receipt_id(k)) == 1)
    for (phase, kind, status), n in sorted(drill.answers.items()):
        if phase == "outage":
            bench(f"outage_{kind}_{status}", n)
    for phase in ("before", "outage", "after"):
        bench(f"pending_rows_served_{phase}", drill.pending_rows[phase])
    bench("commands_acknowledged", len(drill.acknowledged))
    bench("commands_applied_once", applied_once)
    bench("journal_applied", counts.get("applied", 0))
    bench("journal_rejected", counts.get("rejected", 0))
    bench("events_stored_twice", int(duplicates))
    bench("dropped_connections", drill.dropped)
    for p, ms in drill.probe_ms.items():
        name = p.strip("/")
        bench(f"{name}_median_ms", statistics.median(ms))
        bench(f"{name}_p95_ms", statistics.quantiles(ms, n=20)[-1])
        bench(f"{name}_max_ms", max(ms))
    bench("backlog_at_most", drill.backlog)
    if drill.stores_back_s is not None:
        bench("stores_back_s", drill.stores_back_s)
    if drill.drained_s is not None:
        bench("backlog_drained_s", drill.drained_s)
    bench("settled_s", drain_s)
    answers_500 = sum(n for (_, _, status), n in drill.answers.items() if status >= 500
                      and status != 503)
    bench("answers_5xx_not_503", answers_500)
    note("after the restore (s, journal depth, projector lag): " + ", ".join(
        f"({t:.1f}, {d}, {lag})" for t, d, lag in drill.depths))
    for e in drill.errors[:10]:
        note(f"error: {e}")
    ok = (applied_once == len(drill.acknowledged) and not answers_500 and not drill.dropped
          and not duplicates)
    note("every acknowledged command applied exactly once, no 500, no dropped connection"
         if ok else "FAILED: see the figures above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
