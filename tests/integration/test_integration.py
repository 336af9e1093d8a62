"""The command side and the read side together, on SQLite and on PostgreSQL.

The ``ledger`` fixture runs no background threads: tests submit (or journal directly), then
apply with ``dispatcher.drain()`` and project with ``projector.catch_up()``.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import pytest

from bootstrap.ledger import Ledger
from commands.downloads import (
    CancelDownloadRequest,
    DownloadCheckpoint,
    DownloadFail,
    DownloadFileComplete,
    DownloadFileSpec,
    DownloadFileStart,
    PurgeDownloadPartials,
    RequestDownload,
)
from commands.models import JOURNALED, CommandModel, observed_at_of
from commands.obs_units import FinishExecutedObsUnitRequest, StartExecutedObsUnitRequest
from commands.processing import (
    CancelJobRequest,
    ClaimProcessingJob,
    ConfirmProcessingCancel,
    FailProcessingJob,
    ProcessingProgress,
    ProcessingStep,
    ProductOutputFile,
    RenewProcessingLease,
    RequestProcessingJob,
    SucceedProcessingJob,
)
from commands.raw_data import (
    AddFilesToPackageRequest,
    BulkRegisterRawDataFilesRequest,
    CreateRawDataPackageRequest,
    RegisterRawDataFileRequest,
)
from commands.registry import COMMANDS
from commands.results import (
    CancelObservationResultRequest,
    ContributeAssetRequest,
    DispatchObservationResultRequest,
    EndProcessingRunRequest,
    MaterializeObservationResultsRequest,
    StartProcessingRunRequest,
    TaskOutcomeRequest,
)
from commands.service import IdempotencyConflict, Submission
from commands.staging import RetryStagingRequest, StageRequest, StagingProgressRequest
from domain.processing import data_product_id
from domain.raw_data import raw_data_file_id
from domain.results import observation_result_id
from infra.journal import ACCEPTED, APPLIED, REJECTED, Journal, JournalEntry, NewCommand
from infra.settings import Settings
from projections.tables import READ_MODELS
from tests.conftest import read_model_rows

T0 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)


class Empty(CommandModel):
    pass


class CancelBody(CommandModel):
    reason: str | None = None


# -- helpers ---------------------------------------------------------------------------------
def submit(ledger: Ledger, command_type: str, request: CommandModel, *,
           path: dict[str, Any] | None = None, key: str | None = None,
           actor: str = "tester") -> Submission:
    return asyncio.run(ledger.commands.submit(
        command_type, request, path=path, actor=actor, correlation_id="corr-it",
        idempotency_key=key))


def journal(ledger: Ledger, command_type: str, payload: dict[str, Any],
            command_id: str | None = None) -> JournalEntry:
    """Journal a command directly, bypassing the service's precheck."""
    spec = COMMANDS[command_type]
    cmd = spec.model.model_validate(payload)
    cid = command_id or str(uuid.uuid4())
    return ledger.journal.append_sync(NewCommand(
        command_id=cid, command_type=command_type, payload=cmd.model_dump(mode="json"),
        actor="direct", correlation_id="corr-direct", request_hash="direct",
        response={"command_id": cid, "status": "accepted", "ids": {}},
        subjects=spec.subjects(cmd), observed_at=observed_at_of(cmd))).entry


def file_spec(name: str, size: int = 100, instrument: str = "HARPS",
              unit: str | None = None) -> dict[str, Any]:
    return {"name": name, "relative_path": f"2026-11-21/{name}", "size": size,
            "checksum": {"algorithm": "md5", "value": uuid.uuid4().hex},
            "instrument": instrument, "executed_obs_unit_id": unit,
            "file_type": "raw_science", "created_at": T0.isoformat()}


def fid(name: str, instrument: str = "HARPS") -> str:
    return str(raw_data_file_id(instrument, name))


def start_req(obs_unit_id: str) -> StartExecutedObsUnitRequest:
    return StartExecutedObsUnitRequest(obs_unit_id=obs_unit_id, instrument="HARPS",
                                       start_time=T0, metadata={})


def start(ledger: Ledger, obs_unit_id: str = "OU-1", instrument: str = "HARPS",
          start_time: datetime = T0, **kw: Any) -> str:
    sub = submit(ledger, "executed_obs_unit.start", StartExecutedObsUnitRequest(
        obs_unit_id=obs_unit_id, instrument=instrument, start_time=start_time,
        metadata={"airmass": 1.2}), **kw)
    return str(sub.body["ids"]["executed_obs_unit_id"])


def settle(ledger: Ledger) -> int:
    assert ledger.dispatcher is not None and ledger.projector is not None
    ledger.dispatcher.drain()
    return ledger.projector.catch_up()


def status(ledger: Ledger, command_id: str) -> JournalEntry:
    entry = ledger.journal.get(command_id)
    assert entry is not None
    return entry


def dispatch_until_final(ledger: Ledger, command_ids: list[str],
                         timeout: float = 10.0) -> list[JournalEntry]:
    """Keep dispatching (deferred commands become due later) until all have an outcome."""
    assert ledger.dispatcher is not None
    deadline = time.monotonic() + timeout
    while True:
        ledger.dispatcher.dispatch_once()
        entries = [status(ledger, c) for c in command_ids]
        if all(e.is_final for e in entries):
            return entries
        assert time.monotonic() < deadline, entries
        time.sleep(0.02)


def table_rows(ledger: Ledger) -> dict[str, list[dict[str, Any]]]:
    return read_model_rows(ledger.engine)


def head(ledger: Ledger) -> int:
    assert ledger.store is not None
    return ledger.store.max_position()


def event_count(ledger: Ledger) -> int:
    """Stored events (PostgreSQL's log may have gaps: a rolled back insert uses up ids)."""
    assert ledger.store is not None
    return len(ledger.store.select_notifications(0, 1_000_000))


