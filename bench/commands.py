"""Critical-command benchmarks on PostgreSQL, each beside a baseline measured in the same run.

1. ``ack_per_s``: ``POST /executed_obs_units/start`` (202 once durably journaled) against the
   operations seed's own design (``peer_ack_per_s``: FastAPI, the same body model and
   bearer-token dependency, the transaction ``RPUSH``ed to Redis with redis-py's asyncio
   client; ``peer_durable_ack_per_s``: Redis with ``appendfsync always``) and an async no-op
   FastAPI endpoint (``noop_per_s``, ``ack_ratio``: retired target, information), all served
   by uvicorn with the same settings and driven by the same HTTP client (wrk, else aiohttp in
   its own process). The API runs with ``serve --no-workers``: the dispatcher is not in the
   measured process, the journal fills up and is not applied during this phase.
   ``ack_p99_ms``: latency at a steady ``--steady-rate`` (open loop), on an empty journal.
1c. ``ack_scaling``: ``ack_per_s`` with ``serve --workers 2`` ÷ with one process, and beside it
   ``noop_scaling``, the no-op endpoint's own (uvicorn with 2 processes ÷ 1), in the same
   rounds, with the same client (which runs on the same cores).
2. ``ryw_median_ms``: with the embedded dispatcher and projector, the time from the
   ``?wait=true`` response (applied, with its log position) until
   ``GET /executed_obs_units/execution/{id}?min_position=P`` returns the row with
   ``pending: false``.
3. ``applied_per_s`` / ``baseline_applied_per_s`` / ``applied_ratio``: the dispatcher draining a
   journal of start commands into PostgreSQL, against a plain ``eventsourcing`` Application
   saving one new aggregate per transaction into the same database.
4. ``bulk_files_per_s``: the dispatcher applying ``raw_data_file.register_bulk`` commands of
   ``--bulk-files`` files each.

Usage: ``python -m bench.commands [--commands N] [--pg-host H --pg-port P --pg-user U]``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from commands.obs_units import ObsUnitCommand
from commands.raw_data import RawDataCommand

# `python -m bench.x` puts bench/ on sys.path; the benchmarks import the project and bench.common
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Server,
    add_load_args,
    bench,
    bench_parser,
    drain_journal,
    free_port,
    http_load,
    journal_commands,
    make_settings,
    note,
    pg_from_args,
    service_token,
    settings_env,
    steady_load,
    temp_database,
    temp_dir,
)

START_BODY = b'{"obs_unit_id":"OU-2026-0412","instrument":"HARPS"}'


# -- 1. acknowledged commands vs the seed's peer and a no-op endpoint ---------------------
def measure_ack(args: argparse.Namespace, settings: Any) -> None:
    note(f"ack: {args.rounds} round(s) of {args.duration}s per server after a {args.warmup}s "
         "warm-up each (noop, ack, peer with appendfsync everysec, peer with appendfsync "
         "always); API as `serve --no-workers` (dispatcher not running: commands stay "
         "journaled), journal synchronous=FULL")
    rates: dict[str, list[float]] = {"noop": [], "ack": [], "everysec": [], "always": []}
    token = service_token(settings)  # every acknowledged request carries a verified JWT
    measure_steady(args, settings, token)  # first: on an empty journal
    with RedisServer(settings.data_dir / "redis-everysec", "everysec") as everysec, \
            RedisServer(settings.data_dir / "redis-always", "always") as always:
        redis_of = {"everysec": everysec, "always": always}
        for rnd in range(args.rounds):
            for what in rates:
                if what == "noop":
                    server, path = Server.noop(), "/noop"
                elif what == "ack":
                    server, path = (Server.obsledger(settings, "--no-workers"),
                                    "/executed_obs_units/start")
                else:
                    server, path = Server([sys.executable, "-m", "bench.commands",
                                           "--serve-peer", "--redis-port",
                                           str(redis_of[what].port)],
                                          settings_env(settings)), "/executed_obs_units/start"
                with server:
                    url = server.url + path
                    http_load(url, START_BODY, args.warmup, args.connections, args.client,
                              token)
                    r = http_load(url, START_BODY, args.duration, args.connections,
                                  args.client, token)
                _check(r, what)
                rates[what].append(r.per_s)
            note(f"round {rnd + 1}: noop {rates['noop'][-1]:.0f}/s, ack {rates['ack'][-1]:.0f}"
                 f"/s, peer {rates['everysec'][-1]:.0f}/s, durable peer "
                 f"{rates['always'][-1]:.0f}/s ({r.tool})")
        note(f"Redis lists after the phase: {everysec.queued()} (everysec), "
             f"{always.queued()} (always) transactions")

    from infra.journal import Journal

    journal = Journal(settings.journal_file)
    counts = journal.counts()
    journal.close()
    note(f"journal after the ack phase: {counts}; figures are medians over the rounds")

    def ratio(a: list[float], b: list[float]) -> float:
        return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3)

    bench("peer_ack_per_s", round(statistics.median(rates["everysec"]), 1))
    bench("peer_durable_ack_per_s", round(statistics.median(rates["always"]), 1))
    bench("ack_per_s", round(statistics.median(rates["ack"]), 1))
    bench("ack_vs_peer_ratio", ratio(rates["ack"], rates["everysec"]))
    bench("ack_vs_durable_peer_ratio", ratio(rates["ack"], rates["always"]))
    bench("noop_per_s", round(statistics.median(rates["noop"]), 1))
    bench("ack_ratio", ratio(rates["ack"], rates["noop"]))  # retired target: information
    if args.profile:
        profile_ack(args, settings, token, args.profile)


# -- 1c. more than one API process --------------------------------------------------------
def measure_scaling(args: argparse.Namespace, settings: Any) -> None:
    """``ack_scaling``: acknowledged commands per second with ``serve --workers 2`` over
    ``serve`` (one process), each as ``--no-workers`` like ``ack_per_s``; beside it the no-op
    endpoint's own scaling (uvicorn with 1 and 2 processes), measured in the same rounds."""
    note(f"scaling: {args.rounds} round(s) of {args.duration}s per server after a "
         f"{args.warmup}s warm-up each; 1 and 2 processes (uvicorn workers on one socket); "
         f"the load generator runs on the same {os.cpu_count()} cores; load average "
         f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    token = service_token(settings)
    rates: dict[tuple[str, int], list[float]] = {
        (what, n): [] for what in ("noop", "ack") for n in (1, 2)}
    for rnd in range(args.rounds):
        for what, n in rates:
            if what == "noop":
                server, path = Server.noop(n), "/noop"
            else:
                server, path = (Server.obsledger(settings, "--no-workers", "--workers", str(n)),
                                "/executed_obs_units/start")
            with server:
                url = server.url + path
                http_load(url, START_BODY, args.warmup, args.connections, args.client, token)
                r = http_load(url, START_BODY, args.duration, args.connections, args.client,
                              token)
            _check(r, f"{what} x{n}")
            rates[(what, n)].append(r.per_s)
        note(f"round {rnd + 1}: " + ", ".join(
            f"{what} x{n} {v[-1]:.0f}/s" for (what, n), v in rates.items())
            + f" ({r.tool}); load average {os.getloadavg()[0]:.2f}")

    def scaling(what: str) -> float:
        return round(statistics.median(
            b / a for a, b in zip(rates[(what, 1)], rates[(what, 2)], strict=True)), 3)

    bench("ack_per_s_1_process", round(statistics.median(rates[("ack", 1)]), 1))
    bench("ack_per_s_2_processes", round(statistics.median(rates[("ack", 2)]), 1))
    bench("ack_scaling", scaling("ack"))
    bench("noop_scaling", scaling("noop"))


def _check(r: Any, what: str) -> None:
    if r.errors or not r.requests:
        raise SystemExit(f"{what}: {r.errors} failed requests of {r.requests}")


# -- 1b. the seed's own design: validate, RPUSH the transaction to Redis, 202 ------------
PEER_QUEUE = "critical_operations"


def peer_app(settings: Any, redis_port: int) -> Any:
    """The operations seed's ``@critical_operation`` endpoint, built faithfully: the same
    pydantic body model and the same bearer-token dependency as obsledger's route (the
    accounts snapshot of ``settings``' read-model database), then the transaction as JSON
    ``RPUSH``ed to a Redis list with redis-py's asyncio client, answered 202."""
    import json
    import uuid
    from types import SimpleNamespace

    import redis.asyncio as aioredis
    from fastapi import FastAPI, Request, Response

    from api.accounts import allow, principal_of
    from api.errors import install_error_handlers
    from commands.obs_units import StartExecutedObsUnitRequest
    from domain.accounts import CRITICAL_WRITERS
    from infra.accounts import AccountStore, Authenticator
    from infra.read_model_db import create_read_model_engine
    from infra.tokens import TokenSigner

    engine = create_read_model_engine(settings.read_model_database_url,
                                      settings.postgres_connect_timeout)
    auth = Authenticator(AccountStore(engine),
                         TokenSigner(settings.signing_secret(), settings.token_ttl_s),
                         refresh_s=settings.auth_refresh_s)
    auth.refresh()  # as obsledger's startup: the accounts read once before serving
    client = aioredis.Redis(host="127.0.0.1", port=redis_port)
    app = FastAPI()
    install_error_handlers(app)  # 401/403/422 in the same error format
    app.state.ledger = SimpleNamespace(auth=auth)  # what api.accounts' dependency reads

    async def start_unit(request: Request, body: Any) -> Response:
        principal = principal_of(request)
        transaction_id = str(uuid.uuid4())
        execution_id = str(body.id or uuid.uuid4())
        transaction = {"transaction_id": transaction_id,
                       "operation": "executed_obs_unit.start", "actor": principal.actor,
                       "timestamp": datetime.now(UTC).isoformat(),
                       "ids": {"executed_obs_unit_id": execution_id},
                       "payload": body.model_dump(mode="json")}
        await client.rpush(PEER_QUEUE, json.dumps(transaction))
        answer = {"command_id": transaction_id, "status": "accepted",
                  "ids": {"executed_obs_unit_id": execution_id}}
        return Response(json.dumps(answer), status_code=202, media_type="application/json")

    # this module's annotations are strings FastAPI cannot resolve here: give it the types
    start_unit.__annotations__ = {"request": Request, "body": StartExecutedObsUnitRequest,
                                  "return": Response}
    # the same role dependency as obsledger's route (api/obs_units.py, by
    # api.deps.command_route: allow(CRITICAL_WRITERS))
    app.post("/executed_obs_units/start", status_code=202,
             dependencies=[allow(CRITICAL_WRITERS)])(start_unit)
    return app


def _serve_peer(argv: list[str]) -> int:
    import uvicorn

    from infra.settings import Settings

    p = argparse.ArgumentParser()
    p.add_argument("--redis-port", type=int, required=True)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    # the same uvicorn settings as `obsledger serve --log-level warning --no-access-log`
    uvicorn.run(peer_app(Settings(), args.redis_port), host="127.0.0.1", port=args.port,
                log_level="warning", access_log=False, log_config=None, proxy_headers=False)
    return 0


class RedisServer:
    """``redis-server`` on a free port with an append-only file fsynced ``appendfsync``
    (``everysec``, Redis' default: up to a second of acknowledged commands can be lost;
    ``always``: fsynced before the answer, durable like the journal)."""

    def __init__(self, directory: Path, appendfsync: str) -> None:
        import shutil
        import socket
        import subprocess

        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(directory),
             "--appendonly", "yes", "--appendfsync", appendfsync, "--save", "",
             "--protected-mode", "yes"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def queued(self) -> int:
        import redis

        return int(redis.Redis(port=self.port).llen(PEER_QUEUE))

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, *_: Any) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def profile_ack(args: argparse.Namespace, settings: Any, token: str, output: Path) -> None:
    """py-spy samples ``obsledger serve --no-workers`` (every thread, native frames of C
    extensions left out) while the ack load runs; ``output`` is py-spy's raw (collapsed
    stacks) format: ``flamegraph.pl`` or speedscope read it."""
    import shutil
    import signal

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    argv = [spy, "record", "--format", "raw", "--rate", "250", "--output", str(output),
            "--", sys.executable, "-m", "api.cli", "serve", "--no-workers", "--log-level",
            "warning", "--no-access-log"]
    api = Server(argv, settings_env(settings))
    try:
        url = api.url + "/executed_obs_units/start"
        http_load(url, START_BODY, args.warmup, args.connections, args.client, token)
        r = http_load(url, START_BODY, args.duration, args.connections, args.client, token)
    finally:
        api.proc.send_signal(signal.SIGINT)  # py-spy writes the profile, stops the server
        api.proc.wait(60)
    note(f"profile: {r.per_s:.0f}/s while sampled; collapsed stacks in {output}")


