"""HTTP for the MAST archive: searches (not commands: they never touch the event store) and
download jobs (critical commands, journaled like the core's, and smart queries).
Included by ``api.app.create_app``."""

from __future__ import annotations

import posixpath
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from api.accounts import allow
from api.app import (
    COMMAND_RESPONSES,
    ERRORS,
    CommandAccepted,
    Ctx,
    IdPath,
    MinPosition,
    _caught_up,
    _ledger,
    _not_found,
    _submit,
)
from api.errors import ApiError, ErrorResponse
from api.runtime import Ledger
from commands.download_automation import job_dir
from commands.downloads import (
    DEFAULT_CHUNK_SIZE,
    DownloadFileSpec,
    ProductFilters,
    RequestDownload,
    StartDownloadRequest,
)
from commands.models import CommandModel
from domain.accounts import CRITICAL_WRITERS, OPERATORS, READERS
from infra.mast_archive import (
    ArchiveError,
    MastArchive,
    download_url,
    parse_coordinates,
    table_rows,
)

SEARCH_TAG = "MAST search"
DOWNLOAD_TAG = "MAST downloads"
SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorResponse, "description": "Unknown target (the resolver knows no "
          "such name)"},
    422: {"model": ErrorResponse, "description": "Bad coordinates, radius or filters; or "
          "MAST refused the query"},
    503: {"model": ErrorResponse, "description": "MAST unreachable or failing"},
}


# -- search models ---------------------------------------------------------------------------
class SearchFilters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    collection: list[Annotated[str, Field(max_length=50)]] | None = Field(
        None, max_length=20, examples=[["HST"]], description="obs_collection")
    instrument: list[Annotated[str, Field(max_length=80)]] | None = Field(
        None, max_length=20, examples=[["WFPC2/WFC"]], description="instrument_name")
    calib_level: list[Annotated[int, Field(ge=0, le=4)]] | None = Field(None, max_length=5)
    dataproduct_type: list[Annotated[str, Field(max_length=30)]] | None = Field(
        None, max_length=10, examples=[["image"]])
    product_type: list[Annotated[str, Field(max_length=50)]] | None = Field(
        None, max_length=20, examples=[["SCIENCE"]],
        description="Products only: productType (with include_products).")
    product_subgroup: list[Annotated[str, Field(max_length=50)]] | None = Field(
        None, max_length=50, description="Products only: productSubGroupDescription.")
    extension: list[Annotated[str, Field(max_length=20)]] | None = Field(
        None, max_length=20, description="Products only: file extensions, e.g. fits.")


class _Search(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    filters: SearchFilters = Field(default_factory=SearchFilters)
    include_products: bool = Field(False, description="Also list each observation's products.")
    limit: int = Field(100, ge=1, le=5000, description="At most this many observations.")


Radius = Annotated[float, Field(0.2, gt=0, le=10, description="Cone radius in degrees.")]


class TargetSearch(_Search):
    target: Annotated[str, Field(min_length=1, max_length=200, examples=["M101"])]
    radius_deg: Radius = 0.2

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"target": "M101", "radius_deg": 0.1, "filters": {"collection": ["HST"]},
         "include_products": True}]})


class CoordinateSearch(_Search):
    ra: float | Annotated[str, Field(max_length=40)] = Field(
        description="Degrees, or sexagesimal hours: 05:35:17.3 / 5h35m17.3s",
        examples=[83.822, "05:35:17.3"])
    dec: float | Annotated[str, Field(max_length=40)] = Field(
        description="Degrees, or sexagesimal degrees: -05:23:28", examples=[-5.391, "-05:23:28"])
    radius_deg: Radius = 0.2

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"ra": "05:35:17.3", "dec": "-05:23:28", "radius_deg": 0.05},
        {"ra": 23.118, "dec": 60.642, "filters": {"calib_level": [3]}}]})


class ObservationSearch(_Search):
    obs_id: Annotated[str, Field(min_length=1, max_length=255, examples=["U9O40504M"])]

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"obs_id": "U9O40504M", "include_products": True}]})