def build_night(ledger: Ledger) -> dict[str, str]:
    """Every command type once (twice for staging), submitted before anything is applied."""
    ids: dict[str, str] = {}
    cmds: dict[str, str] = {}

    def s(name: str, ctype: str, req: CommandModel, path: dict[str, Any] | None = None) -> None:
        sub = submit(ledger, ctype, req, path=path)
        cmds[name] = sub.entry.command_id

    ids["unit"] = unit = start(ledger, "OU-NIGHT")
    cmds["start"] = ledger.journal.unprojected(0, f"executed_obs_unit:{unit}")[0].command_id
    s("finish", "executed_obs_unit.finish", FinishExecutedObsUnitRequest(
        status="success", end_time=T0 + timedelta(hours=1), metadata={"exposures": 4}),
      {"id": unit})
    s("register", "raw_data_file.register",
      RegisterRawDataFileRequest.model_validate(file_spec("single.fits", 10, unit=unit)))
    s("bulk", "raw_data_file.register_bulk", BulkRegisterRawDataFilesRequest.model_validate(
        {"files": [file_spec("b1.fits", 20, unit=unit), file_spec("b2.fits", 30)]}))
    ids["pkg"] = pkg = str(uuid.uuid4())
    s("create", "raw_data_package.create", CreateRawDataPackageRequest.model_validate({
        "id": pkg, "name": "PKG-1", "executed_obs_unit_id": unit,
        "file_ids": [fid("single.fits")], "files": [file_spec("new.fits", 40, unit=unit)]}))
    s("add", "raw_data_package.add_files",
      AddFilesToPackageRequest(file_ids=[UUID(fid("b1.fits")), UUID(fid("b2.fits"))]),
      {"id": pkg})
    s("finalize", "raw_data_package.finalize", Empty(), {"id": pkg})

    def stage(name: str, key: str, destination: str) -> str:
        """The package staged to ``destination``: the request's id, kept as ``ids[key]``."""
        ids[key] = staging = str(uuid.uuid4())
        s(name, "staging.stage", StageRequest(id=UUID(staging), package_ids=[UUID(pkg)],
                                              destination=destination))
        return staging

    def progress(name: str, staging: str, status: str, done: tuple[int, int],
                 message: str) -> None:
        """A progress report of ``staging``: ``done`` bytes and files transferred."""
        s(name, "staging.report_progress", StagingProgressRequest(
            status=status, bytes_transferred=done[0], files_transferred=done[1],
            message=message), {"id": staging})

    progress("progress", stage("stage", "stg", "archive:/stage/1121"), "in_progress", (50, 2),
             "copying")
    s("cancel", "staging.cancel", CancelBody(reason="not needed"),
      {"id": stage("stage2", "stg2", "elsewhere")})
    stg3 = stage("stage3", "stg3", "flaky-disk")
    progress("failed", stg3, "failed", (0, 0), "disk full")
    s("retry", "staging.retry", RetryStagingRequest(reason="disk replaced"), {"id": stg3})
    ids["result"] = result = str(observation_result_id(7, 42, 0, 0, 0))
    ids["result2"] = result2 = str(observation_result_id(7, 42, 1, 0, 0))
    s("materialize", "observation_result.materialize",
      MaterializeObservationResultsRequest(observation_id=7, request_id=42, epochs=2,
                                           spec_snapshot={"exptime": 600}))
    ids["task"] = task = str(uuid.uuid4())
    s("dispatch", "observation_result.dispatch",
      DispatchObservationResultRequest(task_id=UUID(task), executed_obs_unit_id=UUID(unit)),
      {"id": result})
    s("outcome", "observation_result.report_task",
      TaskOutcomeRequest(outcome="succeeded", finished_at=T0 + timedelta(hours=1)),
      {"id": result, "task_id": task})
    s("cancel_result", "observation_result.cancel",
      CancelObservationResultRequest(reason="withdrawn"), {"id": result2})
    s("asset", "observation_result.contribute_asset",
      ContributeAssetRequest(asset_id=f"raw_data_file:{fid('single.fits')}"), {"id": result})
    ids["run"] = run = str(uuid.uuid4())
    s("run", "observation_result.start_run", StartProcessingRunRequest(run_id=UUID(run)),
      {"id": result})
    s("end_run", "observation_result.end_run", EndProcessingRunRequest.model_validate(
        {"end": "completed", "outputs": [{"name": "c.fits", "kind": "combined_image"}]}),
      {"id": result, "run_id": run})
    # a MAST download job through every download command (docs/ARCHITECTURE.md)
    ids["dl"] = dl = str(uuid.uuid4())
    job = UUID(dl)
    s("dl_request", "download_job.request", RequestDownload(id=job, destination="night", files=[
        DownloadFileSpec(url="http://mast.test/f/a.fits", filename="a.fits", size=100,
                         data_uri="mast:HST/product/a.fits", obs_id="O1"),
        DownloadFileSpec(url="http://mast.test/f/b.fits", filename="b.fits")]))
    s("dl_start", "download_job.start_file", DownloadFileStart(id=job, index=0, size=100,
                                                               etag='"e1"'))
    s("dl_ckpt", "download_job.checkpoint", DownloadCheckpoint(id=job, index=0, bytes_done=50,
                                                               bytes_per_s=1000.0))
    s("dl_done", "download_job.complete_file", DownloadFileComplete(
        id=job, index=0, size=100, sha256="ab" * 32, fits={"hdus": 1}))
    s("dl_pause", "download_job.pause", Empty(), {"id": dl})
    s("dl_resume", "download_job.resume", Empty(), {"id": dl})
    s("dl_start2", "download_job.start_file", DownloadFileStart(id=job, index=1, size=10))
    s("dl_fail", "download_job.fail", DownloadFail(id=job, reason="HTTP 503", index=1))
    s("dl_cancel", "download_job.cancel", CancelDownloadRequest(reason="enough"), {"id": dl})
    s("dl_purge", "download_job.purge_partials", PurgeDownloadPartials(
        id=job, removed=["night/b.fits.part"]))
    # processing jobs through every processing command (docs/PROCESSING.md)
    held = {"worker": "w1", "attempt": 1}
    ids["pj"] = pj = str(uuid.uuid4())
    s("pj_request", "processing_job.request", RequestProcessingJob(
        id=UUID(pj), kind="process", file_ids=[UUID(fid("single.fits")), UUID(fid("b1.fits"))],
        algorithm="ccd_stack", algorithm_version="1.0.0", parameters={"sigma": 3.0}))
    s("pj_claim", "processing_job.claim", ClaimProcessingJob(id=UUID(pj), worker="w1",
                                                             lease_s=60))
    s("pj_renew", "processing_job.renew", RenewProcessingLease(id=UUID(pj), lease_s=60, **held))
    s("pj_step", "processing_job.start_step", ProcessingStep(id=UUID(pj), name="combine",
                                                              **held))
    s("pj_progress", "processing_job.progress", ProcessingProgress(id=UUID(pj), fraction=0.5,
                                                                   **held))
    s("pj_step_end", "processing_job.complete_step", ProcessingStep(id=UUID(pj),
                                                                     name="combine", **held))
    s("pj_succeed", "processing_job.succeed", SucceedProcessingJob(
        id=UUID(pj), products=[ProductOutputFile(
            kind="combined_image", name="c.fits", area="products", key=f"{pj}/c.fits",
            size=10, sha256="cd" * 32, media_type="application/fits",
            metrics={"nframes": 2})], software={"numpy": "2"}, **held))
    ids["product"] = product = str(data_product_id(UUID(pj), "combined_image"))
    ids["pj_cat"] = cat = str(uuid.uuid4())
    s("pj_catalog", "processing_job.request", RequestProcessingJob(
        id=UUID(cat), kind="catalog", product_ids=[UUID(product)], publish=True))
    s("pj_cat_claim", "processing_job.claim", ClaimProcessingJob(id=UUID(cat), worker="w1",
                                                                 lease_s=60))
    s("pj_cat_done", "processing_job.succeed", SucceedProcessingJob(
        id=UUID(cat), catalogued=[UUID(product)], **held))
    ids["pj_x"] = px = str(uuid.uuid4())
    s("pj_x_request", "processing_job.request", RequestProcessingJob(
        id=UUID(px), kind="ingest", file_ids=[UUID(fid("b2.fits"))]))
    s("pj_x_claim", "processing_job.claim", ClaimProcessingJob(id=UUID(px), worker="w1",
                                                               lease_s=60))
    s("pj_x_cancel", "processing_job.cancel", CancelJobRequest(reason="wrong file"),
      {"id": px})
    s("pj_x_cancelled", "processing_job.confirm_cancel", ConfirmProcessingCancel(
        id=UUID(px), **held))
    ids["pj_f"] = pf = str(uuid.uuid4())
    s("pj_f_request", "processing_job.request", RequestProcessingJob(
        id=UUID(pf), kind="ingest", file_ids=[UUID(fid("b2.fits"))]))
    s("pj_f_claim", "processing_job.claim", ClaimProcessingJob(id=UUID(pf), worker="w1",
                                                               lease_s=60))
    s("pj_f_fail", "processing_job.fail", FailProcessingJob(id=UUID(pf), reason="not FITS",
                                                            **held))
    ids.update({f"cmd:{k}": v for k, v in cmds.items()})
    return ids


