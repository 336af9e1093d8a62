"""Critical-command benchmarks on PostgreSQL, each beside a baseline measured in the same run.

1. ``ack_per_s`` / ``noop_per_s`` / ``ack_ratio``: ``POST /executed_obs_units/start`` (202 once
   durably journaled) against an async no-op FastAPI endpoint, both served by uvicorn with the
   same settings and driven by the same HTTP client (wrk, else aiohttp in its own process).
   The API runs with ``serve --no-workers``: the dispatcher is not in the measured process,
   the journal fills up and is not applied during this phase.
2. ``ryw_median_ms``: with the embedded dispatcher and projector, the time from the
   ``?wait=true`` response (applied, with its log position) until
   ``GET /executed_obs_units/execution/{id}?min_position=P`` returns the row with
   ``pending: false``.
3. ``applied_per_s`` / ``baseline_applied_per_s`` / ``applied_ratio``: the dispatcher draining a
   journal of start commands into PostgreSQL, against a plain ``eventsourcing`` Application
   saving one new aggregate per transaction into the same database.
4. ``bulk_files_per_s``: the dispatcher applying ``raw_data_file.register_bulk`` commands of
   ``--bulk-files`` files each.

Usage: ``python bench/commands.py [--commands N] [--pg-host H --pg-port P --pg-user U]``
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# `python bench/x.py` puts bench/ on sys.path; the benchmarks import the project and bench.common
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Server,
    add_load_args,
    add_pg_args,
    bench,
    drain_journal,
    http_load,
    journal_commands,
    make_settings,
    note,
    pg_from_args,
    service_token,
    temp_database,
    temp_dir,
)

START_BODY = b'{"obs_unit_id":"OU-2026-0412","instrument":"HARPS"}'


# -- 1. acknowledged commands vs a no-op endpoint ------------------------------------------
def measure_ack(args: argparse.Namespace, settings: Any) -> None:
    note(f"ack: {args.rounds} paired round(s) of {args.duration}s per server after a "
         f"{args.warmup}s warm-up; API as `serve --no-workers` (dispatcher not running: "
         "commands stay journaled), journal synchronous=FULL")
    noops: list[float] = []
    acks: list[float] = []
    token = service_token(settings)  # every acknowledged request carries a verified JWT
    for rnd in range(args.rounds):
        with Server.noop() as noop:
            url = noop.url + "/noop"
            http_load(url, START_BODY, args.warmup, args.connections, args.client)
            r = http_load(url, START_BODY, args.duration, args.connections, args.client)
        _check(r, "noop")
        noops.append(r.per_s)

        with Server.obsledger(settings, "--no-workers") as api:
            url = api.url + "/executed_obs_units/start"
            http_load(url, START_BODY, args.warmup, args.connections, args.client, token)
            a = http_load(url, START_BODY, args.duration, args.connections, args.client,
                          token)
        _check(a, "ack")
        acks.append(a.per_s)
        note(f"round {rnd + 1}: noop {r.per_s:.0f}/s, ack {a.per_s:.0f}/s, ratio "
             f"{a.per_s / r.per_s:.3f} ({a.requests} acknowledged, {a.tool})")

    from infra.journal import Journal

    journal = Journal(settings.journal_file)
    counts = journal.counts()
    journal.close()
    note(f"journal after the ack phase: {counts}; figures are medians over the rounds")
    bench("ack_per_s", round(statistics.median(acks), 1))
    bench("noop_per_s", round(statistics.median(noops), 1))
    bench("ack_ratio", round(statistics.median(a / n for a, n in zip(acks, noops,
                                                                     strict=True)), 3))


def _check(r: Any, what: str) -> None:
    if r.errors or not r.requests:
        raise SystemExit(f"{what}: {r.errors} failed requests of {r.requests}")


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
    from api.runtime import Ledger
    from commands.models import StartExecutedObsUnitRequest

    n = args.commands
    ledger = Ledger(settings, workers=False)
    ledger.commands.accepted.enabled = True  # as in bulk (below)
    try:
        reqs = [StartExecutedObsUnitRequest(obs_unit_id=f"OU-{i % 97}", instrument="HARPS",
                                            metadata={"airmass": 1.12, "seq": i})
                for i in range(n)]
        asyncio.run(journal_commands(ledger, "executed_obs_unit.start", reqs))
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
    from api.runtime import Ledger
    from commands.models import BulkRegisterRawDataFilesRequest

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
        asyncio.run(journal_commands(ledger, "raw_data_file.register_bulk", reqs))
        took = drain_journal(ledger, count, "bulk")
    finally:
        ledger.stop()
    note(f"bulk: {count} register_bulk commands x {per} files drained in {took:.2f}s")
    bench("bulk_files_per_s", round(count * per / took, 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pg_args(p)
    add_load_args(p)
    p.add_argument("--commands", type=int, default=20_000,
                   help="start commands the dispatcher applies (applied_per_s)")
    p.add_argument("--baseline-commands", type=int, default=3_000,
                   help="aggregates the one-per-transaction baseline saves")
    p.add_argument("--bulk-commands", type=int, default=10)
    p.add_argument("--bulk-files", type=int, default=5_000)
    p.add_argument("--ryw-samples", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5,
                   help="paired HTTP rounds (noop, then ack); medians count")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--only", nargs="*", choices=["ack", "ryw", "applied", "bulk"])
    args = p.parse_args(argv)
    only = set(args.only or ["ack", "ryw", "applied", "bulk"])
    pg = pg_from_args(args)

    with temp_database(pg, "obsledger_bench") as db, temp_dir(args.keep_dir) as tmp:
        def settings(phase: str, **kw: Any) -> Any:
            return make_settings(pg, db, tmp / phase, **kw)

        if "ack" in only:
            measure_ack(args, settings("ack"))
        if "ryw" in only:
            measure_ryw(args, settings("ryw"))
        if "applied" in only:
            measure_applied(args, settings("applied"))
        if "bulk" in only:
            measure_bulk(args, settings("bulk"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