class ProgramSearch(_Search):
    proposal_id: Annotated[str, Field(min_length=1, max_length=50, pattern=r"^[\w.-]+$",
                                      examples=["5371"])]

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"proposal_id": "5371", "filters": {"collection": ["HST"]}}]})


class MastProduct(BaseModel):
    data_uri: str | None
    filename: str | None
    size: int | None
    obs_id: str | None
    obsid: str | None
    product_type: str | None
    product_subgroup: str | None = None
    description: str | None = None
    collection: str | None = None


class SearchResult(BaseModel):
    count: int = Field(description="Observations MAST returned (before the limit).")
    observations: list[dict[str, Any]] = Field(description="CAOM observation rows, as MAST "
                                               "names the fields (obsid, obs_id, target_name…)")
    products: dict[str, list[MastProduct]] | None = Field(
        None, description="obsid → its products (with include_products); the product rows "
        "can be sent as they are to POST /mast/download/start.")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "count": 1, "observations": [{"obsid": 2003738726, "obs_id": "U9O40504M",
                                      "obs_collection": "HST", "target_name": "NGC4395"}],
        "products": {"2003738726": [{
            "data_uri": "mast:HST/product/u9o40504m_c3m.fits", "filename": "u9o40504m_c3m.fits",
            "size": 207360, "obs_id": "U9O40504M", "obsid": "2003738726",
            "product_type": "AUXILIARY", "product_subgroup": "C3M"}]}}]})


class DownloadFileView(BaseModel):
    id: UUID
    index: int
    filename: str
    url: str
    data_uri: str | None
    obs_id: str | None
    obsid: str | None
    product_type: str | None
    instrument: str | None
    status: str
    size: int | None
    bytes_done: int
    percent: float | None
    bytes_per_s: float | None = Field(description="At the last checkpoint.")
    eta_s: float | None
    etag: str | None
    last_modified: str | None
    sha256: str | None
    fits: dict[str, Any] | None
    restarts: int
    started_at: Any = None
    checkpoint_at: Any = None
    completed_at: Any = None


class DownloadJobView(BaseModel):
    id: UUID
    status: str = Field(description="requested, running, paused, failed, completed, cancelled")
    destination: str
    mode: str
    chunk_size: int
    register_files: bool
    file_count: int
    files_completed: int
    bytes_total: int | None
    bytes_done: int
    percent: float | None
    bytes_per_s: float | None = Field(description="Sum of the downloading files' speeds.")
    eta_s: float | None
    reason: str | None
    partials_purged: bool
    requested_at: Any = None
    finished_at: Any = None
    updated_at: Any = None
    last_position: int | None
    pending: bool
    command_status: str | None
    pending_command_ids: list[str]
    files: list[DownloadFileView]

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "0b7f8a52-1c1e-4a53-8f0e-2f8e0d7c9a11", "status": "running",
        "destination": "hst/u9o40504m", "mode": "chunked", "chunk_size": DEFAULT_CHUNK_SIZE,
        "register_files": True, "file_count": 1, "files_completed": 0,
        "bytes_total": 207360, "bytes_done": 104857, "percent": 50.57,
        "bytes_per_s": 2097152.0, "eta_s": 0.05, "reason": None, "partials_purged": False,
        "last_position": 42, "pending": False, "command_status": None,
        "pending_command_ids": [], "files": []}]})


class DownloadJobPage(BaseModel):
    items: list[DownloadJobView]
    total: int = Field(description="Projected jobs matching (pending ones not counted).")
    limit: int
    offset: int
    read_model_position: int


class _NoBody(CommandModel):
    pass


class _CancelBody(CommandModel):
    reason: str | None = None


# -- helpers ---------------------------------------------------------------------------------
def archive(ledger: Ledger) -> MastArchive:
    s = ledger.settings
    return MastArchive(s.mast_base_url, s.mast_timeout_s)


def _archive_error(e: ArchiveError) -> ApiError:
    detail = {404: "Unknown target", 422: "Validation failed"}.get(e.status, "MAST unavailable")
    return ApiError(e.status, detail, [{"field": e.field or "mast", "message": e.message}])