def measure_steady(args: argparse.Namespace, settings: Any, token: str) -> None:
    """Latency of acknowledgements at a steady ``--steady-rate`` (open loop), beside the
    no-op's at the same rate from the same client (the floor of this machine and client)."""
    p99: dict[str, float] = {}
    for what in ("noop", "ack"):
        server = Server.noop() if what == "noop" else Server.obsledger(settings, "--no-workers")
        with server:
            url = server.url + ("/noop" if what == "noop" else "/executed_obs_units/start")
            # warmed up at the same steady rate: a flat-out warm-up leaves a backlog behind
            # it (the request audit log's rows) that the first seconds would pay for
            steady_load(url, START_BODY, args.steady_rate, args.warmup + 3, token)
            lat = sorted(steady_load(url, START_BODY, args.steady_rate, args.duration, token))
        p99[what] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        note(f"steady {what}: {len(lat)} requests at {args.steady_rate}/s for {args.duration}s "
             "(aiohttp, its own process, latency from each request's scheduled start): p50 "
             f"{lat[len(lat) // 2]:.2f} ms, p90 {lat[int(len(lat) * 0.9)]:.2f} ms, p99 "
             f"{p99[what]:.2f} ms, max {lat[-1]:.2f} ms")
    bench("ack_p99_ms", round(p99["ack"], 3))
    bench("noop_p99_ms", round(p99["noop"], 3))