# -- every command type ----------------------------------------------------------------------
def test_every_command_type_is_applied_and_projected(ledger: Ledger) -> None:
    ids = build_night(ledger)
    cmds = {k[4:]: v for k, v in ids.items() if k.startswith("cmd:")}
    types = {status(ledger, c).command_type for c in cmds.values()}
    assert types == set(COMMANDS), "every command type is exercised"
    assert all(status(ledger, c).status == ACCEPTED for c in cmds.values())

    position = settle(ledger)
    entries = {k: status(ledger, c) for k, c in cmds.items()}
    for k, e in entries.items():
        assert e.status == APPLIED, (k, e.reason)
        assert e.position is not None and e.finished_at is not None
    positions = [entries[k].position or 0 for k in cmds]
    assert positions == sorted(positions), "applied in journal order"
    assert position == head(ledger) == max(positions)

    q = ledger.queries
    unit = q.execution(ids["unit"])
    assert unit is not None
    assert unit["status"] == "success" and unit["pending"] is False
    assert unit["metadata"] == {"airmass": 1.2, "exposures": 4}
    assert unit["started_by"] == unit["finished_by"] == "tester"
    assert unit["end_time"] == T0 + timedelta(hours=1)

    pkg = q.package(ids["pkg"])
    assert pkg is not None
    assert pkg["status"] == "complete" and pkg["total_size"] == 100 and pkg["file_count"] == 4
    assert pkg["finalized_at"] is not None
    assert sorted(f["name"] for f in pkg["files"]) == ["b1.fits", "b2.fits", "new.fits",
                                                        "single.fits"]
    assert all(f["package_id"] == ids["pkg"] for f in pkg["files"])

    f = q.file(fid("single.fits"))
    assert f is not None and f["executed_obs_unit_id"] == ids["unit"] and f["size"] == 10
    assert f["checksum"]["algorithm"] == "md5"

    stg = q.staging(ids["stg"])
    assert stg is not None
    assert (stg["status"], stg["bytes_total"], stg["files_total"]) == ("in_progress", 100, 4)
    assert (stg["bytes_transferred"], stg["files_transferred"]) == (50, 2)
    assert stg["progress_percent"] == 50.0 and stg["message"] == "copying"
    stg2 = q.staging(ids["stg2"])
    assert stg2 is not None and stg2["status"] == "cancelled" and stg2["message"] == "not needed"

    _, total, items, pending = q.list_files(executed_obs_unit_id=ids["unit"], package_id=None,
                                            instrument=None, file_type=None, name=None,
                                            limit=10, offset=0)
    assert total == 3 and pending == 0
    assert {i["name"] for i in items} == {"single.fits", "b1.fits", "new.fits"}

    result = q.result(ids["result"])
    assert result is not None and result["pending"] is False
    assert (result["fulfillment_status"], result["data_product_status"]) == ("fulfilled",
                                                                             "READY")
    assert result["fulfilled_on"] == T0 + timedelta(hours=1)
    assert [(t["id"], t["status"], t["executed_obs_unit_id"]) for t in result["tasks"]] == [
        (ids["task"], "succeeded", ids["unit"])]
    assert [(r["id"], r["status"], r["outputs"][0]["name"]) for r in result["runs"]] == [
        (ids["run"], "completed", "c.fits")]
    assert result["spec_snapshot"] == {"exptime": 600} and result["last_built_revision"] == 1
    canceled = q.result(ids["result2"])
    assert canceled is not None and canceled["fulfillment_status"] == "canceled"

    jobs = {j: ledger.processing.job(ids[j]) for j in ("pj", "pj_cat", "pj_x", "pj_f")}
    assert {j: (v or {}).get("status") for j, v in jobs.items()} == {
        "pj": "succeeded", "pj_cat": "succeeded", "pj_x": "cancelled", "pj_f": "failed"}
    done = jobs["pj"]
    assert done is not None and done["progress"] == 1.0 and done["attempts"] == 1
    assert [(st["name"], st["status"]) for st in done["steps"]] == [("combine", "completed")]
    product = ledger.processing.product(ids["product"])
    assert product is not None and product["status"] == "published"
    assert {i["name"] for i in product["inputs"]} == {"single.fits", "b1.fits"}


