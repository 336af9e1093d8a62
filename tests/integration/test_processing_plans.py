"""The lookups a processing request makes before anything is journaled
(``queries.processing_plans``, ``queries.data_products``), on a ledger without HTTP: the
inputs named directly, by result or by time window, in order and each once; the job
requests; and the refusals, each naming the part of the request at fault."""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID, uuid4

import pytest

from bootstrap.ledger import Ledger
from commands.processing import CatalogRequest, IngestRequest, PlanRequest
from commands.raw_data import BulkRegisterRawDataFilesRequest, RawDataCommand
from queries.data_products import lineage_document, product_row
from queries.processing_plans import (
    catalog_job,
    files_written_in,
    ingest_job,
    input_view,
    plan,
    resolve_inputs,
)
from queries.refusals import Refusal
from tests.integration.test_integration import T0, fid, file_spec, settle, submit


def registered(ledger: Ledger, *names: str) -> list[UUID]:
    """Raw data files (created at T0) registered and projected."""
    submit(ledger, RawDataCommand.RAW_DATA_FILE_REGISTER_BULK, BulkRegisterRawDataFilesRequest(
        files=[file_spec(n, size=100 + i) for i, n in enumerate(names)]))
    settle(ledger)
    return [UUID(fid(n)) for n in names]


def test_inputs_in_the_order_named_each_once(ledger: Ledger) -> None:
    a, b = registered(ledger, "a.fits", "b.fits")
    inputs = resolve_inputs(ledger, [b, a, b], [])
    assert [i["file_id"] for i in inputs] == [str(b), str(a)]
    assert inputs[0]["name"] == "b.fits" and inputs[0]["size"] == 101
    assert inputs[0]["metadata"] == {}  # no ingest job recorded FITS facts yet
    assert input_view(inputs[1])["checksum"] == {
        "algorithm": "md5", "value": inputs[1]["checksum_value"]}


def test_an_unknown_file_or_result_is_refused_by_its_field(ledger: Ledger) -> None:
    (a,) = registered(ledger, "a.fits")
    unknown = uuid4()
    with pytest.raises(Refusal) as e:
        resolve_inputs(ledger, [a, unknown], [])
    assert (e.value.code, e.value.field, e.value.message) == (
        "not_found", "file_ids.1", "unknown raw data file")
    assert e.value.detail == f"raw data file {unknown} not found"
    with pytest.raises(Refusal) as e:
        resolve_inputs(ledger, [a], [unknown])
    assert (e.value.field, e.value.message) == ("result_ids.0", "unknown result")


def test_the_files_written_in_a_window(ledger: Ledger) -> None:
    a, b = registered(ledger, "a.fits", "b.fits")
    assert sorted(files_written_in(ledger, T0, T0 + timedelta(seconds=1))) == sorted([a, b])
    assert files_written_in(ledger, None, T0) == []
    with pytest.raises(Refusal) as e:
        plan(ledger, PlanRequest(start_time=T0 + timedelta(days=1)))
    assert (e.value.detail, e.value.field) == (
        "no raw data file was written in the time window", "start_time")


def test_an_ingest_job_of_the_files_named(ledger: Ledger) -> None:
    a, b = registered(ledger, "a.fits", "b.fits")
    job_id = uuid4()
    job = ingest_job(ledger, IngestRequest(id=job_id, file_ids=[b, a]))
    assert (job.id, job.kind, job.file_ids) == (job_id, "ingest", [b, a])
    assert job.max_attempts == ledger.settings.processing_max_attempts


def test_unknown_products_are_refused(ledger: Ledger) -> None:
    unknown = uuid4()
    with pytest.raises(Refusal) as e:
        catalog_job(ledger, CatalogRequest(product_ids=[unknown]))
    assert (e.value.field, e.value.message) == ("product_ids.0", "unknown product")
    with pytest.raises(Refusal, match=f"data product {unknown} not found"):
        product_row(ledger.processing, unknown)
    with pytest.raises(Refusal, match=f"data product {unknown} not found") as e:
        lineage_document(ledger.processing, unknown, "prov-json")
    assert e.value.field is None