# -- 2. read-your-writes -------------------------------------------------------------------
def measure_ryw(args: argparse.Namespace, settings: Any) -> None:
    import httpx

    samples: list[float] = []
    retries = 0
    auth = {"Authorization": f"Bearer {service_token(settings)}"}
    with Server.obsledger(settings) as api, httpx.Client(base_url=api.url, timeout=30,
                                                          headers=auth) as c:
        for i in range(args.ryw_samples + 20):
            r = c.post("/executed_obs_units/start?wait=true",
                       json={"obs_unit_id": f"OU-RYW-{i}", "instrument": "HARPS"})
            t0 = time.perf_counter()
            if r.status_code != 200:
                raise SystemExit(f"ryw: {r.status_code} {r.text}")
            body = r.json()
            eid, pos = body["ids"]["executed_obs_unit_id"], body["position"]
            while True:
                g = c.get(f"/executed_obs_units/execution/{eid}", params={"min_position": pos})
                if g.status_code == 200 and g.json()["pending"] is False:
                    break
                retries += 1
            t1 = time.perf_counter()
            if i >= 20:  # the first ones warm up connections and caches
                samples.append((t1 - t0) * 1000)
    samples.sort()
    note(f"ryw: {len(samples)} sequential samples, p90 {samples[int(len(samples) * 0.9)]:.2f} "
         f"ms, max {samples[-1]:.2f} ms, extra GETs {retries}; embedded dispatcher+projector")
    bench("ryw_median_ms", round(statistics.median(samples), 3))