def test_commands_are_applied_as_they_were_accepted(ledger: Ledger) -> None:
    """The dispatcher applies the object a command was accepted as instead of validating its
    journaled payload again: for every command type the two are equal."""
    ledger.commands.accepted.enabled = True  # as in a process with embedded workers
    ids = build_night(ledger)
    entries = [status(ledger, c) for k, c in ids.items() if k.startswith("cmd:")]
    accepted = ledger.commands.accepted
    assert len(accepted) == len(entries)
    for e in entries:
        spec = COMMANDS[e.command_type]
        assert accepted.get(e.seq) == spec.model.model_validate(e.payload, context=JOURNALED)
    settle(ledger)
    assert all(status(ledger, e.command_id).status == APPLIED for e in entries)
    assert len(accepted) == 0


def test_a_process_that_only_journals_keeps_no_accepted_command(settings: Settings) -> None:
    """``serve --no-workers``, ``obsledger downloader``: another process applies what they
    journal, so holding the objects would only fill memory."""
    journaling = Ledger(settings, workers=False)
    try:
        start(journaling, "OU-elsewhere")
        assert len(journaling.commands.accepted) == 0
    finally:
        journaling.stop()
    with_workers = Ledger(settings, workers=True)
    try:
        assert with_workers.commands.accepted.enabled
    finally:
        with_workers.stop()


def test_commands_evicted_from_memory_are_validated_from_the_journal(ledger: Ledger) -> None:
    ledger.commands.accepted.enabled = True
    ledger.commands.accepted.capacity = 4  # a unit (1) and a 3-file bulk (4): the unit goes
    unit = start(ledger, "OU-evicted")
    bulk = submit(ledger, "raw_data_file.register_bulk", BulkRegisterRawDataFilesRequest
                  .model_validate({"files": [file_spec(f"ev{i}.fits", unit=unit)
                                             for i in range(3)]}))
    assert len(ledger.commands.accepted) == 1
    settle(ledger)
    assert status(ledger, bulk.entry.command_id).status == APPLIED
    assert ledger.queries.execution(unit) is not None
    assert {f: ledger.queries.file(fid(f)) is not None for f in ("ev0.fits", "ev2.fits")} == {
        "ev0.fits": True, "ev2.fits": True}


def test_events_carry_the_commands_provenance(ledger: Ledger) -> None:
    unit = start(ledger, "OU-P", key="prov-key-1", actor="night-script")
    settle(ledger)
    assert ledger.store is not None
    events = [ledger.store.decode(n) for n in ledger.store.select_notifications(0, 100)]
    names = [type(e).__qualname__ for e in events]
    assert names == ["ExecutedObsUnit.Started", "CommandReceipt.Recorded"]
    for e in events:
        assert e.command_id == "prov-key-1" and e.actor == "night-script"
        assert e.correlation_id == "corr-it" and e.observed_at == T0
    assert str(events[0].originator_id) == unit


def test_bulk_registration_of_thousands_of_files(ledger: Ledger) -> None:
    n = 3000
    files = [file_spec(f"HARPS.{i:05d}.fits", i) for i in range(n)]
    sub = submit(ledger, "raw_data_file.register_bulk",
                 BulkRegisterRawDataFilesRequest.model_validate({"files": files}))
    assert len(sub.body["ids"]["raw_data_file_ids"]) == n
    assert sub.body["ids"]["raw_data_file_ids"][7] == fid("HARPS.00007.fits")
    settle(ledger)
    entry = status(ledger, sub.entry.command_id)
    assert entry.status == APPLIED, entry.reason
    _, total, items, _ = ledger.queries.list_files(
        executed_obs_unit_id=None, package_id=None, instrument="HARPS", file_type=None,
        name=None, limit=1000, offset=0)
    assert total == n and len(items) == 1000
    assert event_count(ledger) == n + 1  # one event per file and the receipt
    row = ledger.queries.file(fid("HARPS.02999.fits"))
    assert row is not None and row["size"] == 2999 and row["pending"] is False