def product_view(row: dict[str, Any]) -> dict[str, Any]:
    uri = row.get("dataURI")
    return {"data_uri": uri, "filename": row.get("productFilename") or (
                posixpath.basename(uri) if uri else None),
            "size": row.get("size"), "obs_id": row.get("obs_id"),
            "obsid": None if row.get("obsID") is None else str(row["obsID"]),
            "product_type": row.get("productType"),
            "product_subgroup": row.get("productSubGroupDescription"),
            "description": row.get("description"), "collection": row.get("obs_collection")}


def _product_filters(f: SearchFilters | ProductFilters) -> dict[str, Any]:
    return {"product_type": f.product_type, "product_subgroup": f.product_subgroup,
            "calib_level": f.calib_level, "extension": f.extension}


def _search_answer(ledger: Ledger, table: Any, body: _Search) -> dict[str, Any]:
    rows = table_rows(table, body.limit)
    answer: dict[str, Any] = {"count": len(table), "observations": rows, "products": None}
    if body.include_products:
        obsids = [str(r["obsid"]) for r in rows if r.get("obsid") is not None]
        products: dict[str, list[dict[str, Any]]] = {o: [] for o in obsids}
        if obsids:
            table = archive(ledger).products(obsids, _product_filters(body.filters))
            for row in table_rows(table):
                view = product_view(row)
                products.setdefault(view["obsid"] or "", []).append(view)
        answer["products"] = products
    return answer


async def _search(request: Request, body: _Search, run: Any) -> Any:
    ledger = _ledger(request)
    try:
        return await run_in_threadpool(lambda: _search_answer(ledger, run(archive(ledger)), body))
    except ArchiveError as e:
        raise _archive_error(e) from None


def _filters(body: _Search) -> dict[str, Any]:
    f = body.filters
    return {"collection": f.collection, "instrument": f.instrument,
            "calib_level": f.calib_level, "dataproduct_type": f.dataproduct_type}


def _resolve_files(ledger: Ledger, body: StartDownloadRequest) -> list[DownloadFileSpec]:
    """The files of a download request: its products, or the products of its obs_id."""
    base = ledger.settings.mast_base_url
    if body.products is not None:
        products = [p.model_dump() for p in body.products]
    else:
        mast = archive(ledger)
        table = mast.by_criteria("observation search", "obs_id", obs_id=body.obs_id)
        obsids = [str(r["obsid"]) for r in table_rows(table) if r.get("obsid") is not None]
        if not obsids:
            raise ArchiveError(404, f"MAST has no observation {body.obs_id}", "obs_id")
        products = [product_view(r) for r in table_rows(
            mast.products(obsids, _product_filters(body.filters)))]
        products = [p for p in products if p["data_uri"]][:body.filters.max_files]
        if not products:
            raise ArchiveError(404, f"no product of {body.obs_id} matches the filters",
                               "filters")
    files = []
    seen: set[str] = set()
    for i, p in enumerate(products):
        name = p.get("filename") or posixpath.basename(p["data_uri"])
        if name in seen:
            continue
        seen.add(name)
        try:
            files.append(DownloadFileSpec(
                url=download_url(base, p["data_uri"]), filename=name, data_uri=p["data_uri"],
                obs_id=p.get("obs_id"), obsid=p.get("obsid"),
                product_type=p.get("product_type"), instrument=p.get("instrument"),
                size=p.get("size")))
        except ValueError as e:
            raise ArchiveError(422, f"product {i} ({name}): {e}", f"products.{i}") from e
    return files


