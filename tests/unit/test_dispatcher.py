"""The dispatcher over the in-memory event store: batches, a failing command isolated,
receipts answering a replayed command, collisions turned into conflicts, missing targets.

The journal is the real one on an SQLite ``:memory:`` database (one per thread: everything
here runs in the test's thread, ``dispatch_once`` included)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import pytest

from commands.dispatcher import Dispatcher
from commands.obs_units import ObsUnitCommand
from commands.raw_data import RawDataCommand
from commands.registry import COMMANDS
from domain.obs_units import ExecutedObsUnit
from domain.raw_data import raw_data_file_id
from domain.receipts import CommandReceipt, receipt_id
from infra.event_store import EventStore
from infra.journal import ACCEPTED, APPLIED, REJECTED, Journal, JournalEntry, NewCommand
from infra.settings import Settings
from tests.unit.runner import NIGHT, file_fields

START = ObsUnitCommand.EXECUTED_OBS_UNIT_START
FINISH = ObsUnitCommand.EXECUTED_OBS_UNIT_FINISH
REGISTER = RawDataCommand.RAW_DATA_FILE_REGISTER


def in_memory_journal() -> Journal:
    return Journal(Path(":memory:"))


@pytest.fixture
def journal() -> Iterator[Journal]:
    j = in_memory_journal()
    yield j
    j.close()


def dispatcher(journal: Journal, store: EventStore, deadline_s: float = 0.0) -> Dispatcher:
    return Dispatcher(journal, store, Settings(missing_target_deadline_s=deadline_s,
                                               package_size_limit_bytes=1000))


def send(journal: Journal, command_type: str, *, command_id: str | None = None,
         actor: str = "night-operator", **fields: Any) -> str:
    """Journal a command as the command service does once it has accepted it."""
    spec = COMMANDS[command_type]
    command = spec.model.model_validate(fields)
    command_id = command_id or str(uuid4())
    journal.append_sync(NewCommand(
        command_id=command_id, command_type=command_type,
        payload=command.model_dump(mode="json"), actor=actor, correlation_id=command_id,
        request_hash=command_id, response=spec.response_ids(command),
        subjects=spec.subjects(command)))
    return command_id


def outcome(journal: Journal, command_id: str) -> JournalEntry:
    entry = journal.get(command_id)
    assert entry is not None
    return entry


def start_fields(unit_id: UUID) -> dict[str, Any]:
    return {"id": unit_id, "obs_unit_id": "OU-2026-0412", "instrument": "HARPS",
            "start_time": NIGHT}


def finish_fields(unit_id: UUID, status: str = "success") -> dict[str, Any]:
    return {"id": unit_id, "status": status, "end_time": NIGHT + timedelta(hours=1)}


def test_a_batch_applies_in_order_with_a_receipt_per_command(journal: Journal,
                                                             store: EventStore) -> None:
    unit = uuid4()
    started = send(journal, START, **start_fields(unit))
    finished = send(journal, FINISH, **finish_fields(unit))
    d = dispatcher(journal, store)
    assert d.dispatch_once() == 2
    first, second = outcome(journal, started), outcome(journal, finished)
    assert (first.status, second.status) == (APPLIED, APPLIED)
    # one transaction: unit started, its receipt, unit finished, its receipt
    assert (first.position, second.position) == (2, 4) and store.max_position() == 4
    assert d.applied_position == 4
    unit_now = store.get(unit)
    assert isinstance(unit_now, ExecutedObsUnit) and unit_now.status == "success"
    receipt = store.get(receipt_id(finished))
    assert isinstance(receipt, CommandReceipt)
    assert (receipt.command_type, receipt.entity_ids) == (FINISH, [str(unit)])
    assert store.recorded_by(receipt_id(finished)) == "night-operator"
    assert d.dispatch_once() == 0


def test_a_failing_command_is_isolated_from_its_batch(journal: Journal,
                                                      store: EventStore) -> None:
    unit, other = uuid4(), uuid4()
    ids = [send(journal, START, **start_fields(unit)),
           send(journal, FINISH, **finish_fields(unit)),
           send(journal, FINISH, **finish_fields(unit, "aborted")),  # finishing twice
           send(journal, START, **start_fields(other))]
    assert dispatcher(journal, store).dispatch_once() == 4
    entries = [outcome(journal, i) for i in ids]
    assert [e.status for e in entries] == [APPLIED, APPLIED, REJECTED, APPLIED]
    refused = entries[2]
    assert (refused.reason_code, refused.reason_field) == ("conflict", "status")
    assert refused.position is None
    assert not store.exists(receipt_id(ids[2]))  # nothing of it was saved
    unit_now = store.get(unit)
    assert isinstance(unit_now, ExecutedObsUnit) and unit_now.status == "success"
    assert store.exists(other)
    assert store.max_position() == 6  # 3 applied commands: an event and a receipt each


def test_a_replayed_command_is_answered_from_its_receipt(store: EventStore) -> None:
    """Applied, but the journal never heard (a crash): the same command again, from a fresh
    journal, collides with its receipt and is answered with the first position."""
    unit, command_id = uuid4(), str(uuid4())
    first = in_memory_journal()
    send(first, START, command_id=command_id, **start_fields(unit))
    dispatcher(first, store).dispatch_once()
    applied_at = outcome(first, command_id).position
    first.close()

    again = in_memory_journal()
    send(again, START, command_id=command_id, **start_fields(unit))
    dispatcher(again, store).dispatch_once()
    entry = outcome(again, command_id)
    assert (entry.status, entry.position) == (APPLIED, applied_at)
    assert store.max_position() == 2  # nothing new
    again.close()


def test_the_same_key_from_another_principal_is_refused(store: EventStore) -> None:
    command_id = str(uuid4())
    first = in_memory_journal()
    send(first, START, command_id=command_id, **start_fields(uuid4()))
    dispatcher(first, store).dispatch_once()
    first.close()

    other = in_memory_journal()
    send(other, START, command_id=command_id, actor="someone-else",
         **start_fields(uuid4()))
    dispatcher(other, store).dispatch_once()
    entry = outcome(other, command_id)
    assert (entry.status, entry.reason_code) == (REJECTED, "idempotency_conflict")
    other.close()


def test_a_file_registered_again_is_a_conflict_naming_it(journal: Journal,
                                                         store: EventStore) -> None:
    """A separate command: the store's IntegrityError, resolved into a conflict. In one
    batch: the unit of work's DuplicateEntity. Either way the others of the batch apply."""
    d = dispatcher(journal, store)
    send(journal, REGISTER, **file_fields("a.fits"))
    d.dispatch_once()
    later = send(journal, REGISTER, **file_fields("a.fits", size=5))
    d.dispatch_once()
    entry = outcome(journal, later)
    assert (entry.status, entry.reason_code) == (REJECTED, "conflict")
    assert entry.reason is not None and "raw data file a.fits of instrument HARPS" in entry.reason

    batch = [send(journal, REGISTER, **file_fields("b.fits")),
             send(journal, REGISTER, **file_fields("b.fits", size=5)),
             send(journal, REGISTER, **file_fields("c.fits"))]
    d.dispatch_once()
    assert [outcome(journal, i).status for i in batch] == [APPLIED, REJECTED, APPLIED]
    assert outcome(journal, batch[1]).reason_code == "conflict"
    assert store.existing([raw_data_file_id("HARPS", n) for n in ("a.fits", "b.fits",
                                                                  "c.fits")]) == {
        raw_data_file_id("HARPS", n) for n in ("a.fits", "b.fits", "c.fits")}


