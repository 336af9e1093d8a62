"""HTTP for the processing pipeline: plan (synchronous, records nothing), ingest, process and
catalog jobs (critical commands a worker executes), the jobs' smart queries and cancel, the
algorithm registry, and the data products with their downloads and lineage.
Included by ``api.app.create_app``."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.accounts import allow
from api.deps import (
    BUILT,
    ERRORS,
    REQUESTED,
    IdPath,
    MinPosition,
    as_str,
    command_route,
    counts_route,
    feature_router,
    ledger_of,
    list_route,
    read_page,
    row_route,
)
from api.errors import error_doc
from api.paging import LINK_HEADER, PageRequest, paging_with_skip
from commands.algorithms import describe, registered_algorithms
from commands.processing import (
    CancelJobRequest,
    CatalogRequest,
    IngestRequest,
    PlanRequest,
    ProcessingCommand,
    ProcessRequest,
)
from domain.accounts import OPERATORS, READERS
from infra.object_store import content_disposition
from queries.counts import job_counts, product_counts
from queries.data_products import lineage_document, product_download
from queries.models import (
    READ_MODELS_DESCRIPTION,
    DataProductCounts,
    ProcessingJobCounts,
    ReadModelsState,
)
from queries.processing_plans import (
    catalog_job,
    ingest_job,
    plan,
    process_job,
)

JOBS_TAG = "processing jobs"
PRODUCTS_TAG = "data products"
#: Data products are read from the read models alone (no pending rows): ``Link`` on the 200.
PRODUCT_LIST_RESPONSES: dict[int | str, dict[str, Any]] = {
    **ERRORS, 200: {"description": "A page of products.", "headers": LINK_HEADER}}
JOB_STATUSES = Literal["requested", "running", "succeeded", "failed", "cancelled"]
JOB_KINDS = Literal["ingest", "process", "catalog"]
PRODUCT_STATUSES = Literal["built", "catalogued", "published", "archived"]
STORE_ERRORS: dict[int | str, dict[str, Any]] = {
    503: error_doc("Object store or event store unavailable", retry_after=True)}


# -- views ------------------------------------------------------------------------------------
class ChecksumView(BaseModel):
    algorithm: str
    value: str


class JobInputView(BaseModel):
    file_id: str
    name: str
    instrument: str
    relative_path: str
    size: int
    checksum: ChecksumView
    file_type: str
    executed_obs_unit_id: str | None


class StepView(BaseModel):
    name: str
    attempt: int
    status: str = Field(description="running, completed or interrupted (the lease expired, "
                        "the job was released or cancelled).")
    started_at: datetime | None = None
    completed_at: datetime | None = None
    duration_s: float | None


class LeaseView(BaseModel):
    worker: str
    attempt: int
    expires_at: datetime | None = None


class JobView(BaseModel):
    id: str
    kind: str = Field(description="ingest, process or catalog")
    status: str = Field(description="requested, running, succeeded, failed, cancelled")
    algorithm: str | None
    algorithm_version: str | None
    parameters: dict[str, Any]
    inputs: list[JobInputView]
    product_ids: list[str] = Field(description="A catalog job's products.")
    input_count: int
    input_bytes: int
    result_id: str | None = Field(description="The observation result of a scheduler's run.")
    run_id: str | None
    catalog: bool
    publish: bool
    archive: bool
    attempts: int
    max_attempts: int
    lease: LeaseView | None = Field(description="Who holds the job, until when.")
    cancel_requested: bool
    progress: float = Field(description="0..1")
    current_step: str | None
    steps: list[StepView]
    outputs: list[dict[str, Any]] = Field(description="process: the products (kind, key, "
                                          "size, sha256, media type, metrics); ingest: each "
                                          "file's FITS facts; catalog: the products catalogued.")
    software: dict[str, str]
    reason: str | None = Field(description="Why it failed or was cancelled.")
    requested_by: str = Field(description="Who requested it (the principal's actor).")
    completed_by: str | None = Field(description="The worker whose attempt succeeded.")
    requested_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None
    updated_at: datetime | None = None
    last_position: int | None
    pending: bool
    command_status: str | None
    pending_command_ids: list[str]
    read_model_position: int | None = None
    read_models: ReadModelsState = Field("available", description=READ_MODELS_DESCRIPTION)

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "9d4a3c1e-6b2f-4e8a-9c1d-2f3e4a5b6c7d", "kind": "process", "status": "running",
        "algorithm": "ccd_stack", "algorithm_version": "1.1.0", "parameters": {"sigma": 3.0},
        "inputs": [], "product_ids": [], "input_count": 3, "input_bytes": 1672320,
        "result_id": None, "run_id": None, "catalog": True, "publish": True,
        "archive": False, "attempts": 1, "max_attempts": 3,
        "lease": {"worker": "host-1:4242:ab12cd34", "attempt": 1,
                  "expires_at": "2026-11-30T09:01:00Z"},
        "cancel_requested": False, "progress": 0.42, "current_step": "combine",
        "steps": [{"name": "fetch inputs", "attempt": 1, "status": "completed",
                   "started_at": "2026-11-30T09:00:00Z",
                   "completed_at": "2026-11-30T09:00:01Z", "duration_s": 0.8}],
        "outputs": [], "software": {}, "reason": None, "requested_by": "alice",
        "completed_by": None, "duration_s": None,
        "last_position": 118, "pending": False, "command_status": None,
        "pending_command_ids": []}]})


class JobPage(BaseModel):
    items: list[JobView]
    total: int | None = Field(description="Projected jobs matching (pending ones not counted; "
                              "null while the read models are unavailable).")
    limit: int
    offset: int = Field(description="Rows skipped (the `Link` header has the neighbouring "
                        "pages).")
    skip: int = Field(description="Deprecated: the same as `offset`.")
    read_model_position: int | None
    read_models: ReadModelsState = Field("available", description=READ_MODELS_DESCRIPTION)


class ProductInputView(JobInputView):
    role: str | None = Field(None, description=(
        "How the algorithm used the file for this product: bias, dark, flat or science "
        "(null for products built before roles were recorded)."), examples=["bias"])
    classified_from: str | None = Field(None, description=(
        "What gave the role: the raw data file's file_type, or the FITS header keyword and "
        "its value."), examples=["IMAGETYP 'ZERO'"])


class ProductView(BaseModel):
    id: str
    job_id: str
    kind: str = Field(description="e.g. combined_image, source_catalog")
    name: str
    status: str = Field(description="built, catalogued, published or archived")
    published: bool
    archived: bool
    media_type: str
    size: int
    checksum: ChecksumView
    area: str
    key: str
    uri: str | None
    metrics: dict[str, Any]
    algorithm: str
    algorithm_version: str
    parameters: dict[str, Any]
    software: dict[str, str]
    result_id: str | None
    run_id: str | None
    built_at: datetime | None = None
    catalogued_at: datetime | None = None
    metadata: dict[str, Any] = Field(default_factory=dict, description=(
        "What the catalog jobs recorded on the product (POST /ops/catalog's metadata)."))
    last_position: int | None
    inputs: list[ProductInputView] = Field(default_factory=list)

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "5b1d6c3e-2a0f-5e8b-9c47-1d2e3f405162",
        "job_id": "9d4a3c1e-6b2f-4e8a-9c1d-2f3e4a5b6c7d", "kind": "combined_image",
        "name": "combined_image.fits", "status": "published", "published": True,
        "archived": False, "media_type": "application/fits", "size": 1123200,
        "checksum": {"algorithm": "sha256", "value": "ab" * 32}, "area": "products",
        "key": "9d4a3c1e-6b2f-4e8a-9c1d-2f3e4a5b6c7d/combined_image.fits", "uri": None,
        "metrics": {"noise": 4.1, "background": 102.3, "source_count": 12,
                    "rejected_pixels": 311, "nframes": 3},
        "algorithm": "ccd_stack", "algorithm_version": "1.1.0", "parameters": {},
        "software": {"obsledger": "0.1.0", "numpy": "2.3.5"}, "result_id": None,
        "run_id": None, "last_position": 130, "inputs": []}]})


class ProductPage(BaseModel):
    items: list[ProductView]
    total: int
    limit: int
    offset: int = Field(description="Rows skipped (the `Link` header has the neighbouring "
                        "pages).")
    skip: int = Field(description="Deprecated: the same as `offset`.")
    read_model_position: int


class PlannedProductView(BaseModel):
    kind: str
    name: str
    media_type: str
    description: str


class PlanView(BaseModel):
    algorithm: str
    algorithm_version: str
    parameters: dict[str, Any] = Field(description="The parameters with their defaults.")
    steps: list[str] = Field(description="The ordered steps a process job would run.")
    inputs: list[JobInputView]
    input_count: int
    input_bytes: int
    products: list[PlannedProductView]
    notes: list[str]

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "algorithm": "ccd_stack", "algorithm_version": "1.1.0", "parameters": {"sigma": 3.0},
        "steps": ["classify", "master_bias", "combine", "background", "detect",
                  "write_products"], "inputs": [], "input_count": 3, "input_bytes": 1672320,
        "products": [{"kind": "combined_image", "name": "combined_image.fits",
                      "media_type": "application/fits",
                      "description": "the calibrated, sigma-clipped mean of the science "
                      "frames"}],
        "notes": ["2 science, 1 bias", "no dark frames: not dark-subtracted"]}]})


class AlgorithmView(BaseModel):
    name: str
    version: str
    summary: str
    parameters: dict[str, Any] = Field(description="JSON schema of the parameters.")
    steps: list[str] = Field(default_factory=list)

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "name": "ccd_stack", "version": "1.1.0",
        "summary": "Calibrate CCD frames, sigma-clip combine, detect sources",
        "parameters": {"type": "object", "properties": {"sigma": {"type": "number",
                                                                  "default": 3.0}}},
        "steps": ["classify", "master_bias", "combine", "background", "detect",
                  "write_products"]}]})


class DownloadView(BaseModel):
    url: str = Field(description="A presigned URL to GET the product from the object store.")
    expires_in_s: int
    media_type: str
    size: int
    checksum: ChecksumView

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "url": "https://minio.example.org/obsledger-products/9d4a3c1e-6b2f-4e8a-9c1d-"
               "2f3e4a5b6c7d/combined_image.fits?X-Amz-Signature=…",
        "expires_in_s": 3600, "media_type": "application/fits", "size": 1123200,
        "checksum": {"algorithm": "sha256", "value": "ab" * 32}}]})


class LineageNodeView(BaseModel):
    id: str
    kind: str
    label: str
    attributes: dict[str, Any]


class LineageEdgeView(BaseModel):
    source: str
    target: str
    relation: str
    attributes: dict[str, Any] | None = Field(None, description=(
        "e.g. on `used`: the role the algorithm gave the file (bias, dark, flat, science) and "
        "`classified_from`, what said so (its file_type, or a FITS header keyword and value)."))


class LineageView(BaseModel):
    """``format=json``: root, nodes and edges. ``format=prov-json``: a W3C PROV-JSON document
    instead (``prefix``, ``entity``, ``activity``, ``agent``, ``wasGeneratedBy``, ``used``,
    ``wasDerivedFrom``, … at the top level)."""

    root: str | None = None
    nodes: list[LineageNodeView] | None = None
    edges: list[LineageEdgeView] | None = None

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "root": "product:5b1d6c3e-2a0f-5e8b-9c47-1d2e3f405162",
        "nodes": [{"id": "product:5b1d6c3e-2a0f-5e8b-9c47-1d2e3f405162", "kind": "product",
                   "label": "combined_image.fits", "attributes": {"sha256": "ab" * 32}},
                  {"id": "algorithm:ccd_stack:1.1.0", "kind": "algorithm",
                   "label": "ccd_stack 1.1.0", "attributes": {"version": "1.1.0"}}],
        "edges": [{"source": "job:9d4a3c1e-6b2f-4e8a-9c1d-2f3e4a5b6c7d",
                   "target": "algorithm:ccd_stack:1.1.0", "relation": "wasAssociatedWith"},
                  {"source": "job:9d4a3c1e-6b2f-4e8a-9c1d-2f3e4a5b6c7d",
                   "target": "raw_data_file:1c49d49d-34d9-5c36-be8c-62dcce3da68c",
                   "relation": "used", "attributes": {
                       "role": "bias", "classified_from": "IMAGETYP 'BIAS'"}}]}]})


# -- routes -----------------------------------------------------------------------------------
def ops_router() -> APIRouter:
    r = feature_router()

    counts_route(r, "/ops/jobs/counts", job_counts, window=REQUESTED,
                 name="processing_job_counts", tag=JOBS_TAG,
                 response_model=ProcessingJobCounts, summary="Processing jobs by status and kind")

    @r.get("/ops/algorithms", dependencies=[allow(READERS)], tags=[JOBS_TAG],
           response_model=list[AlgorithmView], responses=ERRORS,
           summary="The registered algorithms: name, version, summary, parameter schema, "
           "steps")
    async def algorithms() -> Any:
        return [describe(a) for a in registered_algorithms()]

    @r.post("/ops/plan", dependencies=[allow(OPERATORS)], tags=[JOBS_TAG],
            response_model=PlanView, responses={**ERRORS, **STORE_ERRORS},
            summary="Plan a process job: ordered steps, inputs with sizes, products — "
            "without running anything",
            description="Give raw data files (`file_ids`), observation results "
            "(`result_ids`, their raw data files) and/or a time window (`start_time`, "
            "`end_time`: the raw data files written in it, at most 1000) and an algorithm "
            "with parameters. Nothing "
            "is recorded. 404: unknown file, result or algorithm; 422: bad parameters (the "
            "algorithm's schema, `GET /ops/algorithms`) or inputs it cannot use.")
    async def plan_job(request: Request, body: PlanRequest) -> Any:
        return await run_in_threadpool(plan, ledger_of(request), body)

    command_route(r, "POST", "/ops/ingest", ProcessingCommand.PROCESSING_JOB_REQUEST,
                  IngestRequest, name="ingest", tag=JOBS_TAG, roles=OPERATORS,
                  prepare=ingest_job, responses=STORE_ERRORS,
                  summary="Validate raw FITS inputs (a job): checksums, FITS structure, header "
                  "facts recorded on each raw data file",
                  description="A worker opens each file with astropy, verifies DATASUM/CHECKSUM "
                  "and the recorded checksum, and records TELESCOP, INSTRUME, DATE-OBS, "
                  "EXPTIME, OBJECT, shape and BUNIT (`RawDataFile.Ingested`, and in the job's "
                  "outputs). A file that fails fails the job with the reason.")
    command_route(r, "POST", "/ops/process", ProcessingCommand.PROCESSING_JOB_REQUEST,
                  ProcessRequest, name="process", tag=JOBS_TAG, roles=OPERATORS,
                  prepare=process_job, responses=STORE_ERRORS,
                  summary="Build data products with an algorithm (a job a worker runs)",
                  description="Checked like `POST /ops/plan`, then journaled; a worker claims "
                  "the job, runs the algorithm and uploads the products. With `catalog` the "
                  "products are catalogued (`publish`, `archive`) as soon as they are built.")
    command_route(r, "POST", "/ops/catalog", ProcessingCommand.PROCESSING_JOB_REQUEST,
                  CatalogRequest, name="catalog", tag=JOBS_TAG, roles=OPERATORS,
                  prepare=catalog_job,
                  summary="Register built products in the catalog (a job): publish and/or "
                  "archive",
                  description="A worker checks each product's object (size and sha256) and "
                  "catalogues it; the products then list in `GET /products`.")

    @list_route(r, "/ops/jobs", JobPage, tag=JOBS_TAG,
                summary="Processing jobs, newest first (smart query: requested ones not yet "
                "projected lead the first page)")
    async def jobs(request: Request, response: Response,
                   page: Annotated[PageRequest, Depends(paging_with_skip)],
                   status: Annotated[JOB_STATUSES | None, Query()] = None,
                   kind: Annotated[JOB_KINDS | None, Query()] = None,
                   min_position: MinPosition = None) -> Any:
        listed = ledger_of(request).processing.list_jobs
        return await read_page(request, response, page, min_position,
                               lambda limit, offset: listed(status, kind, limit, offset))

    row_route(r, "/ops/jobs/{id}", lambda lg: lg.processing.job, "processing job",
              name="job", tag=JOBS_TAG, response_model=JobView,
              summary="One job: steps, progress, timings, lease, outputs, errors (smart query)")

    command_route(r, "DELETE", "/ops/jobs/{id}", ProcessingCommand.PROCESSING_JOB_CANCEL,
                  None, name="cancel", tag=JOBS_TAG, roles=OPERATORS,
                  cancel=lambda reason: CancelJobRequest(reason=reason),
                  summary="Cancel a job (cooperative: between steps or chunks)",
                  description="A requested job is cancelled at once; a running one when its "
                  "worker next looks. Outputs of a cancelled job are never catalogued. 409 for "
                  "a job that already ended.")

    # -- products --------------------------------------------------------------------------
    @list_route(r, "/products", ProductPage, tag=PRODUCTS_TAG, responses=PRODUCT_LIST_RESPONSES,
                summary="Catalogued data products, newest first",
                description="Without `status`: catalogued, published and archived products; "
                "`status=built` lists those not catalogued yet.")
    async def products(request: Request, response: Response,
                       page: Annotated[PageRequest, Depends(paging_with_skip)],
                       status: Annotated[PRODUCT_STATUSES | None, Query()] = None,
                       kind: Annotated[str | None, Query(max_length=50)] = None,
                       job_id: UUID | None = None, result_id: UUID | None = None,
                       min_position: MinPosition = None) -> Any:
        listed = ledger_of(request).processing.list_products
        return await read_page(request, response, page, min_position, lambda limit, offset: listed(
            status=status, kind=kind, job_id=as_str(job_id), result_id=as_str(result_id),
            catalogued_only=True, limit=limit, offset=offset))

    counts_route(r, "/products/counts", product_counts, window=BUILT, name="product_counts",
                 tag=PRODUCTS_TAG, response_model=DataProductCounts,
                 summary="Data products by status and kind")

    row_route(r, "/products/{id}", lambda lg: lg.processing.product, "data product",
              name="product", tag=PRODUCTS_TAG, response_model=ProductView, responses=ERRORS,
              summary="One data product: type, size, checksum, metrics, status, inputs")

    @r.get("/products/{id}/download", dependencies=[allow(READERS)], tags=[PRODUCTS_TAG],
           response_model=DownloadView,
           responses={**ERRORS, **STORE_ERRORS, 200: {
               "description": "S3: a presigned URL (JSON). Local store: the file itself.",
               "content": {"application/octet-stream": {}, "application/fits": {},
                           "text/x-ecsv": {}}}},
           summary="Download a product: a presigned URL (S3), or the file streamed (local "
           "object store)")
    async def download(request: Request, id: IdPath) -> Any:
        found = await run_in_threadpool(product_download, ledger_of(request), id)
        if found.chunks is None:
            return found.presigned()
        row = found.product
        return StreamingResponse(found.chunks, media_type=row["media_type"], headers={
            "Content-Disposition": content_disposition(row["name"]),
            "Content-Length": str(row["size"]), "X-Checksum-SHA256": row["checksum"]["value"]})

    @r.get("/products/{id}/lineage", dependencies=[allow(READERS)], tags=[PRODUCTS_TAG],
           response_model=LineageView, responses=ERRORS,
           summary="A product's lineage: run, job, algorithm and version, parameters, "
           "software versions, input raw data files with checksums, executed obs units",
           description="`format=json` (default): `{root, nodes, edges}`; `format=prov-json`: "
           "the same graph as a W3C PROV-JSON document (see docs/PROCESSING.md).")
    async def lineage(request: Request, id: IdPath,
                      format: Annotated[Literal["json", "prov-json"], Query()] = "json",
                      ) -> Any:
        document = await run_in_threadpool(lineage_document, ledger_of(request).processing,
                                           id, format)
        if format == "prov-json":  # as it is: not the json format's model
            return Response(orjson.dumps(document), media_type="application/json")
        return document

    return r