# -- 3. applied commands vs one aggregate per transaction ----------------------------------
def measure_applied(args: argparse.Namespace, settings: Any) -> None:
    from bootstrap.ledger import Ledger
    from commands.obs_units import StartExecutedObsUnitRequest

    n = args.commands
    ledger = Ledger(settings, workers=False)
    ledger.commands.accepted.enabled = True  # as in bulk (below)
    try:
        reqs = [StartExecutedObsUnitRequest(obs_unit_id=f"OU-{i % 97}", instrument="HARPS",
                                            metadata={"airmass": 1.12, "seq": i})
                for i in range(n)]
        asyncio.run(journal_commands(ledger, ObsUnitCommand.EXECUTED_OBS_UNIT_START, reqs))
        took = drain_journal(ledger, n, "applied")
    finally:
        ledger.stop()
    applied = n / took
    note(f"applied: {n} start commands drained in {took:.2f}s (dispatch batch "
         f"{settings.dispatch_batch_size}; 2 events each: unit + receipt)")

    base = baseline_one_per_transaction(settings, args.baseline_commands)
    bench("applied_per_s", round(applied, 1))
    bench("baseline_applied_per_s", round(base, 1))
    bench("applied_ratio", round(applied / base, 3))


def baseline_one_per_transaction(settings: Any, n: int) -> float:
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate

    class BenchUnit(Aggregate):
        def __init__(self, obs_unit_id: str, instrument: str, start_time: datetime,
                     metadata: dict[str, Any]) -> None:
            self.obs_unit_id = obs_unit_id
            self.instrument = instrument
            self.start_time = start_time
            self.metadata = metadata

    class BaselineApp(Application[Any]):
        pass

    app = BaselineApp(env=settings.event_store_env())
    try:
        for i in range(20):  # warm-up
            app.save(BenchUnit(f"W-{i}", "HARPS", datetime.now(UTC), {"airmass": 1.12}))
        t = time.perf_counter()
        for i in range(n):
            app.save(BenchUnit(f"OU-{i % 97}", "HARPS", datetime.now(UTC),
                               {"airmass": 1.12, "seq": i}))
        took = time.perf_counter() - t
    finally:
        app.close()
    note(f"baseline: plain eventsourcing Application, {n} aggregates, one save "
         f"(transaction) each, same PostgreSQL database: {took:.2f}s")
    return n / took


