"""Staging: copying packages to a destination, its progress reports and its cancellation."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import Field, field_validator

from commands.models import CommandModel, with_examples
from commands.spec import CommandSpec, PendingRows, Policy, Row, Target, changes
from commands.unit_of_work import UnitOfWork
from domain.provenance import Provenance
from domain.raw_data import RawDataPackage
from domain.staging import StagingRequest
from infra.journal import JournalEntry


class StagingCommand(StrEnum):
    """The command types of this feature, as the journal stores them."""

    STAGING_CANCEL = "staging.cancel"
    STAGING_REPORT_PROGRESS = "staging.report_progress"
    STAGING_STAGE = "staging.stage"
    STAGING_RETRY = "staging.retry"


#: what commands/registry.py checks: every one of these has a CommandSpec below
COMMAND_TYPES = StagingCommand

STAGING = "staging"
_ENDED = frozenset({"completed", "failed", "cancelled"})
#: a retry is refused at once for these; one of a request still running is refused by the
#: domain when applied (the read model may not show its failure yet)
_NEVER_RETRIED = frozenset({"completed", "cancelled"})


# -- the commands ----------------------------------------------------------------------------
class StageRequest(CommandModel):
    id: UUID | None = Field(None, description="Pre-generated staging request id.")
    package_ids: list[UUID] = Field(min_length=1, max_length=10_000,
                                    json_schema_extra={"uniqueItems": True})
    destination: Annotated[
        str, Field(min_length=1, max_length=1024, examples=["archive-transfer:/stage/night-1121"])
    ]

    model_config = with_examples({
        "package_ids": ["3fb1d267-f9f6-4599-a97a-74fed41eaa02"],
        "destination": "archive-transfer:/stage/night-1121"})

    @field_validator("package_ids")
    @classmethod
    def _unique(cls, v: list[UUID]) -> list[UUID]:
        if len(set(v)) != len(v):
            raise ValueError("package_ids repeats an id")
        return v


class Stage(StageRequest):
    id: UUID


class StagingProgressRequest(CommandModel):
    status: Literal["in_progress", "completed", "failed"] = "in_progress"
    bytes_transferred: int = Field(ge=0)
    files_transferred: int = Field(ge=0)
    message: Annotated[str, Field(max_length=2000)] | None = None

    model_config = with_examples({
        "status": "in_progress", "bytes_transferred": 8_396_640, "files_transferred": 1,
        "message": "transferring HARPS.2026-11-21T23:15:00.123.fits"})


class ReportStagingProgress(StagingProgressRequest):
    id: UUID


class CancelStaging(CommandModel):
    id: UUID
    reason: Annotated[str, Field(max_length=2000)] | None = None


class RetryStagingRequest(CommandModel):
    """Start a failed staging request again (an operator, once the cause is fixed)."""

    reason: Annotated[str, Field(max_length=2000, pattern=r"^[^\x00]*$")] | None = Field(
        None, description="Why it is retried; shown as the request's message until the "
        "transfer agent reports progress.")

    model_config = with_examples({"reason": "destination disk replaced"})


class RetryStaging(RetryStagingRequest):
    id: UUID


# -- handlers --------------------------------------------------------------------------------
#: the handler of a command to an existing request, from what it does to the request
_changes_request = changes(StagingRequest, "staging request")


def stage(cmd: Stage, uow: UnitOfWork, prov: Provenance, _: Policy) -> list[UUID]:
    packages = [
        uow.get(RawDataPackage, pid, "raw data package", f"package_ids.{i}")
        for i, pid in enumerate(cmd.package_ids)
    ]
    request = StagingRequest.request(
        staging_id=cmd.id, packages=packages, destination=cmd.destination, provenance=prov
    )
    uow.add(request, "staging request")
    return [request.id]


@_changes_request
def report_staging_progress(request: StagingRequest, cmd: ReportStagingProgress,
                            prov: Provenance, _: Policy) -> None:
    request.report_progress(
        cmd.status, cmd.bytes_transferred, cmd.files_transferred, cmd.message, prov
    )


@_changes_request
def cancel_staging(request: StagingRequest, cmd: CancelStaging, prov: Provenance,
                   _: Policy) -> None:
    request.cancel(cmd.reason, prov)


@_changes_request
def retry_staging(request: StagingRequest, cmd: RetryStaging, prov: Provenance, _: Policy) -> None:
    request.retry(cmd.reason, prov)


# -- how a pending command shows in smart queries --------------------------------------------
def _staged(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    o.create(STAGING, p["id"], {
        "id": p["id"], "package_ids": p["package_ids"], "destination": p["destination"],
        "status": "pending", "bytes_total": None, "files_total": None,
        "bytes_transferred": 0, "files_transferred": 0, "message": None}, e)


def _progressed(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    def change(r: Row) -> None:
        if r["status"] in ("pending", "in_progress"):
            r.update(status=p["status"], bytes_transferred=p["bytes_transferred"],
                     files_transferred=p["files_transferred"], message=p.get("message"))
    o.patch(STAGING, p["id"], e, change)


def _cancelled(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    def change(r: Row) -> None:
        if r["status"] in ("pending", "in_progress"):
            r.update(status="cancelled", message=p.get("reason"))
    o.patch(STAGING, p["id"], e, change)


def _retried(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    def change(r: Row) -> None:
        if r["status"] == "failed":
            r.update(status="pending", bytes_transferred=0, files_transferred=0,
                     message=p.get("reason"))
    o.patch(STAGING, p["id"], e, change)


def _subjects(cmd: Any) -> list[str]:
    return [f"staging:{cmd.id}"]


SPECS = [
    CommandSpec(StagingCommand.STAGING_STAGE, Stage, stage, _subjects, creates=STAGING,
                overlay=_staged, shows=(STAGING,)),
    CommandSpec(
        StagingCommand.STAGING_REPORT_PROGRESS, ReportStagingProgress, report_staging_progress,
        _subjects, target=Target(STAGING, "staging request", _ENDED, one_pending=False),
        overlay=_progressed, shows=(STAGING,),
    ),
    CommandSpec(StagingCommand.STAGING_CANCEL, CancelStaging, cancel_staging, _subjects,
                target=Target(STAGING, "staging request", _ENDED),
                overlay=_cancelled, shows=(STAGING,)),
    CommandSpec(StagingCommand.STAGING_RETRY, RetryStaging, retry_staging, _subjects,
                target=Target(STAGING, "staging request", _NEVER_RETRIED),
                overlay=_retried, shows=(STAGING,)),
]