@pytest.mark.timeout(180)
def test_one_dispatch_batch_of_tens_of_thousands_of_events(ledger: Ledger) -> None:
    # Three bulk registrations in one batch: 30,003 events in one store transaction. With
    # eventsourcing's pipelined insert this hung for good on PostgreSQL (from ~20,000 events).
    per = 10_000
    subs = [journal(ledger, "raw_data_file.register_bulk", {"files": [
        file_spec(f"NIRSPEC.{c}.{i:05d}.fits", i) for i in range(per)]}) for c in range(3)]
    settle(ledger)
    for sub in subs:
        entry = status(ledger, sub.command_id)
        assert entry.status == APPLIED, entry.reason
    assert event_count(ledger) == 3 * (per + 1)
    positions = sorted(status(ledger, s.command_id).position or 0 for s in subs)
    assert positions == [per + 1, 2 * (per + 1), 3 * (per + 1)]  # each ends on its receipt
    row = ledger.queries.file(fid("NIRSPEC.2.09999.fits"))
    assert row is not None and row["size"] == 9999 and row["pending"] is False


def test_bulk_registration_is_all_or_none(ledger: Ledger) -> None:
    submit(ledger, "raw_data_file.register",
           RegisterRawDataFileRequest.model_validate(file_spec("dup.fits", 5)))
    settle(ledger)
    before = event_count(ledger)
    ok_before = journal(ledger, "executed_obs_unit.start",
                        {"id": str(uuid.uuid4()), "obs_unit_id": "OU-A", "instrument": "X",
                         "start_time": T0.isoformat()})
    bulk = journal(ledger, "raw_data_file.register_bulk", {"files": [
        file_spec("a.fits"), file_spec("dup.fits"), file_spec("c.fits")]})
    ok_after = journal(ledger, "raw_data_file.register",
                       file_spec("after.fits", instrument="ESPRESSO"))
    settle(ledger)
    entry = status(ledger, bulk.command_id)
    assert entry.status == REJECTED
    assert entry.reason is not None and "dup.fits" in entry.reason
    assert "already exists" in entry.reason and entry.reason_code == "conflict"
    # the failing command is isolated: its neighbours in the batch are applied
    assert status(ledger, ok_before.command_id).status == APPLIED
    assert status(ledger, ok_after.command_id).status == APPLIED
    assert ledger.store is not None
    for name in ("a.fits", "c.fits"):
        assert ledger.store.get(raw_data_file_id("HARPS", name)) is None
        assert ledger.queries.file(fid(name)) is None
    assert event_count(ledger) == before + 4  # the two neighbours' events and receipts only
    names = {r["name"] for r in table_rows(ledger)["raw_data_files"]}
    assert names == {"dup.fits", "after.fits"}


def test_bulk_with_an_unknown_execution_is_rejected_whole(ledger: Ledger) -> None:
    missing = str(uuid.uuid4())
    bulk = journal(ledger, "raw_data_file.register_bulk", {"files": [
        file_spec("x1.fits"), file_spec("x2.fits", unit=missing)]})
    [entry] = dispatch_until_final(ledger, [bulk.command_id])
    assert entry.status == REJECTED and entry.reason_code == "not_found"
    assert entry.reason_field == "files.1.executed_obs_unit_id"
    assert event_count(ledger) == 0


def test_package_created_together_with_its_files(ledger: Ledger) -> None:
    pkg = str(uuid.uuid4())
    sub = submit(ledger, "raw_data_package.create", CreateRawDataPackageRequest.model_validate(
        {"id": pkg, "name": "P", "files": [file_spec(f"p{i}.fits", 10 + i) for i in range(5)]}))
    assert sub.body["ids"]["raw_data_package_id"] == pkg
    assert sub.body["ids"]["raw_data_file_ids"] == [fid(f"p{i}.fits") for i in range(5)]
    settle(ledger)
    assert status(ledger, sub.entry.command_id).status == APPLIED
    row = ledger.queries.package(pkg)
    assert row is not None and row["file_count"] == 5 and row["total_size"] == 60
    assert [f["name"] for f in row["files"]] == [f"p{i}.fits" for i in range(5)]
    _, total, _, _ = ledger.queries.list_files(executed_obs_unit_id=None, package_id=pkg,
                                               instrument=None, file_type=None, name=None,
                                               limit=100, offset=0)
    assert total == 5
    # one transaction: 5 files registered (already in the package), the package, the receipt
    assert event_count(ledger) == 7


def test_package_over_the_size_limit_is_rejected_with_its_files(
        settings: Settings) -> None:
    small = settings.model_copy(update={"package_size_limit_bytes": 100})
    lg = Ledger(small, workers=False)
    try:
        sub = submit(lg, "raw_data_package.create", CreateRawDataPackageRequest.model_validate(
            {"name": "big", "files": [file_spec("big1.fits", 60), file_spec("big2.fits", 41)]}))
        settle(lg)
        entry = status(lg, sub.entry.command_id)
        assert entry.status == REJECTED and entry.reason_code == "limit_exceeded"
        assert entry.reason is not None and "101" in entry.reason and "100" in entry.reason
        assert event_count(lg) == 0 and lg.queries.file(fid("big1.fits")) is None
    finally:
        lg.stop()