def test_a_missing_target_waits_then_is_refused(journal: Journal, store: EventStore) -> None:
    unit = uuid4()
    waiting = send(journal, FINISH, **finish_fields(unit))
    dispatcher(journal, store, deadline_s=30).dispatch_once()
    entry = outcome(journal, waiting)
    assert (entry.status, entry.reason_code, entry.reason_field) == (ACCEPTED, "waiting", "id")
    assert entry.not_before > 0 and entry.first_deferred_at is not None

    gone = send(journal, FINISH, **finish_fields(uuid4()))
    dispatcher(journal, store, deadline_s=0).dispatch_once()
    assert (outcome(journal, gone).status, outcome(journal, gone).reason_code) == (
        REJECTED, "not_found")


def test_an_invalid_journaled_payload_is_rejected(journal: Journal, store: EventStore) -> None:
    journal.append_sync(NewCommand(
        command_id="bad", command_type=START, payload={"id": "not a uuid"},
        actor="night-operator", correlation_id="bad", request_hash="bad", response={},
        subjects=[]))
    journal.append_sync(NewCommand(
        command_id="unknown", command_type="telescope.dome_open", payload={},
        actor="night-operator", correlation_id="unknown", request_hash="unknown",
        response={}, subjects=[]))
    dispatcher(journal, store).dispatch_once()
    assert outcome(journal, "bad").reason_code == "invalid"
    assert outcome(journal, "unknown").reason_code == "invalid"
    assert store.max_position() == 0
