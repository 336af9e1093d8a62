"""HTTP for raw data files and packages: files registered one by one or in bulk, packages
created, filled and finalized (critical commands), and their smart queries."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response
from pydantic import ConfigDict, Field

from api.accounts import allow
from api.deps import (
    COMMAND_RESPONSES,
    DESCENDING,
    REGISTERED,
    CommandAccepted,
    Ctx,
    MinPosition,
    Paging,
    RegisteredFrom,
    RegisteredTo,
    as_str,
    command_route,
    counts_route,
    feature_router,
    ledger_of,
    list_route,
    row_route,
    smart_page,
    submit,
)
from api.errors import ApiError, QueryTime, as_utc
from commands.raw_data import (
    AddFilesToPackageRequest,
    BulkRegisterRawDataFilesRequest,
    CreateRawDataPackageRequest,
    RawDataCommand,
    RegisterRawDataFileRequest,
)
from domain.accounts import CRITICAL_WRITERS
from queries.counts import file_counts
from queries.models import (
    RawDataFileCounts,
    RawDataFilePage,
    RawDataFileView,
    RawDataPackagePage,
    RawDataPackageView,
    SizedStatusCounts,
)
from queries.packages import PackageQueries

FILES_TAG = "raw data files"
PACKAGES_TAG = "raw data packages"


class FilesAccepted(CommandAccepted):
    count: int = Field(description="How many raw data files the command registers.")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "command_id": "night-1121-files-0412", "status": "accepted", "count": 1,
        "ids": {"raw_data_file_ids": ["5b8f2e0c-6a1d-5f3e-9c41-2b7d0e8a9f13"]}}]})


BULK_RESPONSES: dict[int | str, dict[str, Any]] = {
    **COMMAND_RESPONSES,
    202: {**COMMAND_RESPONSES[202], "model": FilesAccepted},
    200: {**COMMAND_RESPONSES[200], "model": FilesAccepted},
}


def document_bulk_limit(schema: dict[str, Any], limit: int) -> None:
    """The bulk registration's schema (in place): at most ``limit`` files, and the operations
    seed's bare list of files accepted too."""
    bulk = schema["components"]["schemas"]["BulkRegisterRawDataFilesRequest"]
    bulk["properties"]["files"]["maxItems"] = limit
    body = schema["paths"]["/raw_data_files/bulk"]["post"]["requestBody"]
    body["content"]["application/json"]["schema"] = {"anyOf": [
        {"$ref": "#/components/schemas/BulkRegisterRawDataFilesRequest"},
        {"type": "array", "items": {"$ref": "#/components/schemas/RawDataFileSpec"},
         "minItems": 1, "maxItems": limit,
         "description": "The files alone, as the operations seed sends them."}]}