# -- idempotency -----------------------------------------------------------------------------
def test_same_idempotency_key_twice_is_one_command(ledger: Ledger) -> None:
    req = start_req("OU-I")
    first = submit(ledger, "executed_obs_unit.start", req, key="idem-1")
    second = submit(ledger, "executed_obs_unit.start", req, key="idem-1")
    assert not first.replayed and second.replayed
    assert first.body == second.body and first.body["command_id"] == "idem-1"
    assert ledger.journal.counts() == {"accepted": 1}
    settle(ledger)
    third = submit(ledger, "executed_obs_unit.start", req, key="idem-1")
    assert third.replayed and third.body == first.body
    settle(ledger)
    assert ledger.journal.counts() == {"applied": 1}
    assert event_count(ledger) == 2  # one Started event and one receipt
    _, total, items, _ = ledger.queries.list_executions(
        status=None, instrument=None, start_from=None, start_to=None, obs_unit_id="OU-I",
        limit=10, offset=0)
    assert total == 1 and str(items[0]["id"]) == first.body["ids"]["executed_obs_unit_id"]


def test_same_key_with_a_different_body_conflicts(ledger: Ledger) -> None:
    req = start_req("OU-I")
    submit(ledger, "executed_obs_unit.start", req, key="idem-2")
    other = start_req("OU-J")
    with pytest.raises(IdempotencyConflict) as exc:
        submit(ledger, "executed_obs_unit.start", other, key="idem-2")
    assert exc.value.code == "idempotency_conflict"
    with pytest.raises(IdempotencyConflict):  # same body, another command type
        submit(ledger, "raw_data_file.register",
               RegisterRawDataFileRequest.model_validate(file_spec("z.fits")), key="idem-2")
    assert ledger.journal.counts() == {"accepted": 1}


def test_idempotency_across_a_restart(settings: Settings) -> None:
    req = start_req("OU-R")
    lg = Ledger(settings, workers=False)
    try:
        first = submit(lg, "executed_obs_unit.start", req, key="restart-key")
        settle(lg)
        applied = status(lg, "restart-key")
        assert applied.status == APPLIED
        events = event_count(lg)
    finally:
        lg.stop()

    lg = Ledger(settings, workers=False)
    try:
        again = submit(lg, "executed_obs_unit.start", req, key="restart-key")
        assert again.replayed and again.body == first.body
        assert lg.dispatcher is not None and lg.dispatcher.dispatch_once() == 0
        settle(lg)
        assert event_count(lg) == events
        entry = status(lg, "restart-key")
        assert (entry.status, entry.position) == (APPLIED, applied.position)
        assert lg.journal.counts() == {"applied": 1}
        with pytest.raises(IdempotencyConflict):
            submit(lg, "executed_obs_unit.start", start_req("OU-other"), key="restart-key")
        row = lg.queries.execution(first.body["ids"]["executed_obs_unit_id"])
        assert row is not None and row["pending"] is False
    finally:
        lg.stop()


# -- races, deferrals and outcomes -----------------------------------------------------------
@pytest.mark.parametrize("batch_size", [500, 1])
def test_two_finishes_racing(ledger: Ledger, batch_size: int) -> None:
    assert ledger.dispatcher is not None
    ledger.dispatcher.batch_size = batch_size
    for started_before in (True, False):
        _race(ledger, started_before)
    assert event_count(ledger) == 8


def _race(ledger: Ledger, started_before: bool) -> None:
    unit = str(uuid.uuid4())
    journal(ledger, "executed_obs_unit.start", {"id": unit, "obs_unit_id": "OU-RACE",
                                                "instrument": "HARPS",
                                                "start_time": T0.isoformat()})
    if started_before:
        settle(ledger)
    end = (T0 + timedelta(hours=1)).isoformat()
    a = journal(ledger, "executed_obs_unit.finish", {"id": unit, "status": "success",
                                                     "end_time": end})
    b = journal(ledger, "executed_obs_unit.finish", {"id": unit, "status": "aborted",
                                                     "end_time": end})
    settle(ledger)
    ea, eb = status(ledger, a.command_id), status(ledger, b.command_id)
    assert (ea.status, eb.status) == (APPLIED, REJECTED)
    assert eb.reason_code == "conflict" and eb.reason is not None
    assert "success" in eb.reason and "aborted" in eb.reason
    row = ledger.queries.execution(unit)
    assert row is not None and row["status"] == "success" and row["pending"] is False


def test_finish_that_overtook_its_start_waits_for_it(ledger: Ledger) -> None:
    assert ledger.dispatcher is not None
    unit = str(uuid.uuid4())
    fin = journal(ledger, "executed_obs_unit.finish", {
        "id": unit, "status": "success", "end_time": (T0 + timedelta(hours=1)).isoformat()})
    assert ledger.dispatcher.dispatch_once() == 1
    waiting = status(ledger, fin.command_id)
    assert waiting.status == ACCEPTED and waiting.reason_code == "waiting"
    assert waiting.reason is not None and waiting.reason.startswith("waiting")
    assert unit in waiting.reason and waiting.first_deferred_at is not None
    assert waiting.not_before > waiting.first_deferred_at, "retried later, not at once"
    # the smart query shows nothing for a finish without its start
    assert ledger.queries.execution(unit) is None
    st = journal(ledger, "executed_obs_unit.start", {
        "id": unit, "obs_unit_id": "OU-LATE", "instrument": "HARPS",
        "start_time": T0.isoformat()})
    e_fin, e_st = dispatch_until_final(ledger, [fin.command_id, st.command_id])
    assert e_st.status == APPLIED and e_fin.status == APPLIED, e_fin.reason
    assert e_fin.position > e_st.position  # type: ignore[operator]
    assert e_fin.attempts >= 2
    ledger.projector.catch_up()  # type: ignore[union-attr]
    row = ledger.queries.execution(unit)
    assert row is not None and row["status"] == "success" and row["pending"] is False