# -- 4. bulk registration ------------------------------------------------------------------
def measure_bulk(args: argparse.Namespace, settings: Any) -> None:
    from bootstrap.ledger import Ledger
    from commands.raw_data import BulkRegisterRawDataFilesRequest

    per, count = args.bulk_files, args.bulk_commands
    ledger = Ledger(settings, workers=False)
    # this process applies what it journals, as the API with its embedded dispatcher does
    ledger.commands.accepted.enabled = True
    try:
        reqs = [BulkRegisterRawDataFilesRequest.model_validate({"files": [{
            "name": f"HARPS.bench.{c}.{i:05d}.fits",
            "relative_path": f"2026-11-21/HARPS.bench.{c}.{i:05d}.fits",
            "size": 16_793_280 + i,
            "checksum": {"algorithm": "md5", "value": f"{c:08x}{i:024x}"},
            "instrument": "HARPS", "file_type": "raw_science",
            "created_at": "2026-11-21T23:15:00Z"} for i in range(per)]})
            for c in range(count)]
        asyncio.run(journal_commands(ledger, RawDataCommand.RAW_DATA_FILE_REGISTER_BULK, reqs))
        took = drain_journal(ledger, count, "bulk")
    finally:
        ledger.stop()
    note(f"bulk: {count} register_bulk commands x {per} files drained in {took:.2f}s")
    bench("bulk_files_per_s", round(count * per / took, 1))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve-peer"]:
        return _serve_peer(argv[1:])
    p = bench_parser(__doc__)
    add_load_args(p)
    p.add_argument("--commands", type=int, default=20_000,
                   help="start commands the dispatcher applies (applied_per_s)")
    p.add_argument("--baseline-commands", type=int, default=3_000,
                   help="aggregates the one-per-transaction baseline saves")
    p.add_argument("--bulk-commands", type=int, default=10)
    p.add_argument("--bulk-files", type=int, default=5_000)
    p.add_argument("--ryw-samples", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5,
                   help="HTTP rounds (noop, ack, peer, durable peer); medians count")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steady-rate", type=int, default=1000,
                   help="commands per second of the steady load (ack_p99_ms)")
    p.add_argument("--profile", type=Path, metavar="FILE",
                   help="after the ack figures, one more ack load with py-spy sampling the "
                   "API; its collapsed stacks go to FILE")
    p.add_argument("--only", nargs="*", choices=["ack", "scaling", "ryw", "applied", "bulk"])
    args = p.parse_args(argv)
    only = set(args.only or ["ack", "scaling", "ryw", "applied", "bulk"])
    pg = pg_from_args(args)

    with temp_database(pg, "obsledger_bench") as db, temp_dir(args.keep_dir) as tmp:
        def settings(phase: str, **kw: Any) -> Any:
            return make_settings(pg, db, tmp / phase, **kw)

        if "ack" in only:
            measure_ack(args, settings("ack"))
        if "scaling" in only:
            measure_scaling(args, settings("scaling"))
        if "ryw" in only:
            measure_ryw(args, settings("ryw"))
        if "applied" in only:
            measure_applied(args, settings("applied"))
        if "bulk" in only:
            measure_bulk(args, settings("bulk"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