def raw_data_router() -> APIRouter:
    r = feature_router()
    command_route(r, "POST", "/raw_data_files", RawDataCommand.RAW_DATA_FILE_REGISTER,
                  RegisterRawDataFileRequest, name="register_file", tag=FILES_TAG, plain=True,
                  summary="Register one raw data file (critical)",
                  description="A file's id is derived from (instrument, name): uuid5 of the "
                  "raw-data-file namespace, so names are unique per instrument.")

    @r.post("/raw_data_files/bulk", dependencies=[allow(CRITICAL_WRITERS)],
            tags=[FILES_TAG], status_code=202,
            response_model=FilesAccepted, responses=BULK_RESPONSES,
            summary="Register many raw data files in one command: all or none (critical)",
            description="The body is `{\"files\": [...]}`, or the list of files alone (the "
            "operations seed's shape). The answer is the command's (`status` `accepted`: "
            "journaled, applied shortly — what the seed calls buffered) with `count`, the "
            "number of files.")
    async def register_files(request: Request, body: BulkRegisterRawDataFilesRequest,
                             ctx: Ctx) -> Response:
        limit = request.app.state.settings.max_bulk_files
        if len(body.files) > limit:
            raise ApiError(422, "Validation failed", [{
                "field": "files", "message": f"at most {limit} files per command"}])
        return await submit(ledger_of(request), ctx, RawDataCommand.RAW_DATA_FILE_REGISTER_BULK,
                            body, extra={"count": len(body.files)})

    command_route(r, "POST", "/raw_data_package", RawDataCommand.RAW_DATA_PACKAGE_CREATE,
                  CreateRawDataPackageRequest, name="create_package", tag=PACKAGES_TAG,
                  plain=True,
                  summary="Create a raw data package, optionally registering its files "
                  "(critical)")
    command_route(r, "POST", "/raw_data_package/{id}/files",
                  RawDataCommand.RAW_DATA_PACKAGE_ADD_FILES, AddFilesToPackageRequest,
                  name="add_files", tag=PACKAGES_TAG,
                  summary="Add registered files to a building package (critical)")
    command_route(r, "PUT", "/raw_data_package/{id}/finalize",
                  RawDataCommand.RAW_DATA_PACKAGE_FINALIZE, None, name="finalize_package",
                  tag=PACKAGES_TAG,
                  summary="Finalize a package: building -> complete, within the size limit")

    @list_route(r, "/raw_data_package", RawDataPackagePage, tag=PACKAGES_TAG,
                summary="Raw data packages for dashboards (filters, time range, sort, pages)",
                description="Smart query: packages of pending commands lead the first page "
                "(`pending: true`). Their files: `GET /raw_data_files?package_id=`.")
    async def list_packages(
        request: Request, response: Response, page: Paging,
        status: Annotated[Literal["building", "complete"] | None, Query()] = None,
        executed_obs_unit_id: UUID | None = None,
        name: Annotated[str | None, Query(max_length=255)] = None,
        registered_from: RegisteredFrom = None,
        registered_to: RegisteredTo = None,
        sort: Annotated[Literal["registered_at", "-registered_at", "name", "-name",
                                "total_size", "-total_size"], Query(
            description=DESCENDING)] = "-registered_at",
        min_position: MinPosition = None,
    ) -> Any:
        return await smart_page(
            request, response, page, min_position, RawDataPackagePage,
            PackageQueries(ledger_of(request).queries).list, status=status,
            executed_obs_unit_id=as_str(executed_obs_unit_id), name=name,
            registered_from=as_utc(registered_from), registered_to=as_utc(registered_to),
            sort=sort)

    counts_route(r, "/raw_data_package/counts",
                 lambda q, start, end: PackageQueries(q).counts(start, end), window=REGISTERED,
                 name="package_counts", tag=PACKAGES_TAG, response_model=SizedStatusCounts,
                 summary="Raw data packages by status, with their bytes")

    counts_route(r, "/raw_data_files/counts", file_counts, window=REGISTERED,
                 name="raw_data_file_counts", tag=FILES_TAG, response_model=RawDataFileCounts,
                 summary="Raw data files by instrument and file type, bytes, packaged")

    @list_route(r, "/raw_data_files", RawDataFilePage, tag=FILES_TAG,
                summary="Raw data files, filtered and paged")
    async def list_files(
        request: Request, response: Response,
        page: Paging,
        executed_obs_unit_id: UUID | None = None,
        package_id: UUID | None = None,
        instrument: Annotated[str | None, Query(max_length=100)] = None,
        file_type: Annotated[str | None, Query(max_length=50)] = None,
        name: Annotated[str | None, Query(max_length=255)] = None,
        created_from: Annotated[QueryTime | None, Query(
            description="Created (the file's own time) at or after (UTC)")] = None,
        created_to: Annotated[QueryTime | None, Query(description="Created before (UTC)")
                              ] = None,
        registered_from: Annotated[QueryTime | None, Query(
            description="Registered (recorded in the ledger) at or after (UTC); a pending "
            "file counts as registered now")] = None,
        registered_to: Annotated[QueryTime | None, Query(
            description="Registered before (UTC)")] = None,
        sort: Annotated[Literal["created_at", "-created_at", "registered_at", "-registered_at",
                                "name", "-name", "size", "-size"], Query(
            description="`-` first: descending")] = "-created_at",
        min_position: MinPosition = None,
    ) -> Any:
        return await smart_page(
            request, response, page, min_position, RawDataFilePage,
            ledger_of(request).queries.list_files,
            executed_obs_unit_id=as_str(executed_obs_unit_id), package_id=as_str(package_id),
            instrument=instrument, file_type=file_type, name=name,
            created_from=as_utc(created_from), created_to=as_utc(created_to),
            registered_from=as_utc(registered_from), registered_to=as_utc(registered_to),
            sort=sort)

    row_route(r, "/raw_data_files/{id}", lambda lg: lg.queries.file, "raw data file",
              name="get_file", tag=FILES_TAG, id_type=UUID, response_model=RawDataFileView,
              summary="One raw data file (smart query)")

    row_route(r, "/raw_data_package/{id}", lambda lg: lg.queries.package, "raw data package",
              name="get_package", tag=PACKAGES_TAG, id_type=UUID,
              response_model=RawDataPackageView,
              summary="A raw data package with its files (smart query)")

    return r
