"""HTTP for where a critical command stands (``Location`` of every command's answer)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Request

from api.accounts import allow
from api.deps import ERRORS, feature_router, ledger_of, not_found
from domain.accounts import READERS
from infra.journal import APPLIED
from queries.models import CommandStatusView


def command_status_router() -> APIRouter:
    r = feature_router()

    @r.get("/commands/{command_id}", dependencies=[allow(READERS)],
           tags=["commands"], response_model=CommandStatusView,
           responses=ERRORS, summary="Where a critical command stands")
    async def command_status(request: Request,
                             command_id: Annotated[str, Path(max_length=200)]) -> Any:
        entry = ledger_of(request).command_entry(command_id)
        if entry is None:
            raise not_found("command", command_id)
        return CommandStatusView(
            command_id=entry.command_id, command_type=entry.command_type, status=entry.status,
            position=entry.position if entry.status == APPLIED else None, reason=entry.reason,
            reason_code=entry.reason_code, reason_field=entry.reason_field,
            received_at=entry.received_at, finished_at=entry.finished_at, actor=entry.actor,
            correlation_id=entry.correlation_id, attempts=entry.attempts,
            ids=entry.response.get("ids", {}))

    return r
