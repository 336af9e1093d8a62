"""What a processing job would use and do, looked up before anything is journaled: the raw
data files a request names (directly, through observation results, or by a time window),
the plan of a process job (``POST /ops/plan``), and the job requests of ``POST
/ops/ingest``, ``/ops/process`` and ``/ops/catalog``. Refusals are ``queries.refusals``'.

Everything reads from a :class:`ProcessingSources` (``bootstrap.ledger.Ledger`` is one): the
read models, the event store (FITS facts recorded by ingest jobs, observation results'
assets), the object store and the settings."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import select

from commands.algorithms import AlgorithmInput, algorithm, validate_inputs
from commands.processing import (
    CatalogRequest,
    IngestRequest,
    PlanRequest,
    ProcessRequest,
    RequestProcessingJob,
)
from domain.raw_data import RawDataFile
from infra.event_store import EventStore
from infra.object_store import Area, ObjectStore, ObjectStoreUnavailable
from infra.read_model_db import ReadModelsUnavailable
from infra.settings import Settings
from queries.processing import ProcessingQueries
from queries.refusals import Refusal
from queries.service import QueryService, Reading

#: The most raw data files a plan's time window may select (a request's file_ids' limit).
WINDOW_MAX_FILES = 1000


class ProcessingSources(Protocol):
    """Where the lookups read (``bootstrap.ledger.Ledger`` provides each)."""

    settings: Settings
    queries: QueryService
    processing: ProcessingQueries

    @property
    def objects(self) -> ObjectStore: ...

    def event_store(self) -> EventStore: ...


def file_input(sources: ProcessingSources, file_id: UUID, field: str) -> dict[str, Any]:
    """A raw data file as a job would record it (read model ⊕ journal; FITS facts from the
    event store when an ingest job recorded them); ``field`` names it in a refusal."""
    row = sources.queries.file(str(file_id))
    if row is None:
        raise Refusal("not_found", f"raw data file {file_id} not found", field,
                      "unknown raw data file")
    agg = sources.event_store().get(file_id)
    metadata = dict(getattr(agg, "fits_metadata", {}) or {}) if isinstance(
        agg, RawDataFile) else {}
    return {"file_id": str(file_id), "name": row["name"], "instrument": row["instrument"],
            "relative_path": row["relative_path"], "size": row["size"],
            "checksum_algorithm": row["checksum"]["algorithm"],
            "checksum_value": row["checksum"]["value"], "file_type": row["file_type"],
            "executed_obs_unit_id": None if row["executed_obs_unit_id"] is None
            else str(row["executed_obs_unit_id"]), "metadata": metadata}


def resolve_inputs(sources: ProcessingSources, file_ids: list[UUID], result_ids: list[UUID],
                   ) -> list[dict[str, Any]]:
    """The raw data files named, then the raw data files contributed to the results named
    (each file once, in that order); refused naming the unknown one, or a result without
    raw data files yet."""
    ids: list[tuple[UUID, str]] = [(f, f"file_ids.{i}") for i, f in enumerate(file_ids)]
    store = sources.event_store()
    for i, rid in enumerate(result_ids):
        result = store.get(rid)
        if result is None or not hasattr(result, "assets"):
            raise Refusal("not_found", f"observation result {rid} not found",
                          f"result_ids.{i}", "unknown result")
        files = sorted(a.split(":", 1)[1] for a in result.assets
                       if a.startswith("raw_data_file:"))
        if not files:  # the result's state, not the request
            raise Refusal("conflict", f"observation result {rid} has no raw data files yet",
                          f"result_ids.{i}")
        ids.extend((UUID(f), f"result_ids.{i}") for f in files)
    seen: set[UUID] = set()
    inputs = []
    for fid, field in ids:
        if fid not in seen:
            seen.add(fid)
            inputs.append(file_input(sources, fid, field))
    return inputs


def input_view(i: dict[str, Any]) -> dict[str, Any]:
    """A job input as the API shows it (``JobInputView``)."""
    return {"file_id": i["file_id"], "name": i["name"], "instrument": i["instrument"],
            "relative_path": i["relative_path"], "size": i["size"],
            "checksum": {"algorithm": i["checksum_algorithm"], "value": i["checksum_value"]},
            "file_type": i["file_type"], "executed_obs_unit_id": i["executed_obs_unit_id"]}


def local_path(sources: ProcessingSources, i: dict[str, Any]) -> Path:
    """Where the worker would find the file (its header is read when it is local)."""
    try:
        local = sources.objects.local_path(Area.RAW, i["relative_path"])
    except (ValueError, ObjectStoreUnavailable):
        local = None
    return local if local is not None and local.is_file() else \
        sources.settings.raw_data_dir / i["relative_path"]


def files_written_in(sources: ProcessingSources, start: datetime | None, end: datetime | None,
                     ) -> list[UUID]:
    """The raw data files written (``created_at``) in [start, end), oldest first, as the read
    models show them; refused beyond :data:`WINDOW_MAX_FILES`, ``ReadModelsUnavailable``
    while they do not answer."""
    f = sources.queries.t.raw_data_files
    conds = ([f.c.created_at >= start] if start else []) + (
        [f.c.created_at < end] if end else [])

    def query(r: Reading) -> list[UUID]:
        if not r.available:
            raise ReadModelsUnavailable("the read-model database does not answer")
        return [UUID(x["id"]) for x in r.rows(select(f.c.id).where(*conds).order_by(
            f.c.created_at, f.c.id).limit(WINDOW_MAX_FILES + 1))]

    found = sources.queries.read(query)
    if len(found) > WINDOW_MAX_FILES:
        raise Refusal(
            "invalid", "Validation failed", "start_time" if start else "end_time",
            f"the time window selects more than {WINDOW_MAX_FILES} raw data files: narrow it")
    return found


def plan(sources: ProcessingSources, body: PlanRequest | ProcessRequest) -> dict[str, Any]:
    """What a process job would do (records nothing), as ``PlanView``: refused for an unknown
    algorithm or bad parameters (what the request says, checked first), for unknown files
    or results (or a time window in which no raw data file was written), and for inputs the
    algorithm cannot use."""
    algorithm(body.algorithm, body.algorithm_version).parameters(body.parameters)
    file_ids = list(body.file_ids)
    start, end = getattr(body, "start_time", None), getattr(body, "end_time", None)
    if start or end:
        written = files_written_in(sources, start, end)
        if not written and not (file_ids or body.result_ids):
            raise Refusal("not_found", "no raw data file was written in the time window",
                          "start_time" if start else "end_time")
        named = set(file_ids)
        file_ids += [i for i in written if i not in named]
    inputs = resolve_inputs(sources, file_ids, body.result_ids)
    local = [AlgorithmInput(
        file_id=UUID(i["file_id"]), name=i["name"], path=local_path(sources, i),
        size=int(i["size"]), checksum=(i["checksum_algorithm"], i["checksum_value"]),
        file_type=i["file_type"], metadata=i["metadata"]) for i in inputs]
    algo, params, p = validate_inputs(body.algorithm, body.algorithm_version, local,
                                      body.parameters)
    return {"algorithm": algo.name, "algorithm_version": algo.version,
            "parameters": params.model_dump(mode="json"), "steps": list(p.steps),
            "inputs": [input_view(i) for i in inputs], "input_count": len(inputs),
            "input_bytes": sum(int(i["size"]) for i in inputs),
            "products": [{"kind": x.kind, "name": x.name, "media_type": x.media_type,
                          "description": x.description} for x in p.products],
            "notes": list(p.notes)}


def ingest_job(sources: ProcessingSources, body: IngestRequest) -> RequestProcessingJob:
    """The ingest job of the files named (directly or through results)."""
    inputs = resolve_inputs(sources, body.file_ids, body.result_ids)
    return RequestProcessingJob(
        id=body.id, kind="ingest", file_ids=[UUID(i["file_id"]) for i in inputs],
        max_attempts=sources.settings.processing_max_attempts)


def process_job(sources: ProcessingSources, body: ProcessRequest) -> RequestProcessingJob:
    """The process job of a request, checked as :func:`plan` checks it."""
    planned = plan(sources, body)
    return RequestProcessingJob(
        id=body.id, kind="process", file_ids=[UUID(i["file_id"]) for i in planned["inputs"]],
        algorithm=planned["algorithm"], algorithm_version=planned["algorithm_version"],
        parameters=planned["parameters"], catalog=body.catalog, publish=body.publish,
        archive=body.archive, max_attempts=sources.settings.processing_max_attempts,
        # the products of one result's files belong to it (GET /products?result_id=)
        result_id=body.result_ids[0] if len(body.result_ids) == 1 else None)


def catalog_job(sources: ProcessingSources, body: CatalogRequest) -> RequestProcessingJob:
    """The catalog job of the products named; refused naming the first unknown one."""
    for i, pid in enumerate(body.product_ids):
        if sources.processing.product(str(pid)) is None:
            raise Refusal("not_found", f"data product {pid} not found", f"product_ids.{i}",
                          "unknown product")
    return RequestProcessingJob(
        id=body.id, kind="catalog", product_ids=body.product_ids, publish=body.publish,
        archive=body.archive, metadata=body.metadata,
        max_attempts=sources.settings.processing_max_attempts)
