"""Processing jobs through their handlers, the unit of work and the in-memory store: request
(inputs from the raw data files), the worker's lease, steps and progress, success (ingest
facts, built and catalogued products), failure and retries, cancel."""

from __future__ import annotations

from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest

from commands.processing import ProcessingCommand
from commands.raw_data import RawDataCommand
from domain.errors import IllegalTransition, InvalidCommand, TargetNotFound
from domain.processing import DataProduct, ProcessingJob
from domain.raw_data import RawDataFile
from tests.unit.runner import Clock, CommandRunner, file_fields

P = ProcessingCommand
SHA = "b" * 64
WORKER = "host-1:4242:ab12"


def raw_files(run: CommandRunner, *names: str) -> list[UUID]:
    return run(RawDataCommand.RAW_DATA_FILE_REGISTER_BULK,
               files=[file_fields(n) for n in names]).ids


def job(run: CommandRunner, kind: str = "ingest", **fields: Any) -> UUID:
    job_id = uuid4()
    run(P.PROCESSING_JOB_REQUEST, id=job_id, kind=kind, **fields)
    return job_id


def claimed(run: CommandRunner, kind: str = "ingest", **fields: Any) -> UUID:
    job_id = job(run, kind, **fields)
    run(P.PROCESSING_JOB_CLAIM, id=job_id, worker=WORKER, lease_s=60)
    return job_id


def product(name: str, file_id: UUID, kind: str = "combined_image") -> dict[str, Any]:
    return {"kind": kind, "name": name, "area": "products", "key": f"p/{name}", "size": 10,
            "sha256": SHA, "media_type": "application/fits",
            "inputs": [{"file_id": file_id, "role": "science"}]}


def test_request_records_its_inputs_from_the_raw_data_files(run: CommandRunner) -> None:
    file_ids = raw_files(run, "a.fits", "b.fits")
    job_id = uuid4()
    applied = run(P.PROCESSING_JOB_REQUEST, id=job_id, kind="process", file_ids=file_ids,
                  algorithm="ccd_stack", algorithm_version="1.1.0", parameters={"sigma": 3.0})
    assert applied.ids == [job_id] and applied.names == ["ProcessingJob.Requested"]
    j = run.load(ProcessingJob, job_id)
    assert (j.status, j.kind, j.algorithm, j.parameters) == ("requested", "process",
                                                             "ccd_stack", {"sigma": 3.0})
    assert [(i["file_id"], i["name"], i["size"]) for i in j.inputs] == [
        (str(file_ids[0]), "a.fits", 100), (str(file_ids[1]), "b.fits", 100)]
    assert j.requested_at == run.policy.clock()


def test_request_refusals(run: CommandRunner) -> None:
    refusal = run.refused(P.PROCESSING_JOB_REQUEST, id=uuid4(), kind="ingest",
                          file_ids=[uuid4()])
    assert isinstance(refusal, TargetNotFound) and refusal.field == "file_ids.0"
    (f,) = raw_files(run, "a.fits")
    refusal = run.refused(P.PROCESSING_JOB_REQUEST, id=uuid4(), kind="process", file_ids=[f])
    assert isinstance(refusal, InvalidCommand) and refusal.field == "algorithm"
    refusal = run.refused(P.PROCESSING_JOB_REQUEST, id=uuid4(), kind="catalog",
                          product_ids=[uuid4()])
    assert isinstance(refusal, TargetNotFound) and refusal.field == "product_ids.0"


def test_the_lease_holder_reports_steps_and_progress(run: CommandRunner) -> None:
    job_id = claimed(run, file_ids=raw_files(run, "a.fits"))
    j = run.load(ProcessingJob, job_id)
    assert (j.status, j.lease_worker, j.attempts) == ("running", WORKER, 1)
    assert j.lease_expires_at == run.policy.clock() + timedelta(seconds=60)
    held = {"id": job_id, "worker": WORKER, "attempt": 1}
    assert run(P.PROCESSING_JOB_START_STEP, **held, name="read headers").names == [
        "ProcessingJob.StepStarted"]
    run(P.PROCESSING_JOB_PROGRESS, **held, fraction=0.5)
    run(P.PROCESSING_JOB_COMPLETE_STEP, **held, name="read headers")
    run(P.PROCESSING_JOB_RENEW, **held, lease_s=120)
    j = run.load(ProcessingJob, job_id)
    assert j.progress == 0.5
    assert [(s["name"], s["status"]) for s in j.steps] == [("read headers", "completed")]
    assert j.lease_expires_at == run.policy.clock() + timedelta(seconds=120)
    other = {"id": job_id, "worker": "host-2:1:cd34", "attempt": 1}
    refusal = run.refused(P.PROCESSING_JOB_PROGRESS, **other, fraction=0.9)
    assert isinstance(refusal, IllegalTransition)  # not the holder
    refusal = run.refused(P.PROCESSING_JOB_CLAIM, id=job_id, worker="host-2:1:cd34",
                          lease_s=60)
    assert isinstance(refusal, IllegalTransition)  # the lease is live


def test_an_expired_lease_is_taken_over(run: CommandRunner, clock: Clock) -> None:
    job_id = claimed(run, file_ids=raw_files(run, "a.fits"))
    clock.advance(seconds=61)
    applied = run(P.PROCESSING_JOB_CLAIM, id=job_id, worker="host-2:1:cd34", lease_s=60)
    assert applied.names == ["ProcessingJob.LeaseExpired", "ProcessingJob.LeaseAcquired"]
    j = run.load(ProcessingJob, job_id)
    assert (j.lease_worker, j.attempts) == ("host-2:1:cd34", 2)


