"""Projector catch-up on PostgreSQL, beside one-event-per-transaction projection of the same log.

A night of operations is journaled and applied into a fresh PostgreSQL event store: executed
obs units started, raw data packages created together with their files, units finished,
packages finalized, staging requested and reported by the transfer agent. Then, in the same
run, the same log is projected into two empty read-model databases:

- ``projection_per_s``: the projector as it runs in production (pages of
  ``--page-size`` notifications, runs of one statement as one ``executemany``, the position
  in the same transaction);
- ``baseline_projection_per_s``: the same projector code with a page of one notification,
  i.e. one event (and its position update) per transaction;
- ``projection_ratio``: the first over the second.

Both figures count every notification in the log (command receipts included: the projector
reads and decodes them, then has nothing to write). Both read models are compared row by row
at the end, so the speed-up is never bought with a different result.

Usage: ``python -m bench.projection [--units N] [--files-per-unit F] [--pg-host H ...]``
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

# `python -m bench.x` puts bench/ on sys.path; the benchmarks import the project and bench.common
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    Command,
    Pg,
    bench,
    bench_parser,
    drain_journal,
    journal_commands,
    make_settings,
    note,
    pg_from_args,
    temp_database,
    temp_dir,
)
from commands.obs_units import ObsUnitCommand
from commands.raw_data import RawDataCommand
from commands.staging import StagingCommand

NIGHT = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


def night_of_operations(units: int, files_per_unit: int) -> list[list[Command]]:
    """The commands of one night, in phases: each phase refers only to what earlier phases
    created, so a phase can be journaled concurrently (group commit) and drained at once."""
    from commands.models import CommandModel
    from commands.obs_units import FinishExecutedObsUnitRequest, StartExecutedObsUnitRequest
    from commands.raw_data import CreateRawDataPackageRequest
    from commands.staging import StageRequest, StagingProgressRequest

    instruments = ("HARPS", "ESPRESSO", "NIRPS")
    start: list[Command] = []
    create: list[Command] = []
    finish: list[Command] = []
    stage: list[Command] = []
    progress: list[Command] = []
    done: list[Command] = []
    packages: list[uuid.UUID] = []
    for u in range(units):
        instrument = instruments[u % len(instruments)]
        unit_id, package_id, staging_id = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
        t0 = NIGHT + timedelta(minutes=7 * u)
        start.append((ObsUnitCommand.EXECUTED_OBS_UNIT_START, StartExecutedObsUnitRequest(
            id=unit_id, obs_unit_id=f"OU-2026-{u % 400:04d}", instrument=instrument,
            start_time=t0, metadata={"airmass": 1.0 + (u % 50) / 100, "seeing": 0.8}), None))
        files = [{
            "name": f"{instrument}.{t0:%Y-%m-%dT%H:%M:%S}.{u:05d}.{i:03d}.fits",
            "relative_path": f"{t0:%Y-%m-%d}/{instrument}.{u:05d}.{i:03d}.fits",
            "size": 16_793_280 + i, "checksum": {"algorithm": "md5",
                                                 "value": f"{u:016x}{i:016x}"},
            "instrument": instrument, "executed_obs_unit_id": str(unit_id),
            "file_type": "raw_science" if i else "raw_calibration",
            "created_at": (t0 + timedelta(seconds=30 * i)).isoformat(),
        } for i in range(files_per_unit)]
        create.append((RawDataCommand.RAW_DATA_PACKAGE_CREATE,
                       CreateRawDataPackageRequest.model_validate({
            "id": str(package_id), "name": f"{instrument}-{t0:%Y-%m-%d}-{u:05d}",
            "executed_obs_unit_id": str(unit_id), "files": files}), None))
        finish.append((ObsUnitCommand.EXECUTED_OBS_UNIT_FINISH, FinishExecutedObsUnitRequest(
            status="success" if u % 10 else "aborted", end_time=t0 + timedelta(minutes=6),
            metadata={"exposures": files_per_unit}), {"id": unit_id}))
        finish.append((RawDataCommand.RAW_DATA_PACKAGE_FINALIZE, CommandModel(),
                       {"id": package_id}))
        packages.append(package_id)
        stage.append((StagingCommand.STAGING_STAGE, StageRequest(
            id=staging_id, package_ids=[package_id], destination="archive-garching"), None))
        total = sum(f["size"] for f in files)  # type: ignore[misc]
        progress.append((StagingCommand.STAGING_REPORT_PROGRESS, StagingProgressRequest(
            status="in_progress", bytes_transferred=total // 2,
            files_transferred=files_per_unit // 2), {"id": staging_id}))
        done.append((StagingCommand.STAGING_REPORT_PROGRESS, StagingProgressRequest(
            status="completed", bytes_transferred=total, files_transferred=files_per_unit),
            {"id": staging_id}))
    return [start, create, finish, stage, progress, done]


def fill_event_store(settings: Any, units: int, files_per_unit: int) -> int:
    """Journal and apply the night; return the log's head position."""
    from bootstrap.ledger import Ledger

    ledger = Ledger(settings, workers=False)
    try:
        applied = 0
        t = time.perf_counter()
        for phase in night_of_operations(units, files_per_unit):
            asyncio.run(journal_commands(ledger, None, phase))
            applied += len(phase)
            drain_journal(ledger, applied, "fill")
        assert ledger.store is not None
        head = ledger.store.max_position()
        note(f"log: {applied} commands from {units} executed obs units x {files_per_unit} "
             f"files applied in {time.perf_counter() - t:.1f}s -> {head} events")
    finally:
        ledger.stop()
    return head