async def _start(request: Request, body: StartDownloadRequest, ctx: Any,
                 mode: Literal["stream", "chunked"]) -> Response:
    ledger = _ledger(request)
    try:
        job_dir(ledger.settings, body.destination)
    except ValueError as e:
        raise ApiError(422, "Validation failed", [{"field": "destination",
                                                    "message": str(e)}]) from None
    try:
        files = await run_in_threadpool(_resolve_files, ledger, body)
    except ArchiveError as e:
        raise _archive_error(e) from None
    command = RequestDownload.model_construct(
        id=body.id, files=files, destination=body.destination, mode=mode,
        chunk_size=body.chunk_size or ledger.settings.download_chunk_bytes,
        register_files=body.register_files)
    return await _submit(ledger, ctx, "download_job.request", command)


# -- routes ----------------------------------------------------------------------------------
def mast_router() -> APIRouter:
    r = APIRouter()

    @r.post("/mast/search/target", dependencies=[allow(READERS)],
            tags=[SEARCH_TAG], response_model=SearchResult,
            responses={**ERRORS, **SEARCH_ERRORS},
            summary="Observations around a named target (resolved by MAST)",
            description="astroquery's `Observations.query_object` (or `query_criteria` with "
            "filters). An unknown name answers 404, MAST unreachable 503.")
    async def by_target(request: Request, body: TargetSearch) -> Any:
        return await _search(request, body, lambda a: a.by_target(
            body.target, body.radius_deg, _filters(body)))

    @r.post("/mast/search/coordinates", dependencies=[allow(READERS)],
            tags=[SEARCH_TAG], response_model=SearchResult,
            responses={**ERRORS, **SEARCH_ERRORS},
            summary="Observations in a cone around RA/Dec (degrees or sexagesimal)",
            description="RA in degrees or hours (`05:35:17.3`), Dec in degrees; bad or out of "
            "range coordinates answer 422 naming the field.")
    async def by_coordinates(request: Request, body: CoordinateSearch) -> Any:
        try:
            coordinates = parse_coordinates(body.ra, body.dec)
        except ArchiveError as e:
            raise _archive_error(e) from None
        return await _search(request, body, lambda a: a.by_coordinates(
            coordinates, body.radius_deg, _filters(body)))

    @r.post("/mast/search/observation", dependencies=[allow(READERS)],
            tags=[SEARCH_TAG], response_model=SearchResult,
            responses={**ERRORS, **SEARCH_ERRORS}, summary="One observation by its obs_id",
            description="`Observations.query_criteria(obs_id=…)` plus the filters.")
    async def by_observation(request: Request, body: ObservationSearch) -> Any:
        return await _search(request, body, lambda a: a.by_criteria(
            "observation search", "obs_id", obs_id=body.obs_id,
            **_mast_criteria(body)))

    @r.post("/mast/search/program", dependencies=[allow(READERS)],
            tags=[SEARCH_TAG], response_model=SearchResult,
            responses={**ERRORS, **SEARCH_ERRORS},
            summary="Observations of a proposal / program id",
            description="`Observations.query_criteria(proposal_id=…)` plus the filters.")
    async def by_program(request: Request, body: ProgramSearch) -> Any:
        return await _search(request, body, lambda a: a.by_criteria(
            "program search", "proposal_id", proposal_id=body.proposal_id,
            **_mast_criteria(body)))

    start_description = (
        "Give `products` (rows of a search's product lists) or an `obs_id` with `filters`; "
        "the files land in `destination` below OBSLEDGER_DOWNLOAD_ROOT (paths that leave it "
        "answer 422). The job is event-sourced: the downloader records each file's start, "
        "checkpoints and completion; after a crash it resumes from the last checkpoint. "
        "Completed FITS files are verified with astropy and registered as raw data files.")

    @r.post("/mast/download/start", dependencies=[allow(CRITICAL_WRITERS)],
            tags=[DOWNLOAD_TAG], status_code=202,
            response_model=CommandAccepted,
            responses={**COMMAND_RESPONSES, **SEARCH_ERRORS},
            summary="Start a download job: each file in one streamed request (critical)",
            description=start_description + " A broken stream resumes with a Range request.")
    async def start(request: Request, body: StartDownloadRequest, ctx: Ctx) -> Response:
        return await _start(request, body, ctx, "stream")

    @r.post("/mast/download/start-chunked", dependencies=[allow(CRITICAL_WRITERS)],
            tags=[DOWNLOAD_TAG], status_code=202,
            response_model=CommandAccepted,
            responses={**COMMAND_RESPONSES, **SEARCH_ERRORS},
            summary="Start a download job in Range chunks (5 MB default) with progress",
            description=start_description + " Each request asks for `chunk_size` bytes.")
    async def start_chunked(request: Request, body: StartDownloadRequest,
                            ctx: Ctx) -> Response:
        return await _start(request, body, ctx, "chunked")

    @r.get("/mast/download/progress/{job_id}", dependencies=[allow(READERS)],
           tags=[DOWNLOAD_TAG],
           response_model=DownloadJobView, responses=ERRORS,
           summary="A job's progress: per file and total bytes, speed (B/s) and ETA",
           description="Smart query: commands not yet in the read model show as "
           "`pending: true`. Bytes are those of the last checkpoint.")
    async def progress(request: Request, job_id: IdPath,
                       min_position: MinPosition = None) -> Any:
        await _caught_up(request, min_position)
        row = await run_in_threadpool(_ledger(request).downloads.job, str(job_id))
        if row is None:
            raise _not_found("download job", job_id)
        return row

    @r.post("/mast/download/pause/{job_id}", dependencies=[allow(OPERATORS)],
            tags=[DOWNLOAD_TAG], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Pause a job (its partial files and checkpoints stay)")
    async def pause(request: Request, job_id: IdPath, ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "download_job.pause", _NoBody(),
                             {"id": job_id})

    @r.post("/mast/download/resume/{job_id}", dependencies=[allow(OPERATORS)],
            tags=[DOWNLOAD_TAG], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Resume a paused or failed job from its last checkpoints")
    async def resume(request: Request, job_id: IdPath, ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "download_job.resume", _NoBody(),
                             {"id": job_id})

    @r.get("/mast/download/resumable", dependencies=[allow(READERS)],
           tags=[DOWNLOAD_TAG], response_model=DownloadJobPage,
           responses=ERRORS, summary="Jobs that can be resumed (paused or failed)")
    async def resumable(request: Request,
                        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> Any:
        pos, total, items = await run_in_threadpool(
            _ledger(request).downloads.list_jobs, ("paused", "failed"), limit, offset)
        return {"items": items, "total": total, "limit": limit, "offset": offset,
                "read_model_position": pos}

    @r.get("/mast/download/jobs", dependencies=[allow(READERS)],
           tags=[DOWNLOAD_TAG], response_model=DownloadJobPage,
           responses=ERRORS, summary="Download jobs, newest first (smart query)")
    async def jobs(request: Request,
                   status: Annotated[Literal["requested", "running", "paused", "failed",
                                             "completed", "cancelled"] | None, Query()] = None,
                   limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                   offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0) -> Any:
        pos, total, items = await run_in_threadpool(
            _ledger(request).downloads.list_jobs, (status,) if status else None, limit,
            offset)
        return {"items": items, "total": total, "limit": limit, "offset": offset,
                "read_model_position": pos}

    @r.delete("/mast/download/{job_id}", dependencies=[allow(OPERATORS)],
              tags=[DOWNLOAD_TAG], status_code=202,
              response_model=CommandAccepted, responses=COMMAND_RESPONSES,
              summary="Cancel a job; its partial files are removed after the retention")
    async def cancel(request: Request, job_id: IdPath, ctx: Ctx,
                     reason: Annotated[str | None, Query(
                         max_length=2000, pattern=r"^[^\x00]*$")] = None) -> Response:
        body = _CancelBody(reason=reason) if reason else _NoBody()
        return await _submit(_ledger(request), ctx, "download_job.cancel", body,
                             {"id": job_id})

    return r


def _mast_criteria(body: _Search) -> dict[str, Any]:
    return {k: v for k, v in {
        "obs_collection": body.filters.collection, "instrument_name": body.filters.instrument,
        "calib_level": body.filters.calib_level,
        "dataproduct_type": body.filters.dataproduct_type}.items() if v is not None}
