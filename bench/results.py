"""Observation results at scale (issue: observation results), on PostgreSQL.

1. ``--cells`` leaf cells are materialized from request specs (1,000 cells per request).
2. ``--assets`` asset contributions arrive in ``--waves`` waves. In each wave,
   ``assets / waves / assets-per-result`` results get ``--assets-per-result`` assets each, all
   within the debounce; then the (injected) clock passes the debounce, the results scheduler
   starts the runs that are due, and the runs complete. Every (result, wave) pair is one dirty
   window: ``runs_started`` must equal ``dirty_windows``, not ``assets``.

Everything goes through the journal as critical commands, with the dispatcher and projector
running; ``results_events_per_s`` counts the events stored (receipts included) over the time
until the read models showed them. ``baseline_per_s`` is the core's per-transaction baseline
(one aggregate saved per transaction with plain ``eventsourcing``) in the same run.

Defaults are a fifth of the full size (``--cells 100000 --assets 1000000``), so a run ends
within minutes.

Usage: ``python -m bench.results [--cells N] [--assets N] [--waves W] [--assets-per-result K]``
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from commands.results import ResultCommand

# `python -m bench.x` puts bench/ on sys.path; the benchmarks import the project and bench.common
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    bench,
    bench_parser,
    fresh_settings,
    journal_commands,
    note,
)

T0 = datetime(2026, 11, 22, 0, 0, tzinfo=UTC)
CELLS_PER_REQUEST = 1000


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def settle(ledger: Any, timeout: float = 3600) -> None:
    """Until every journaled command is applied and the read models show it."""
    ledger.dispatcher.drain(timeout=timeout)
    head = ledger.store.max_position()
    if not ledger.projector.wait_for(head, timeout):
        raise SystemExit(f"the projector did not reach {head}")


def run(args: argparse.Namespace, settings: Any) -> None:
    from bootstrap.ledger import Ledger
    from commands.results import (
        ContributeAssetRequest,
        EndProcessingRunRequest,
        MaterializeObservationResultsRequest,
    )
    from projections.tables import build_tables
    from workers.result_automation import ResultsScheduler

    clock = Clock()
    ledger = Ledger(settings, clock=clock)
    ledger.start_workers()
    busy = 0.0  # seconds from journaling to the read models showing it
    try:
        requests = args.cells // CELLS_PER_REQUEST
        specs = [MaterializeObservationResultsRequest(
            observation_id=r, request_id=r, epochs=CELLS_PER_REQUEST // 10, samples=10)
            for r in range(requests)]
        t = time.perf_counter()
        asyncio.run(journal_commands(ledger, ResultCommand.OBSERVATION_RESULT_MATERIALIZE, specs))
        settle(ledger)
        took = time.perf_counter() - t
        busy += took
        cells = [str(c[0]) for s in specs for c in s.cells()]
        note(f"materialized {len(cells)} cells in {took:.1f}s")

        scheduler = ResultsScheduler(ledger.queries, ledger.commands, clock, batch=10 ** 6)
        runs = build_tables().processing_runs
        per_wave = args.assets // args.waves // args.assets_per_result
        windows = 0
        for wave in range(args.waves):
            clock.now = T0 + wave * timedelta(seconds=3 * settings.result_debounce_s)
            chosen = [cells[(wave * per_wave + i) % len(cells)] for i in range(per_wave)]
            windows += len(chosen)
            t = time.perf_counter()
            asyncio.run(journal_commands(ledger, None, [
                (ResultCommand.OBSERVATION_RESULT_CONTRIBUTE_ASSET,
                 ContributeAssetRequest(asset_id=f"asset:{wave}:{k}"), {"id": UUID(rid)})
                for rid in chosen for k in range(args.assets_per_result)]))
            settle(ledger)
            clock.now += timedelta(seconds=settings.result_debounce_s + 1)
            scheduler.once()
            settle(ledger)
            with ledger.engine.connect() as conn:
                running = conn.execute(runs.select().where(runs.c.status == "running")).all()
            asyncio.run(journal_commands(ledger, None, [
                (ResultCommand.OBSERVATION_RESULT_END_RUN, EndProcessingRunRequest.model_validate(
                    {"end": "completed", "outputs": [{"name": "p.fits", "kind": "image"}]}),
                 {"id": UUID(r.result_id), "run_id": UUID(r.id)}) for r in running]))
            settle(ledger)
            busy += time.perf_counter() - t
            note(f"wave {wave + 1}/{args.waves}: {len(chosen)} results x "
                 f"{args.assets_per_result} assets, {len(running)} runs")
        events = ledger.store.max_position()  # type: ignore[union-attr]
        with ledger.engine.connect() as conn:
            started = conn.execute(runs.select()).all()
        counts = ledger.queries.result_counts()
    finally:
        ledger.stop()
    note(f"{events} events in {busy:.1f}s of applying and projecting; results by status: "
         f"{counts['data_product_status']}")
    results_per_s = events / busy
    base = baseline(settings, args.baseline)
    bench("results_events_per_s", round(results_per_s, 1))
    bench("baseline_per_s", round(base, 1))
    bench("results_ratio", round(results_per_s / base, 3))
    bench("assets", per_wave * args.assets_per_result * args.waves)
    bench("dirty_windows", windows)
    bench("runs_started", len(started))


def baseline(settings: Any, n: int) -> float:
    from bench.commands import baseline_one_per_transaction

    return baseline_one_per_transaction(settings, n)


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    # a fifth of the full size (--cells 100000 --assets 1000000): the same figures within
    # minutes; the full size ran past 25 minutes on a loaded 2-core machine
    p.add_argument("--cells", type=int, default=20_000,
                   help="leaf cells materialized (full size: 100000)")
    p.add_argument("--assets", type=int, default=200_000,
                   help="asset contributions over the waves (full size: 1000000)")
    p.add_argument("--waves", type=int, default=10)
    p.add_argument("--assets-per-result", type=int, default=10)
    p.add_argument("--baseline", type=int, default=2000, help="aggregates in the baseline")
    args = p.parse_args(argv)
    with fresh_settings(args, "obsledger_bench_results", result_debounce_s=60.0,
                        embedded_results_automation=False) as settings:
        run(args, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