def project(settings: Any, pg: Pg, read_db: str, page_size: int) -> tuple[float, int]:
    """Seconds to project the whole log into an empty read-model database."""
    from infra.event_store import EventStore
    from infra.read_model_db import create_read_model_engine
    from projections.projector import Projector

    url = (f"postgresql+psycopg://{pg.user}{':' + pg.password if pg.password else ''}"
           f"@{pg.host}:{pg.port}/{read_db}")
    store = EventStore(settings)
    engine = create_read_model_engine(url)
    try:
        projector = Projector(store, engine, page_size=page_size)
        t = time.perf_counter()
        position = projector.catch_up(timeout=3600)
        took = time.perf_counter() - t
    finally:
        store.close()
        engine.dispose()
    return took, position


def read_model_rows(pg: Pg, read_db: str) -> dict[str, list[tuple[Any, ...]]]:
    from projections.tables import READ_MODELS

    out: dict[str, list[tuple[Any, ...]]] = {}
    with pg.connect(read_db) as conn:
        for table in READ_MODELS:
            cur = conn.execute(f'SELECT * FROM "{table}" ORDER BY id')
            out[table] = [tuple(r) for r in cur.fetchall()]
    return out


def main(argv: list[str] | None = None) -> int:
    p = bench_parser(__doc__)
    p.add_argument("--units", type=int, default=600, help="executed obs units in the night")
    p.add_argument("--files-per-unit", type=int, default=12)
    p.add_argument("--page-size", type=int, default=None,
                   help="projector page (default: OBSLEDGER_PROJECTION_PAGE_SIZE's default)")
    args = p.parse_args(argv)
    pg = pg_from_args(args)

    with temp_database(pg, "obsledger_bench_log") as log_db, \
            temp_database(pg, "obsledger_bench_rm") as batched_db, \
            temp_database(pg, "obsledger_bench_rm1") as single_db, \
            temp_dir(args.keep_dir) as tmp:
        settings = make_settings(pg, log_db, tmp / "fill")
        page_size = args.page_size or settings.projection_page_size
        head = fill_event_store(settings, args.units, args.files_per_unit)

        took, pos = project(settings, pg, batched_db, page_size)
        note(f"batched: {pos} events in {took:.2f}s (page {page_size})")
        batched = pos / took
        took1, pos1 = project(settings, pg, single_db, 1)
        note(f"one event per transaction: {pos1} events in {took1:.2f}s")
        single = pos1 / took1
        if not pos == pos1 == head:
            raise SystemExit(f"positions differ: head {head}, batched {pos}, single {pos1}")
        if read_model_rows(pg, batched_db) != read_model_rows(pg, single_db):
            raise SystemExit("the two read models differ")
        note("both read models are identical, row by row")

    bench("projection_per_s", round(batched, 1))
    bench("baseline_projection_per_s", round(single, 1))
    bench("projection_ratio", round(batched / single, 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
