"""Audit tools over a large log on PostgreSQL, beside a plain read of the same log.

A fresh PostgreSQL event store is filled with ``--events`` real domain events by direct
recorder inserts (a bulk load, not the command path): per executed obs unit a start, its raw
data files registered (``--files-per-unit``) and a finish, mapped by the application's mapper
and inserted through the recorder in large transactions. The audit chain is then extended
over the whole log (not timed in the ratios). Then, in the same run, over the same events:

- ``plain_read_per_s``: eventsourcing's stock ``PostgresApplicationRecorder.select_notifications``
  pages to the head, nothing else (obsledger's recorder reads with tuple rows instead);
- ``replay_per_s``: ``obsledger replay --format jsonl`` (every event decoded, untagged and
  written as a JSON line to a file);
- ``verify_per_s``: ``obsledger verify`` (every event hashed, the chain recomputed and
  compared with the chain table and the anchors);
- ``rebuild_per_s``: ``obsledger rebuild --all`` (fresh read models from position 0, then
  the switch), events decoded by ``--rebuild-workers`` processes (default: as configured,
  CPUs - 1);
- ``rebuild_one_process_per_s``: the same rebuild decoding in the rebuilding process
  (``OBSLEDGER_REBUILD_WORKERS=1``: the way it ran before decoder processes), for comparison;
- ``verify_ratio``, ``rebuild_ratio``: over ``plain_read_per_s`` (targets 0.5 and 0.35),
  and ``rebuild_one_process_ratio``.

``--rebuild-only`` skips the audit chain, the replay and the verification (a shorter run:
plain reads and the two rebuilds).

Usage: ``python -m bench.replay [--events N] [--files-per-unit F] [--rebuild-workers W]
[--rebuild-only] [--pg-host H ...]``
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# `python -m bench.x` puts bench/ on sys.path; the benchmarks import the project and bench.common
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench, bench_parser, fresh_settings, note

NIGHT = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


def domain_events(total: int, files_per_unit: int) -> Iterator[list[Any]]:
    """Real domain events, a unit (start, files, finish) at a time, ``total`` in all."""
    from domain.obs_units import ExecutedObsUnit
    from domain.provenance import Provenance
    from domain.raw_data import RawDataFile

    made = 0
    u = 0
    instruments = ("HARPS", "ESPRESSO", "NIRPS")
    while made < total:
        instrument = instruments[u % 3]
        t0 = NIGHT + timedelta(seconds=40 * u)
        prov = Provenance(actor="bench-loader", command_id=f"bench-{u}",
                          correlation_id=f"night-{u // 100}", observed_at=t0)
        unit = ExecutedObsUnit.start(uuid.uuid4(), f"OU-{u % 400:04d}", instrument, t0,
                                     {"airmass": 1.0 + (u % 50) / 100}, prov)
        events: list[Any] = list(unit.collect_events())
        for i in range(min(files_per_unit, total - made - 2)):
            f = RawDataFile.register(
                name=f"{instrument}.{u:07d}.{i:03d}.fits", instrument=instrument,
                relative_path=f"{t0:%Y-%m-%d}/{instrument}.{u:07d}.{i:03d}.fits",
                size=16_793_280 + i, checksum_algorithm="md5",
                checksum_value=f"{u:016x}{i:016x}", executed_obs_unit_id=unit.id,
                file_type="raw_science", created_at=t0 + timedelta(seconds=i),
                package_id=None, provenance=prov)
            events.extend(f.collect_events())
        unit.finish("success", t0 + timedelta(seconds=30), {"exposures": files_per_unit}, prov)
        events.extend(unit.collect_events())
        events = events[:total - made]
        made += len(events)
        u += 1
        yield events


def fill(store: Any, total: int, files_per_unit: int, batch: int = 20_000) -> float:
    """Insert ``total`` events through the recorder; return the seconds it took."""
    mapper = store.mapper
    t = time.perf_counter()
    pending: list[Any] = []
    done = 0
    for events in domain_events(total, files_per_unit):
        pending.extend(mapper.to_stored_event(e) for e in events)
        if len(pending) >= batch:
            store.recorder.insert_events(pending)
            done += len(pending)
            pending = []
            if done % 200_000 < batch:
                note(f"loaded {done} events")
    if pending:
        store.recorder.insert_events(pending)
    return time.perf_counter() - t


def timed(what: str, head: int, fn: Any) -> float:
    t = time.perf_counter()
    fn()
    took = time.perf_counter() - t
    note(f"{what}: {head} events in {took:.2f}s")
    return head / took


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--events", type=int, default=1_000_000, help="events in the log")
    p.add_argument("--files-per-unit", type=int, default=20)
    p.add_argument("--rebuild-workers", type=int, default=None,
                   help="decoder processes of the rebuild (default: OBSLEDGER_REBUILD_WORKERS, "
                   "else CPUs - 1)")
    p.add_argument("--rebuild-only", action="store_true",
                   help="skip the audit chain, replay and verify (plain reads and rebuilds)")
    args = p.parse_args(argv)

    from bootstrap.ledger import Ledger
    from infra.audit_chain import AnchorLog, verify
    from projections.parallel_decode import default_workers
    from queries.audit import EventFilter, replay

    with fresh_settings(args, "obsledger_bench_replay") as settings:
        ledger = Ledger(settings, workers=False)
        try:
            store, projector, chain = ledger.store, ledger.projector, ledger.chain
            assert store is not None and projector is not None and chain is not None
            took = fill(store, args.events, args.files_per_unit)
            head = store.max_position()
            note(f"bulk load: {head} events in {took:.1f}s ({head / took:,.0f}/s)")
            if not args.rebuild_only:
                t = time.perf_counter()
                chain.catch_up()
                note(f"audit chain extended over {head} events in "
                     f"{time.perf_counter() - t:.1f}s")
            if args.rebuild_workers is not None:
                projector.rebuild_workers = args.rebuild_workers
            workers = projector.rebuild_workers or default_workers()
            note(f"rebuild decoder processes: {workers} (os.cpu_count() = {os.cpu_count()})")

            def plain() -> None:  # eventsourcing's own read, not the lean one obsledger uses
                from eventsourcing.postgres import PostgresApplicationRecorder

                stock = PostgresApplicationRecorder.select_notifications
                after, n = 0, 0
                while page := stock(store.recorder, after, 5000, inclusive_of_start=False):
                    n += len(page)
                    after = page[-1].id
                assert n == head

            def replay_jsonl() -> None:
                import orjson

                with open(settings.data_dir / "replay.jsonl", "wb") as out:
                    for e in replay(store, EventFilter()):
                        out.write(orjson.dumps(e.as_json()) + b"\n")

            def verify_all() -> None:
                result = verify(store, ledger.engine, AnchorLog(settings.anchors_file))
                assert result.ok and result.events == head, result

            def rebuild_all() -> None:
                assert projector.rebuild() == head

            def rebuild_one_process() -> None:
                projector.rebuild_workers = 1
                try:
                    assert projector.rebuild() == head
                finally:
                    projector.rebuild_workers = workers

            plain_rate = timed("plain read", head, plain)
            if not args.rebuild_only:
                replay_rate = timed("replay to JSON Lines", head, replay_jsonl)
                verify_rate = timed("verify", head, verify_all)
            rebuild_rate = timed(f"rebuild --all, {workers} decoder processes", head,
                                 rebuild_all)
            one_rate = timed("rebuild --all, decoding in the rebuilding process", head,
                             rebuild_one_process)
            plain_rate = max(plain_rate, timed("plain read, again", head, plain))
        finally:
            ledger.stop()

    bench("plain_read_per_s", round(plain_rate, 1))
    if not args.rebuild_only:
        bench("replay_per_s", round(replay_rate, 1))
        bench("verify_per_s", round(verify_rate, 1))
    bench("rebuild_per_s", round(rebuild_rate, 1))
    bench("rebuild_one_process_per_s", round(one_rate, 1))
    if not args.rebuild_only:
        bench("verify_ratio", round(verify_rate / plain_rate, 3))
    bench("rebuild_ratio", round(rebuild_rate / plain_rate, 3))
    bench("rebuild_one_process_ratio", round(one_rate / plain_rate, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
