"""HTTP for staging requests: complete packages staged to a destination, the transfer agent's
progress and cancellation (critical commands), and where a request stands (smart query)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Query, Request, Response

from api.deps import (
    DESCENDING,
    REGISTERED,
    MinPosition,
    Paging,
    RegisteredFrom,
    RegisteredTo,
    cancel_body,
    command_route,
    counts_route,
    feature_router,
    ledger_of,
    list_route,
    row_route,
    smart_page,
)
from api.errors import as_utc
from commands.staging import (
    RetryStagingRequest,
    StageRequest,
    StagingCommand,
    StagingProgressRequest,
)
from domain.accounts import OPERATORS
from queries.models import SizedStatusCounts, StagingRequestPage, StagingRequestView
from queries.staging import StagingQueries

TAG = "staging"


def staging_router() -> APIRouter:
    r = feature_router()
    command_route(r, "POST", "/staging/stage", StagingCommand.STAGING_STAGE, StageRequest,
                  name="stage", tag=TAG, plain=True,
                  summary="Request that complete packages be staged to a destination "
                  "(critical)")
    command_route(r, "PUT", "/staging/{id}/progress", StagingCommand.STAGING_REPORT_PROGRESS,
                  StagingProgressRequest, name="progress", tag=TAG,
                  summary="Report transfer progress or the outcome (transfer agent)")

    command_route(r, "POST", "/staging/{id}/retry", StagingCommand.STAGING_RETRY,
                  RetryStagingRequest, name="retry", tag=TAG, roles=OPERATORS,
                  summary="Start a failed staging request again (operators)",
                  description="Only a failed request: it becomes `pending` with its progress "
                  "back to zero and the body's `reason` (optional; send `{}` without one) as "
                  "its message, and the transfer agent copies the packages anew. A request "
                  "completed or cancelled is refused at once (409); one the read models "
                  "still show running is refused when applied if it has not failed.")

    command_route(r, "DELETE", "/staging/{id}", StagingCommand.STAGING_CANCEL, None,
                  name="cancel", tag=TAG, roles=OPERATORS, cancel=cancel_body,
                  summary="Cancel a staging request (not once completed)")

    @list_route(r, "/staging", StagingRequestPage, tag=TAG,
                summary="The staging queue: staging requests (filters, time range, sort, pages)",
                description="Smart query: requests of pending commands lead the first page "
                "(`pending: true`).")
    async def list_staging(
        request: Request, response: Response, page: Paging,
        status: Annotated[Literal["pending", "in_progress", "completed", "failed",
                                  "cancelled"] | None, Query()] = None,
        destination: Annotated[str | None, Query(max_length=1024)] = None,
        registered_from: RegisteredFrom = None,
        registered_to: RegisteredTo = None,
        sort: Annotated[Literal["registered_at", "-registered_at", "updated_at",
                                "-updated_at"], Query(description=DESCENDING)
                        ] = "-registered_at",
        min_position: MinPosition = None,
    ) -> Any:
        return await smart_page(
            request, response, page, min_position, StagingRequestPage,
            StagingQueries(ledger_of(request).queries).list, status=status,
            destination=destination, registered_from=as_utc(registered_from),
            registered_to=as_utc(registered_to), sort=sort)

    counts_route(r, "/staging/counts",
                 lambda q, start, end: StagingQueries(q).counts(start, end), window=REGISTERED,
                 name="staging_counts", tag=TAG, response_model=SizedStatusCounts,
                 summary="Staging requests by status, with their bytes")

    row_route(r, "/staging/status/{id}", lambda lg: lg.queries.staging, "staging request",
              name="staging_status", tag=TAG, id_type=UUID, response_model=StagingRequestView,
              summary="Where a staging request stands (smart query)")

    return r