def test_finish_without_start_is_rejected_after_the_deadline(ledger: Ledger) -> None:
    assert ledger.settings.missing_target_deadline_s == 0.5
    unit = str(uuid.uuid4())
    t = time.monotonic()
    fin = journal(ledger, "executed_obs_unit.finish", {"id": unit, "status": "failed"})
    [entry] = dispatch_until_final(ledger, [fin.command_id])
    elapsed = time.monotonic() - t
    assert entry.status == REJECTED and entry.reason_code == "not_found"
    assert entry.reason == f"executed obs unit {unit} not found"
    assert entry.reason_field == "id"
    assert 0.5 <= elapsed < 5
    assert event_count(ledger) == 0


def test_command_states(ledger: Ledger) -> None:
    unit = start(ledger, "OU-S")
    cid = ledger.journal.unprojected(0, f"executed_obs_unit:{unit}")[0].command_id
    e = status(ledger, cid)
    assert (e.status, e.position, e.reason, e.finished_at) == (ACCEPTED, None, None, None)
    settle(ledger)
    e = status(ledger, cid)
    assert e.status == APPLIED and e.position == 2 and e.finished_at is not None
    assert e.response["ids"] == {"executed_obs_unit_id": unit}
    bad = journal(ledger, "executed_obs_unit.finish", {
        "id": unit, "status": "success", "end_time": (T0 - timedelta(seconds=1)).isoformat()})
    settle(ledger)
    e = status(ledger, bad.command_id)
    assert e.status == REJECTED and e.position is None
    assert e.reason_code == "conflict" and e.reason_field == "end_time"
    assert e.reason is not None and "before start_time" in e.reason
    assert ledger.journal.counts() == {"applied": 1, "rejected": 1}
    assert ledger.journal.get("no-such-command") is None


def test_invalid_journaled_payload_is_rejected(ledger: Ledger) -> None:
    entry = ledger.journal.append_sync(NewCommand(
        command_id="broken", command_type="executed_obs_unit.start", payload={"id": "x"},
        actor="a", correlation_id="c", request_hash="h", response={}, subjects=[]))
    unknown = ledger.journal.append_sync(NewCommand(
        command_id="unknown", command_type="telescope.explode", payload={}, actor="a",
        correlation_id="c", request_hash="h", response={}, subjects=[]))
    settle(ledger)
    for e in (entry.entry, unknown.entry):
        got = status(ledger, e.command_id)
        assert got.status == REJECTED and got.reason_code == "invalid"
    assert event_count(ledger) == 0


# -- smart queries ---------------------------------------------------------------------------
def test_smart_queries_show_pending_entities(ledger: Ledger) -> None:
    q = ledger.queries
    unit = start(ledger, "OU-Q")
    pkg = str(uuid.uuid4())
    submit(ledger, "raw_data_package.create", CreateRawDataPackageRequest.model_validate(
        {"id": pkg, "name": "PQ", "executed_obs_unit_id": unit,
         "files": [file_spec("q1.fits", 5, unit=unit)]}))

    def check(expect_pending: bool, command_status: str | None) -> None:
        rows = [q.execution(unit), q.file(fid("q1.fits")), q.package(pkg)]
        _, _, items, pending_count = q.list_executions(
            status="running", instrument="HARPS", start_from=None, start_to=None,
            obs_unit_id=None, limit=10, offset=0)
        _, obs = q.executions_of("OU-Q")
        _, _, files, _ = q.list_files(executed_obs_unit_id=unit, package_id=None,
                                      instrument=None, file_type=None, name=None, limit=10,
                                      offset=0)
        assert [str(i["id"]) for i in items] == [unit]
        assert [str(i["id"]) for i in obs] == [unit]
        assert [str(i["id"]) for i in files] == [fid("q1.fits")]
        rows += [items[0], obs[0], files[0]]
        assert pending_count == (1 if expect_pending else 0)
        for row in rows:
            assert row is not None
            assert row["pending"] is expect_pending, row
            assert row.get("command_status") == command_status, row
        assert rows[0]["status"] == "running" and rows[2]["status"] == "building"  # type: ignore[index]
        assert rows[1]["package_id"] == pkg and rows[2]["file_count"] == 1  # type: ignore[index]

    check(True, "accepted")
    assert q.execution(unit)["last_position"] is None  # type: ignore[index]
    ledger.dispatcher.drain()  # type: ignore[union-attr]
    check(True, "applied")
    ledger.projector.catch_up()  # type: ignore[union-attr]
    check(False, None)

    # a pending change of a projected entity
    submit(ledger, "executed_obs_unit.finish", FinishExecutedObsUnitRequest(
        status="failed", end_time=T0 + timedelta(hours=2), metadata={}), path={"id": unit})
    row = q.execution(unit)
    assert row is not None and row["status"] == "failed" and row["pending"] is True
    assert row["command_status"] == "accepted" and len(row["pending_command_ids"]) == 1
    ledger.dispatcher.drain()  # type: ignore[union-attr]
    assert q.execution(unit)["command_status"] == "applied"  # type: ignore[index]
    ledger.projector.catch_up()  # type: ignore[union-attr]
    row = q.execution(unit)
    assert row is not None and row["status"] == "failed" and row["pending"] is False


def test_smart_query_of_a_rejected_command_shows_nothing_pending(ledger: Ledger) -> None:
    submit(ledger, "raw_data_file.register",
           RegisterRawDataFileRequest.model_validate(file_spec("r.fits", 1)))
    settle(ledger)
    journal(ledger, "raw_data_file.register", file_spec("r.fits", 2))  # a duplicate
    row = ledger.queries.file(fid("r.fits"))
    assert row is not None and row["size"] == 1
    settle(ledger)
    row = ledger.queries.file(fid("r.fits"))
    assert row is not None and row["size"] == 1 and row["pending"] is False


