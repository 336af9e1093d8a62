"""HTTP for observation results: the critical commands (buffered like the core's) and the
smart queries. Included by ``api.app.create_app``."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request, Response
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
    _plain_command,
    _submit,
)
from commands.models import (
    CancelObservationResultRequest,
    ContributeAssetRequest,
    DispatchObservationResultRequest,
    EndProcessingRunRequest,
    MaterializeObservationResultsRequest,
    StartProcessingRunRequest,
    TaskOutcomeRequest,
)
from domain.accounts import CRITICAL_WRITERS, OPERATORS, READERS
from queries.models import DueResults, ObservationResultDetail, ObservationResultPage, ResultCounts

TAG = "observation results"
TaskPath = Annotated[UUID, Path(description="Task id")]
RunPath = Annotated[UUID, Path(description="Processing run id")]


def results_command_router() -> APIRouter:
    r = APIRouter()

    @r.post("/observation_results/materialize", dependencies=[allow(CRITICAL_WRITERS)],
            tags=[TAG], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Materialize the leaf cells of a request spec (critical, idempotent)",
            description="Every (epoch, sample, copy) cell becomes an observation result with "
            "a deterministic id; cells that exist already are left alone.")
    @_plain_command("observation_result.materialize", MaterializeObservationResultsRequest)
    async def materialize(request: Request, body: MaterializeObservationResultsRequest,
                          ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "observation_result.materialize", body)

    @r.post("/observation_results/{id}/dispatch", dependencies=[allow(CRITICAL_WRITERS)],
            tags=[TAG], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Dispatch: a new task (execution attempt) for the result (critical)")
    async def dispatch(request: Request, id: IdPath, body: DispatchObservationResultRequest,
                       ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "observation_result.dispatch", body,
                             {"id": id})

    @r.put("/observation_results/{id}/tasks/{task_id}", dependencies=[allow(CRITICAL_WRITERS)],
           tags=[TAG], status_code=202,
           response_model=CommandAccepted, responses=COMMAND_RESPONSES,
           summary="A task's outcome: succeeded, partial, failed or canceled (critical)")
    async def report_task(request: Request, id: IdPath, task_id: TaskPath,
                          body: TaskOutcomeRequest, ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "observation_result.report_task", body,
                             {"id": id, "task_id": task_id})

    @r.post("/observation_results/{id}/cancel", dependencies=[allow(OPERATORS)],
            tags=[TAG], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Cancel the result (from any non-final state) and its open task")
    async def cancel(request: Request, id: IdPath, body: CancelObservationResultRequest,
                     ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "observation_result.cancel", body,
                             {"id": id})

    @r.post("/observation_results/{id}/assets", dependencies=[allow(CRITICAL_WRITERS)],
            tags=[TAG], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="A contributing asset: bumps assets_revision, debounces the rebuild")
    async def contribute(request: Request, id: IdPath, body: ContributeAssetRequest,
                         ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "observation_result.contribute_asset",
                             body, {"id": id})

    @r.post("/observation_results/{id}/runs", dependencies=[allow(CRITICAL_WRITERS)],
            tags=[TAG], status_code=202,
            response_model=CommandAccepted, responses=COMMAND_RESPONSES,
            summary="Start a processing run of the current assets_revision")
    async def start_run(request: Request, id: IdPath, body: StartProcessingRunRequest,
                        ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "observation_result.start_run", body,
                             {"id": id})

    @r.put("/observation_results/{id}/runs/{run_id}", dependencies=[allow(CRITICAL_WRITERS)],
           tags=[TAG], status_code=202,
           response_model=CommandAccepted, responses=COMMAND_RESPONSES,
           summary="End the run in progress: completed (with outputs), failed, blocked or "
           "skipped")
    async def end_run(request: Request, id: IdPath, run_id: RunPath,
                      body: EndProcessingRunRequest, ctx: Ctx) -> Response:
        return await _submit(_ledger(request), ctx, "observation_result.end_run", body,
                             {"id": id, "run_id": run_id})

    return r


def results_query_router() -> APIRouter:
    r = APIRouter()

    @r.get("/observation_results", dependencies=[allow(READERS)],
           tags=[TAG], response_model=ObservationResultPage,
           responses=ERRORS, summary="Observation results for dashboards (filters, pages)")
    async def list_results(
        request: Request,
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
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        min_position: MinPosition = None,
    ) -> Any:
        await _caught_up(request, min_position)
        pos, total, items, pending = await run_in_threadpool(
            _ledger(request).queries.list_results, observation_id=observation_id,
            request_id=request_id, instrument_id=instrument_id,
            fulfillment_status=fulfillment_status, data_product_status=data_product_status,
            dirty=dirty, limit=limit, offset=offset)
        return ObservationResultPage(items=items, total=total, limit=limit, offset=offset,
                                     pending_count=pending, read_model_position=pos)

    @r.get("/observation_results/due", dependencies=[allow(READERS)],
           tags=[TAG], response_model=DueResults,
           responses=ERRORS, summary="What the scheduler builds next, and when")
    async def due(request: Request,
                  limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> Any:
        ledger = _ledger(request)
        clock = ledger.clock or (lambda: datetime.now(UTC))
        now = clock()
        items = await run_in_threadpool(ledger.queries.due_results, now, limit)
        return DueResults(now=now, items=items)

    @r.get("/observation_results/counts", dependencies=[allow(READERS)],
           tags=[TAG], response_model=ResultCounts,
           responses=ERRORS, summary="Results by fulfillment and data-product status")
    async def counts(request: Request) -> Any:
        return await run_in_threadpool(_ledger(request).queries.result_counts)

    @r.get("/observation_results/{id}", dependencies=[allow(READERS)],
           tags=[TAG], response_model=ObservationResultDetail,
           responses=ERRORS, summary="One result with its tasks, runs and outputs "
           "(smart query)")
    async def get_result(request: Request, id: IdPath, min_position: MinPosition = None) -> Any:
        await _caught_up(request, min_position)
        row = await run_in_threadpool(_ledger(request).queries.result, str(id))
        if row is None:
            raise _not_found("observation result", id)
        return row

    return r
