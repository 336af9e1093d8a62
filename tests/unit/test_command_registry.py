"""The command registry: every command type declared once, in its feature module, and what
acceptance and smart queries read from the declaration (no store needed)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from types import ModuleType
from typing import Any

import pytest

from commands import obs_units, raw_data, staging
from commands.raw_data import RawDataCommand
from commands.registry import COMMANDS, CREATES, FEATURES, SHOWN_IN, assemble
from commands.staging import Stage, StagingCommand
from infra.journal import JournalEntry
from queries.overlay import Overlay


def test_every_command_type_is_declared_once_by_its_feature() -> None:
    assert set(COMMANDS) == {t for feature in FEATURES for t in feature.COMMAND_TYPES}
    for feature in FEATURES:
        for spec in feature.SPECS:
            assert COMMANDS[spec.name] is spec
    with pytest.raises(ValueError, match="declared twice"):
        assemble([*FEATURES, staging])

    class LonelyCommand(StrEnum):
        LONELY_PING = "lonely.ping"

    lonely = ModuleType("commands.lonely")
    lonely.COMMAND_TYPES = LonelyCommand  # type: ignore[attr-defined]
    lonely.SPECS = ()  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="without a CommandSpec"):
        assemble([obs_units, raw_data, lonely])
    lonely.SPECS = staging.SPECS  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="other features' types"):
        assemble([lonely])


def test_prechecks_and_pending_rows_come_from_the_specs() -> None:
    assert CREATES["staging"] == {StagingCommand.STAGING_STAGE}
    cancel = COMMANDS[StagingCommand.STAGING_CANCEL].target
    assert cancel is not None and cancel.what == "staging request"
    assert "cancelled" in cancel.final_statuses and cancel.one_pending
    assert SHOWN_IN["raw_data_file"] == (
        RawDataCommand.RAW_DATA_FILE_REGISTER, RawDataCommand.RAW_DATA_FILE_REGISTER_BULK,
        RawDataCommand.RAW_DATA_PACKAGE_CREATE, RawDataCommand.RAW_DATA_PACKAGE_ADD_FILES)


def _entry(command_type: str, payload: dict[str, Any]) -> JournalEntry:
    return JournalEntry(
        seq=1, command_id="c-1", command_type=command_type, payload=payload, actor="night-ops",
        correlation_id="c-1", request_hash="", response={}, received_at=datetime.now(UTC),
        observed_at=None, status="accepted", position=None, reason=None, reason_code=None,
        reason_field=None, attempts=0, not_before=0.0, first_deferred_at=None,
        finished_at=None)


def test_a_pending_stage_answers_its_id_and_shows_as_a_pending_staging_request() -> None:
    spec = COMMANDS[StagingCommand.STAGING_STAGE]
    package = uuid.uuid4()
    cmd = Stage(id=uuid.uuid4(), package_ids=[package], destination="night-1121")
    assert spec.response_ids(cmd) == {"staging_id": str(cmd.id)}
    overlay = Overlay(lambda _kind, _id: None)
    overlay.apply(_entry(spec.name, cmd.model_dump(mode="json")))
    row = overlay.rows["staging"][str(cmd.id)]
    assert row is not None
    assert (row["status"], row["pending"], row["package_ids"]) == (
        "pending", True, [str(package)])