# -- projection ------------------------------------------------------------------------------
def test_rebuild_produces_the_live_tables(ledger: Ledger) -> None:
    assert ledger.projector is not None
    build_night(ledger)
    submit(ledger, "raw_data_file.register_bulk", BulkRegisterRawDataFilesRequest.model_validate(
        {"files": [file_spec(f"r{i}.fits", i) for i in range(50)]}))
    settle(ledger)
    live = table_rows(ledger)
    assert all(live[t] for t in READ_MODELS), "every table has rows"
    position = ledger.projector.read_position()
    assert position == head(ledger)

    assert ledger.projector.rebuild() == position
    assert table_rows(ledger) == live
    assert ledger.projector.read_position() == position == ledger.projector.position

    # the projector keeps working on the rebuilt tables
    unit = start(ledger, "OU-AFTER")
    settle(ledger)
    assert ledger.projector.read_position() == head(ledger) > position
    row = ledger.queries.execution(unit)
    assert row is not None and row["pending"] is False
    assert ledger.projector.rebuild() == head(ledger)  # and a second rebuild works too
    assert len(table_rows(ledger)["executed_obs_units"]) == 2


def test_read_model_position_equals_store_head(ledger: Ledger) -> None:
    assert ledger.projector is not None
    assert ledger.projector.catch_up() == 0 == ledger.queries.read_model_position()
    for i in range(3):
        start(ledger, f"OU-{i}")
    ledger.dispatcher.drain()  # type: ignore[union-attr]
    assert ledger.queries.read_model_position() == 0
    assert ledger.projector.catch_up() == head(ledger) == 6
    assert ledger.queries.read_model_position() == 6 == ledger.projector.read_position()


def test_projection_in_small_pages(settings: Settings) -> None:
    lg = Ledger(settings.model_copy(update={"projection_page_size": 3}), workers=False)
    try:
        build_night(lg)
        assert settle(lg) == head(lg)
        pkg = lg.queries.list_files(executed_obs_unit_id=None, package_id=None,
                                    instrument=None, file_type=None, name=None, limit=100,
                                    offset=0)
        assert pkg[1] == 4
    finally:
        lg.stop()


# -- replays ---------------------------------------------------------------------------------
def _reset(settings: Settings, command_ids: list[str]) -> None:
    with sqlite3.connect(settings.journal_file) as conn:
        conn.executemany("UPDATE commands SET status='accepted', position=NULL, reason=NULL, "
                         "finished_at=NULL WHERE command_id=?", [(c,) for c in command_ids])


REPLAYABLE = ["start", "finish", "register", "bulk", "create", "add", "finalize", "stage",
              "progress", "cancel"]


def test_replayed_command_is_recognised_by_its_receipt(ledger: Ledger,
                                                       settings: Settings) -> None:
    ids = build_night(ledger)
    settle(ledger)
    events = event_count(ledger)
    rows = table_rows(ledger)
    for which in REPLAYABLE:  # each replay alone: nothing changes, so one night serves all
        cid = ids[f"cmd:{which}"]
        original = status(ledger, cid)
        assert original.status == APPLIED
        _reset(settings, [cid])
        assert status(ledger, cid).status == ACCEPTED
        settle(ledger)
        replayed = status(ledger, cid)
        assert (replayed.status, replayed.position) == (APPLIED, original.position), (
            which, replayed.reason)
        assert event_count(ledger) == events, f"{which}: no new events"
        assert table_rows(ledger) == rows, which


def test_replayed_batch_is_recognised(ledger: Ledger, settings: Settings) -> None:
    ids = build_night(ledger)
    settle(ledger)
    cids = [ids[f"cmd:{w}"] for w in REPLAYABLE]
    originals = {c: status(ledger, c).position for c in cids}
    events = event_count(ledger)
    _reset(settings, cids)
    fresh = start(ledger, "OU-FRESH")  # a new command in the same batch is still applied
    settle(ledger)
    for c in cids:
        e = status(ledger, c)
        assert (e.status, e.position) == (APPLIED, originals[c]), (c, e.reason)
    assert event_count(ledger) == events + 2
    ledger.projector.catch_up()  # type: ignore[union-attr]
    assert ledger.projector.read_position() == head(ledger)  # type: ignore[union-attr]
    assert ledger.queries.execution(fresh) is not None


# -- the journal -----------------------------------------------------------------------------
def test_journal_appends_from_successive_event_loops(tmp_path: Any) -> None:
    """An append queued behind a flush started by another (since closed) event loop."""
    j = Journal(tmp_path / "journal.sqlite3")
    original = j._write_batch
    calls: list[int] = []
    a_done = threading.Event()

    def write(commands: list[NewCommand]) -> Any:
        calls.append(len(commands))
        if len(calls) == 1:  # hold the first flush until the second append is queued
            deadline = time.monotonic() + 5
            while not j._queue and time.monotonic() < deadline:
                time.sleep(0.005)
        elif len(calls) == 2:  # the first caller's loop is closed by now
            a_done.wait(5)
        return original(commands)

    j._write_batch = write  # type: ignore[method-assign]

    def cmd(cid: str) -> NewCommand:
        return NewCommand(command_id=cid, command_type="t", payload={}, actor="a",
                          correlation_id="c", request_hash="h", response={}, subjects=[])

    results: dict[str, Any] = {}

    def run(cid: str, done: threading.Event | None = None) -> None:
        results[cid] = asyncio.run(j.append(cmd(cid)))
        if done is not None:
            done.set()

    a = threading.Thread(target=run, args=("a", a_done), daemon=True)
    a.start()
    while not calls:
        time.sleep(0.005)
    b = threading.Thread(target=run, args=("b",), daemon=True)
    b.start()
    a.join(5)
    b.join(5)
    try:
        assert not b.is_alive(), "the second append never got its answer"
        assert results["a"].created and results["b"].created
        assert calls == [1, 1]
        # the journal still works afterwards
        assert asyncio.run(j.append(cmd("c"))).entry.command_id == "c"
    finally:
        j.close()
