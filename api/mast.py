"""HTTP for the MAST archive: searches (not commands: they never touch the event store) and
download jobs (critical commands, journaled like the core's, and smart queries).
Included by ``api.app.create_app``."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StrictFloat,
    StrictStr,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema
from starlette.concurrency import run_in_threadpool

from api.accounts import allow
from api.deps import (
    ERRORS,
    QUERY_RESPONSES,
    REQUESTED,
    IdPath,
    MinPosition,
    Paging,
    cancel_body,
    command_route,
    counts_route,
    feature_router,
    ledger_of,
    list_route,
    read_page,
    smart_row,
)
from api.errors import ApiError, error_doc
from bootstrap.ledger import Ledger
from commands.downloads import (
    DEFAULT_CHUNK_SIZE,
    DownloadCommand,
    RequestDownload,
    StartDownloadRequest,
)
from commands.models import document_storable
from domain.accounts import OPERATORS, READERS
from infra.mast_archive import MastArchive, parse_coordinates
from queries.counts import download_counts
from queries.downloads import with_live
from queries.mast_search import (
    download_job,
    observation_criteria,
    observation_filters,
    search,
)
from queries.models import READ_MODELS_DESCRIPTION, ReadModelsState, SizedStatusCounts
from workers.download_automation import job_dir

SEARCH_TAG = "MAST search"
DOWNLOAD_TAG = "MAST downloads"
SEARCH_ERRORS: dict[int | str, dict[str, Any]] = {
    404: error_doc("Unknown target (MAST's name lookup knows no such name)"),
    422: error_doc("Bad coordinates, radius or filters; or MAST refused the query"),
    503: error_doc("MAST unreachable or failing; or a store of the ledger does not answer "
                   "(then with Retry-After)", retry_after=True),
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

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        document_storable(handler.resolve_ref_schema(schema), command=False)  # not blank
        return schema

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


# Coordinates as text: decimal degrees, or sexagesimal (RA in hours, Dec in degrees), within
# range; the forms documented and no others (astropy parses every one of them).
_RA_DEGREES = (r"\+?(?:(?:[0-9]|[1-9][0-9]|[12][0-9][0-9]|3[0-5][0-9])(?:\.[0-9]{0,12})?"
               r"|\.[0-9]{1,12})")
_RA_HOURS = (r"(?:[01]?[0-9]|2[0-3])(?::[0-5]?[0-9]:[0-5]?[0-9](?:\.[0-9]{0,9})?"
             r"|h ?[0-5]?[0-9] ?m ?[0-5]?[0-9](?:\.[0-9]{0,9})? ?s)")
_DEC_DEGREES = r"[+-]?(?:[0-8]?[0-9](?:\.[0-9]{0,12})?|\.[0-9]{1,12}|90(?:\.0{0,12})?)"
_DEC_DMS = (r"[+-]?(?:[0-8]?[0-9](?::[0-5]?[0-9]:[0-5]?[0-9](?:\.[0-9]{0,9})?"
            r"|d ?[0-5]?[0-9] ?m ?[0-5]?[0-9](?:\.[0-9]{0,9})? ?s)"
            r"|90(?::0?0:0?0(?:\.0{0,9})?|d ?0?0 ?m ?0?0(?:\.0{0,9})? ?s))")
RA_TEXT = rf"^\s*(?:{_RA_DEGREES}|{_RA_HOURS})\s*$"
DEC_TEXT = rf"^\s*(?:{_DEC_DEGREES}|{_DEC_DMS})\s*$"


def _angle_check(pattern: str, low: float, high: float, high_included: bool) -> Any:
    def check(value: float | str) -> float | str:
        if isinstance(value, str):
            if len(value) > 40 or not re.match(pattern, value):
                raise ValueError("not an angle in a documented form (see the description)")
        elif not (low <= value <= high if high_included else low <= value < high):
            raise ValueError(f"must be in [{low}, {high}{']' if high_included else ')'}")
        return value
    return check


#: A coordinate: a number in range, or text of one of the documented forms.
RightAscension = Annotated[StrictFloat | StrictStr, AfterValidator(
    _angle_check(RA_TEXT, 0, 360, False)), WithJsonSchema({"anyOf": [
        {"type": "number", "minimum": 0, "exclusiveMaximum": 360},
        {"type": "string", "maxLength": 40, "pattern": RA_TEXT}]})]
Declination = Annotated[StrictFloat | StrictStr, AfterValidator(
    _angle_check(DEC_TEXT, -90, 90, True)), WithJsonSchema({"anyOf": [
        {"type": "number", "minimum": -90, "maximum": 90},
        {"type": "string", "maxLength": 40, "pattern": DEC_TEXT}]})]


class CoordinateSearch(_Search):
    ra: RightAscension = Field(
        description="Degrees in [0, 360) (a number or its text), or sexagesimal hours: "
        "05:35:17.3 / 5h35m17.3s", examples=[83.822, "05:35:17.3"])
    dec: Declination = Field(
        description="Degrees in [-90, 90] (a number or its text), or sexagesimal degrees: "
        "-05:23:28 / -05d23m28s", examples=[-5.391, "-05:23:28"])
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
    status: str = Field(description="pending, downloading, complete, failed; a file in "
                        "progress of a job that is not running: paused, stopped (the job "
                        "failed: resumable from its checkpoint) or cancelled.")
    size: int | None
    bytes_done: int
    percent: float | None
    bytes_per_s: float | None = Field(description="At the last checkpoint, or live.")
    eta_s: float | None
    live: bool = Field(False, description="bytes_done, speed and ETA are the downloader's "
                       "in-memory figures, ahead of the last checkpoint.")
    etag: str | None
    last_modified: str | None
    sha256: str | None
    fits: dict[str, Any] | None
    restarts: int
    started_at: datetime | None = None
    checkpoint_at: datetime | None = None
    completed_at: datetime | None = None


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
    live: bool = Field(False, description="bytes_done, speed and ETA are the downloader's "
                       "in-memory figures (this server runs the job), ahead of the last "
                       "checkpoint.")
    reason: str | None
    partials_purged: bool
    requested_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    last_position: int | None
    pending: bool
    command_status: str | None
    pending_command_ids: list[str]
    files: list[DownloadFileView]
    read_model_position: int | None = None
    read_models: ReadModelsState = Field("available", description=READ_MODELS_DESCRIPTION)

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
    total: int | None = Field(description="Projected jobs matching (pending ones not counted; "
                              "null while the read models are unavailable).")
    limit: int
    offset: int = Field(description="Rows skipped (the `Link` header has the neighbouring "
                        "pages).")
    read_model_position: int | None
    read_models: ReadModelsState = Field("available", description=READ_MODELS_DESCRIPTION)


# -- helpers ---------------------------------------------------------------------------------
async def _search(request: Request, body: _Search, query: Callable[[MastArchive], Any]) -> Any:
    return await run_in_threadpool(search, ledger_of(request), body, query)


def _download_job(mode: Literal["stream", "chunked"],
                  ) -> Callable[[Ledger, StartDownloadRequest], RequestDownload]:
    """The download job of a request, in ``mode``: 422 for a destination outside the
    download root, then its files resolved (``queries.mast_search.download_job``)."""
    def prepare(ledger: Ledger, body: StartDownloadRequest) -> RequestDownload:
        try:
            job_dir(ledger.settings, body.destination)
        except ValueError as e:
            raise ApiError(422, "Validation failed", [{"field": "destination",
                                                        "message": str(e)}]) from None
        return download_job(ledger, body, mode)
    return prepare


# -- routes ----------------------------------------------------------------------------------
def mast_router() -> APIRouter:
    r = feature_router()

    counts_route(r, "/mast/download/counts", download_counts, window=REQUESTED,
                 name="download_job_counts", tag=DOWNLOAD_TAG,
                 response_model=SizedStatusCounts,
                 summary="MAST download jobs by status, with their bytes")

    @r.post("/mast/search/target", dependencies=[allow(READERS)],
            tags=[SEARCH_TAG], response_model=SearchResult,
            responses={**ERRORS, **SEARCH_ERRORS},
            summary="Observations around a named target (resolved by MAST)",
            description="The name is resolved by the configured MAST server's name-lookup "
            "service (`Mast.Name.Lookup`, the first resolver that knows it), then the "
            "observations in a cone around that position are astroquery's "
            "`Observations.query_region` (or `query_criteria` with filters), from the same "
            "server. An unknown name answers 404, MAST unreachable 503.")
    async def by_target(request: Request, body: TargetSearch) -> Any:
        return await _search(request, body, lambda a: a.by_target(
            body.target, body.radius_deg, observation_filters(body.filters)))

    @r.post("/mast/search/coordinates", dependencies=[allow(READERS)],
            tags=[SEARCH_TAG], response_model=SearchResult,
            responses={**ERRORS, **SEARCH_ERRORS},
            summary="Observations in a cone around RA/Dec (degrees or sexagesimal)",
            description="RA in degrees or hours (`05:35:17.3`), Dec in degrees; bad or out of "
            "range coordinates answer 422 naming the field.")
    async def by_coordinates(request: Request, body: CoordinateSearch) -> Any:
        coordinates = parse_coordinates(body.ra, body.dec)
        return await _search(request, body, lambda a: a.by_coordinates(
            coordinates, body.radius_deg, observation_filters(body.filters)))

    @r.post("/mast/search/observation", dependencies=[allow(READERS)],
            tags=[SEARCH_TAG], response_model=SearchResult,
            responses={**ERRORS, **SEARCH_ERRORS}, summary="One observation by its obs_id",
            description="`Observations.query_criteria(obs_id=…)` plus the filters.")
    async def by_observation(request: Request, body: ObservationSearch) -> Any:
        return await _search(request, body, lambda a: a.by_criteria(
            "observation search", "obs_id", obs_id=body.obs_id,
            **observation_criteria(body.filters)))

    @r.post("/mast/search/program", dependencies=[allow(READERS)],
            tags=[SEARCH_TAG], response_model=SearchResult,
            responses={**ERRORS, **SEARCH_ERRORS},
            summary="Observations of a proposal / program id",
            description="`Observations.query_criteria(proposal_id=…)` plus the filters.")
    async def by_program(request: Request, body: ProgramSearch) -> Any:
        return await _search(request, body, lambda a: a.by_criteria(
            "program search", "proposal_id", proposal_id=body.proposal_id,
            **observation_criteria(body.filters)))

    start_description = (
        "Give `products` (rows of a search's product lists) or an `obs_id` with `filters`; "
        "the files land in `destination` below OBSLEDGER_DOWNLOAD_ROOT (paths that leave it "
        "answer 422). The job is event-sourced: the downloader records each file's start, "
        "checkpoints and completion; after a crash it resumes from the last checkpoint. "
        "Completed FITS files are verified with astropy and registered as raw data files.")

    command_route(r, "POST", "/mast/download/start", DownloadCommand.DOWNLOAD_JOB_REQUEST,
                  StartDownloadRequest, name="start", tag=DOWNLOAD_TAG,
                  prepare=_download_job("stream"), responses=SEARCH_ERRORS,
                  summary="Start a download job: each file in one streamed request (critical)",
                  description=start_description + " A broken stream resumes with a Range "
                  "request.")
    command_route(r, "POST", "/mast/download/start-chunked",
                  DownloadCommand.DOWNLOAD_JOB_REQUEST, StartDownloadRequest,
                  name="start_chunked", tag=DOWNLOAD_TAG, prepare=_download_job("chunked"),
                  responses=SEARCH_ERRORS,
                  summary="Start a download job in Range chunks (5 MB default) with progress",
                  description=start_description + " Each request asks for `chunk_size` bytes.")

    @r.get("/mast/download/progress/{job_id}", dependencies=[allow(READERS)],
           tags=[DOWNLOAD_TAG],
           response_model=DownloadJobView, responses=QUERY_RESPONSES,
           summary="A job's progress: per file and total bytes, speed (B/s) and ETA",
           description="Smart query: commands not yet in the read model show as "
           "`pending: true`. While this server's downloader runs the job, bytes, speed and "
           "ETA are its live figures (`live: true`, refreshed as data arrives; also pushed "
           "every second on `GET /stream` as `download_progress`); otherwise those of the "
           "last checkpoint, the durable record.")
    async def progress(request: Request, job_id: IdPath,
                       min_position: MinPosition = None) -> Any:
        ledger = ledger_of(request)
        row = await smart_row(request, min_position, ledger.downloads.job, "download job",
                              job_id)
        return with_live(row, ledger.downloader.progress.job(str(job_id))
                         if ledger.downloader is not None else None)

    command_route(r, "POST", "/mast/download/pause/{job_id}", DownloadCommand.DOWNLOAD_JOB_PAUSE,
                  None, name="pause", tag=DOWNLOAD_TAG, roles=OPERATORS,
                  path_names={"job_id": "id"},
                  summary="Pause a job (its partial files and checkpoints stay)")
    command_route(r, "POST", "/mast/download/resume/{job_id}",
                  DownloadCommand.DOWNLOAD_JOB_RESUME, None, name="resume", tag=DOWNLOAD_TAG,
                  roles=OPERATORS, path_names={"job_id": "id"},
                  summary="Resume a paused or failed job from its last checkpoints")

    @list_route(r, "/mast/download/resumable", DownloadJobPage, tag=DOWNLOAD_TAG,
                summary="Jobs that can be resumed (paused or failed)")
    async def resumable(request: Request, response: Response,
                        page: Paging) -> Any:
        listed = ledger_of(request).downloads.list_jobs
        return await read_page(request, response, page, None, lambda limit, offset: listed(
            ("paused", "failed"), limit, offset))

    @list_route(r, "/mast/download/jobs", DownloadJobPage, tag=DOWNLOAD_TAG,
                summary="Download jobs, newest first (smart query)")
    async def jobs(request: Request, response: Response,
                   page: Paging,
                   status: Annotated[Literal["requested", "running", "paused", "failed",
                                             "completed", "cancelled"] | None, Query()] = None
                   ) -> Any:
        listed = ledger_of(request).downloads.list_jobs
        return await read_page(request, response, page, None, lambda limit, offset: listed(
            (status,) if status else None, limit, offset))

    command_route(r, "DELETE", "/mast/download/{job_id}", DownloadCommand.DOWNLOAD_JOB_CANCEL,
                  None, name="cancel", tag=DOWNLOAD_TAG, roles=OPERATORS,
                  path_names={"job_id": "id"}, cancel=cancel_body,
                  summary="Cancel a job; its partial files are removed after the retention")

    return r

