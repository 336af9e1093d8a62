"""HTTP for observation results: the critical commands (buffered like the core's) and the
smart queries. Included by ``api.app.create_app``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.accounts import allow
from api.deps import (
    ERRORS,
    MinPosition,
    Paging,
    command_route,
    feature_router,
    ledger_of,
    list_route,
    row_route,
    smart_page,
)
from commands.results import (
    CancelObservationResultRequest,
    ContributeAssetRequest,
    DispatchObservationResultRequest,
    EndProcessingRunRequest,
    MaterializeObservationResultsRequest,
    ResultCommand,
    StartProcessingRunRequest,
    TaskOutcomeRequest,
)
from domain.accounts import OPERATORS, READERS
from queries.models import DueResults, ObservationResultDetail, ObservationResultPage, ResultCounts

TAG = "observation results"
TaskPath = Annotated[UUID, Path(description="Task id")]
RunPath = Annotated[UUID, Path(description="Processing run id")]


def results_router() -> APIRouter:
    r = feature_router()
    command_route(r, "POST", "/observation_results/materialize",
                  ResultCommand.OBSERVATION_RESULT_MATERIALIZE,
                  MaterializeObservationResultsRequest, name="materialize", tag=TAG, plain=True,
                  summary="Materialize the leaf cells of a request spec (critical, idempotent)",
                  description="Every (epoch, sample, copy) cell becomes an observation result "
                  "with a deterministic id; cells that exist already are left alone.")
    command_route(r, "POST", "/observation_results/{id}/dispatch",
                  ResultCommand.OBSERVATION_RESULT_DISPATCH, DispatchObservationResultRequest,
                  name="dispatch", tag=TAG,
                  summary="Dispatch: a new task (execution attempt) for the result (critical)")
    command_route(r, "PUT", "/observation_results/{id}/tasks/{task_id}",
                  ResultCommand.OBSERVATION_RESULT_REPORT_TASK, TaskOutcomeRequest,
                  name="report_task", tag=TAG, path_types={"task_id": TaskPath},
                  summary="A task's outcome: succeeded, partial, failed or canceled (critical)")
    command_route(r, "POST", "/observation_results/{id}/cancel",
                  ResultCommand.OBSERVATION_RESULT_CANCEL, CancelObservationResultRequest,
                  name="cancel", tag=TAG, roles=OPERATORS,
                  summary="Cancel the result (from any non-final state) and its open task")
    command_route(r, "POST", "/observation_results/{id}/assets",
                  ResultCommand.OBSERVATION_RESULT_CONTRIBUTE_ASSET, ContributeAssetRequest,
                  name="contribute", tag=TAG,
                  summary="A contributing asset: bumps assets_revision, debounces the rebuild")
    command_route(r, "POST", "/observation_results/{id}/runs",
                  ResultCommand.OBSERVATION_RESULT_START_RUN, StartProcessingRunRequest,
                  name="start_run", tag=TAG,
                  summary="Start a processing run of the current assets_revision")
    command_route(r, "PUT", "/observation_results/{id}/runs/{run_id}",
                  ResultCommand.OBSERVATION_RESULT_END_RUN, EndProcessingRunRequest,
                  name="end_run", tag=TAG, path_types={"run_id": RunPath},
                  summary="End the run in progress: completed (with outputs), failed, blocked "
                  "or skipped")


    @list_route(r, "/observation_results", ObservationResultPage, tag=TAG,
                summary="Observation results for dashboards (filters, pages)")
    async def list_results(
        request: Request, response: Response,
        page: Paging,
        observation_id: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
        request_id: Annotated[int | None, Query(ge=0, le=2**31 - 1)] = None,
        instrument_id: Annotated[str | None, Query(max_length=100)] = None,
        fulfillment_status: Annotated[Literal[
            "pending_dispatch", "dispatched", "partially_fulfilled", "fulfilled",
            "canceled"] | None, Query()] = None,
        data_product_status: Annotated[Literal[
            "PENDING", "BUILDING", "READY", "BLOCKED", "FAILED", "SKIPPED", "STALE"] | None,
            Query()] = None,
        dirty: Annotated[bool | None, Query()] = None,
        min_position: MinPosition = None,
    ) -> Any:
        return await smart_page(
            request, response, page, min_position, ObservationResultPage,
            ledger_of(request).queries.list_results, observation_id=observation_id,
            request_id=request_id, instrument_id=instrument_id,
            fulfillment_status=fulfillment_status, data_product_status=data_product_status,
            dirty=dirty)

    @r.get("/observation_results/due", dependencies=[allow(READERS)],
           tags=[TAG], response_model=DueResults,
           responses=ERRORS, summary="What the scheduler builds next, and when")
    async def due(request: Request,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Any:
        ledger = ledger_of(request)
        clock = ledger.clock or (lambda: datetime.now(UTC))
        now = clock()
        items = await run_in_threadpool(ledger.queries.due_results, now, limit)
        return DueResults(now=now, items=items)

    @r.get("/observation_results/counts", dependencies=[allow(READERS)],
           tags=[TAG], response_model=ResultCounts,
           responses=ERRORS, summary="Results by fulfillment and data-product status")
    async def counts(request: Request) -> Any:
        return await run_in_threadpool(ledger_of(request).queries.result_counts)

    row_route(r, "/observation_results/{id}", lambda lg: lg.queries.result,
              "observation result", name="get_result", tag=TAG,
              response_model=ObservationResultDetail,
              summary="One result with its tasks, runs and outputs (smart query)")

    return r