def test_an_ingest_job_records_header_facts_on_its_files(run: CommandRunner) -> None:
    a, b = raw_files(run, "a.fits", "b.fits")
    job_id = claimed(run, file_ids=[a, b])
    applied = run(P.PROCESSING_JOB_SUCCEED, id=job_id, worker=WORKER, attempt=1,
                  files=[{"file_id": a, "name": "a.fits", "metadata": {"IMAGETYP": "ZERO"}}])
    assert applied.ids == [job_id, a]
    assert applied.names == ["ProcessingJob.Succeeded", "RawDataFile.Ingested"]
    assert run.load(ProcessingJob, job_id).status == "succeeded"
    assert run.load(RawDataFile, a).fits_metadata == {"IMAGETYP": "ZERO"}
    assert run.load(RawDataFile, b).fits_metadata == {}


def test_an_ingest_job_reports_only_its_inputs(run: CommandRunner) -> None:
    a, other = raw_files(run, "a.fits", "other.fits")
    job_id = claimed(run, file_ids=[a])
    refusal = run.refused(P.PROCESSING_JOB_SUCCEED, id=job_id, worker=WORKER, attempt=1,
                          files=[{"file_id": other, "name": "other.fits"}])
    assert isinstance(refusal, InvalidCommand) and refusal.field == "files.0.file_id"
    assert run.load(ProcessingJob, job_id).status == "running"


def test_a_process_job_builds_and_catalogues_its_products(run: CommandRunner) -> None:
    (f,) = raw_files(run, "a.fits")
    job_id = claimed(run, "process", file_ids=[f], algorithm="ccd_stack",
                     algorithm_version="1.1.0", catalog=True, publish=True)
    applied = run(P.PROCESSING_JOB_SUCCEED, id=job_id, worker=WORKER, attempt=1,
                  products=[product("stack.fits", f)], software={"numpy": "2.4.6"})
    assert applied.names == ["ProcessingJob.Succeeded", "DataProduct.Built",
                             "DataProduct.Catalogued"]
    (product_id,) = applied.ids[1:]
    built = run.load(DataProduct, product_id)
    assert (built.job_id, built.name, built.algorithm) == (job_id, "stack.fits", "ccd_stack")
    assert built.status == "published"
    assert [(i["file_id"], i["role"]) for i in built.inputs] == [(str(f), "science")]

    catalog = claimed(run, "catalog", product_ids=[product_id], archive=True,
                      metadata={"release": "DR1"})
    applied = run(P.PROCESSING_JOB_SUCCEED, id=catalog, worker=WORKER, attempt=1,
                  catalogued=[product_id])
    assert applied.names == ["ProcessingJob.Succeeded", "DataProduct.Catalogued"]
    assert applied.ids == [catalog, product_id]
    archived = run.load(DataProduct, product_id)
    assert (archived.status, archived.published, archived.archived) == ("archived", True, True)
    assert archived.metadata == {"release": "DR1"}
    assert run.history(product_id) == ["Built", "Catalogued", "Catalogued"]


def test_a_process_job_names_only_its_inputs(run: CommandRunner) -> None:
    (f,) = raw_files(run, "a.fits")
    job_id = claimed(run, "process", file_ids=[f], algorithm="ccd_stack",
                     algorithm_version="1.1.0")
    refusal = run.refused(P.PROCESSING_JOB_SUCCEED, id=job_id, worker=WORKER, attempt=1,
                          products=[product("stack.fits", uuid4())])
    assert isinstance(refusal, InvalidCommand)
    assert refusal.field == "products.0.inputs.0.file_id"


@pytest.mark.parametrize(("retryable", "status"), [(True, "requested"), (False, "failed")])
def test_fail_releases_a_retryable_attempt(run: CommandRunner, retryable: bool,
                                           status: str) -> None:
    job_id = claimed(run, file_ids=raw_files(run, "a.fits"), max_attempts=2)
    applied = run(P.PROCESSING_JOB_FAIL, id=job_id, worker=WORKER, attempt=1,
                  reason="object store unreachable", retryable=retryable)
    assert applied.names == ["ProcessingJob.Released" if retryable else "ProcessingJob.Failed"]
    j = run.load(ProcessingJob, job_id)
    assert (j.status, j.lease_worker) == (status, None)


def test_cancel_a_waiting_job_at_once_a_running_one_by_its_worker(run: CommandRunner) -> None:
    waiting = job(run, file_ids=raw_files(run, "a.fits"))
    assert run(P.PROCESSING_JOB_CANCEL, id=waiting, reason="wrong files").names == [
        "ProcessingJob.CancelRequested", "ProcessingJob.Cancelled"]
    assert run.load(ProcessingJob, waiting).status == "cancelled"

    running = claimed(run, file_ids=raw_files(run, "b.fits"))
    assert run(P.PROCESSING_JOB_CANCEL, id=running).names == ["ProcessingJob.CancelRequested"]
    assert run.load(ProcessingJob, running).status == "running"
    assert isinstance(run.refused(P.PROCESSING_JOB_CANCEL, id=running), IllegalTransition)
    refusal = run.refused(P.PROCESSING_JOB_SUCCEED, id=running, worker=WORKER, attempt=1)
    assert isinstance(refusal, IllegalTransition)  # a cancel is requested
    run(P.PROCESSING_JOB_CONFIRM_CANCEL, id=running, worker=WORKER, attempt=1)
    j = run.load(ProcessingJob, running)
    assert (j.status, j.reason) == ("cancelled", "cancelled")
