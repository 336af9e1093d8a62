"""HTTP for executed obs units: started and finished by telescope automation (critical
commands), listed and read by dashboards (smart queries)."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from uuid import UUID

from fastapi import APIRouter, Path, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.accounts import allow
from api.deps import (
    QUERY_RESPONSES,
    MinPosition,
    Paging,
    Window,
    caught_up,
    command_route,
    counts_route,
    feature_router,
    ledger_of,
    list_route,
    query_time,
    row_route,
    smart_page,
)
from api.errors import QueryTime, as_utc
from commands.obs_units import (
    FinishExecutedObsUnitRequest,
    ObsUnitCommand,
    StartExecutedObsUnitRequest,
)
from domain.accounts import READERS
from infra.availability import read_models_state
from queries.counts import unit_counts
from queries.models import (
    ExecutedObsUnitCounts,
    ExecutedObsUnitPage,
    ExecutedObsUnitView,
    ExecutionsOfObsUnit,
)

TAG = "executed obs units"
#: The window of the executions' counts: when they started.
STARTED: Window = (
    ("start_from", Annotated[QueryTime | None, query_time("Started at or after")]),
    ("start_to", Annotated[QueryTime | None, query_time("Started before")]))


def obs_units_router() -> APIRouter:
    r = feature_router()
    command_route(r, "POST", "/executed_obs_units/start", ObsUnitCommand.EXECUTED_OBS_UNIT_START,
                  StartExecutedObsUnitRequest, name="start_unit", tag=TAG, plain=True,
                  summary="Start an executed obs unit (critical)")
    command_route(r, "PUT", "/executed_obs_units/{id}/finish",
                  ObsUnitCommand.EXECUTED_OBS_UNIT_FINISH, FinishExecutedObsUnitRequest,
                  name="finish_unit", tag=TAG,
                  summary="Finish an executed obs unit: success, failed or aborted (critical)")

    counts_route(r, "/executed_obs_units/counts", unit_counts, window=STARTED,
                 name="executed_obs_unit_counts", tag=TAG,
                 response_model=ExecutedObsUnitCounts,
                 summary="Executed obs units by status and instrument")

    @list_route(r, "/executed_obs_units", ExecutedObsUnitPage, tag=TAG,
                summary="Executed obs units for dashboards (filters, pages)")
    async def list_units(
        request: Request, response: Response,
        page: Paging,
        status: Annotated[Literal["running", "success", "failed", "aborted"] | None,
                          Query()] = None,
        instrument: Annotated[str | None, Query(max_length=100)] = None,
        obs_unit_id: Annotated[str | None, Query(max_length=100)] = None,
        start_from: Annotated[QueryTime | None, Query(
            description="Started at or after (UTC)")] = None,
        start_to: Annotated[QueryTime | None, Query(description="Started before (UTC)")] = None,
        sort: Annotated[Literal["start_time", "-start_time"], Query(
            description="`-` first: descending")] = "-start_time",
        min_position: MinPosition = None,
    ) -> Any:
        return await smart_page(
            request, response, page, min_position, ExecutedObsUnitPage,
            ledger_of(request).queries.list_executions, status=status, instrument=instrument,
            start_from=as_utc(start_from), start_to=as_utc(start_to), obs_unit_id=obs_unit_id,
            sort=sort)

    row_route(r, "/executed_obs_units/execution/{id}", lambda lg: lg.queries.execution,
              "executed obs unit", name="get_execution", tag=TAG, id_type=UUID,
              response_model=ExecutedObsUnitView,
              summary="One execution by its id (smart query)")

    @r.get("/executed_obs_units/{obs_unit_id}", dependencies=[allow(READERS)],
           tags=[TAG], response_model=ExecutionsOfObsUnit, responses=QUERY_RESPONSES,
           summary="Every execution of a planned obs unit, merged with pending ones")
    async def executions_of(request: Request,
                            obs_unit_id: Annotated[str, Path(
                                max_length=100,
                                json_schema_extra={"pattern": "^(?!(start|counts)$)"},
                                description="Not `start` (POST /executed_obs_units/start) "
                                "nor `counts` (GET /executed_obs_units/counts)")],
                            min_position: MinPosition = None) -> Any:
        await caught_up(request, min_position)
        pos, rows = await run_in_threadpool(ledger_of(request).queries.executions_of, obs_unit_id)
        return ExecutionsOfObsUnit(obs_unit_id=obs_unit_id, read_model_position=pos,
                                   executions=rows, read_models=read_models_state())

    return r
