"""Raw data files and packages through their handlers, the unit of work and the in-memory
store: registration (one, bulk, duplicates), packages (create, add, finalize, size limit)."""

from __future__ import annotations

from dataclasses import replace
from uuid import UUID, uuid4

import pytest

from commands.obs_units import ObsUnitCommand
from commands.raw_data import RawDataCommand
from commands.registry import COMMANDS
from commands.unit_of_work import UnitOfWork
from domain.errors import (
    DuplicateEntity,
    IllegalTransition,
    InvalidCommand,
    LimitExceeded,
    TargetNotFound,
)
from domain.raw_data import RawDataFile, RawDataPackage, raw_data_file_id
from infra.event_store import EventStore, IntegrityError
from tests.unit.runner import NIGHT, PACKAGE_LIMIT, CommandRunner, file_fields

REGISTER = RawDataCommand.RAW_DATA_FILE_REGISTER
BULK = RawDataCommand.RAW_DATA_FILE_REGISTER_BULK
CREATE = RawDataCommand.RAW_DATA_PACKAGE_CREATE
ADD = RawDataCommand.RAW_DATA_PACKAGE_ADD_FILES
FINALIZE = RawDataCommand.RAW_DATA_PACKAGE_FINALIZE


def registered(run: CommandRunner, *names: str, size: int = 100) -> list[UUID]:
    return run(BULK, files=[file_fields(n, size) for n in names]).ids


def test_register_one_file(run: CommandRunner) -> None:
    applied = run(REGISTER, **file_fields("HARPS.2026-11-21T23:15:00.123.fits", size=16))
    file_id = raw_data_file_id("HARPS", "HARPS.2026-11-21T23:15:00.123.fits")
    assert applied.ids == [file_id]
    assert applied.names == ["RawDataFile.Registered"]
    f = run.load(RawDataFile, file_id)
    assert (f.name, f.instrument, f.size, f.checksum_algorithm) == (
        "HARPS.2026-11-21T23:15:00.123.fits", "HARPS", 16, "md5")
    assert f.relative_path == "2026-11-21/HARPS.2026-11-21T23:15:00.123.fits"
    assert f.created_at == NIGHT and f.package_id is None and f.executed_obs_unit_id is None


def test_register_in_bulk_is_one_atomic_save(run: CommandRunner, store: EventStore) -> None:
    names = [f"HARPS.{i:04d}.fits" for i in range(5)]
    applied = run(BULK, files=[file_fields(n) for n in names])
    assert applied.ids == [raw_data_file_id("HARPS", n) for n in names]
    assert applied.names == ["RawDataFile.Registered"] * 5
    assert applied.positions == [1, 2, 3, 4, 5]
    assert store.existing(applied.ids) == set(applied.ids)


def test_a_file_of_an_executed_obs_unit_needs_the_unit(run: CommandRunner) -> None:
    missing = uuid4()
    refusal = run.refused(BULK, files=[file_fields("a.fits"),
                                       file_fields("b.fits", executed_obs_unit_id=missing)])
    assert isinstance(refusal, TargetNotFound)
    assert refusal.field == "files.1.executed_obs_unit_id"

    unit_id = uuid4()
    run(ObsUnitCommand.EXECUTED_OBS_UNIT_START, id=unit_id, obs_unit_id="OU-1",
        instrument="HARPS", start_time=NIGHT)
    (file_id,) = run(REGISTER, **file_fields("b.fits", executed_obs_unit_id=unit_id)).ids
    assert run.load(RawDataFile, file_id).executed_obs_unit_id == unit_id


def test_a_file_registered_twice_collides_in_the_store(run: CommandRunner,
                                                        store: EventStore) -> None:
    """A name per instrument is one id: the second registration's first event collides (the
    dispatcher answers it as a conflict), and nothing of that command is saved."""
    registered(run, "a.fits")
    with pytest.raises(IntegrityError):
        run(BULK, files=[file_fields("new.fits"), file_fields("a.fits", size=7)])
    assert store.max_position() == 1
    assert not store.exists(raw_data_file_id("HARPS", "new.fits"))
    assert run.load(RawDataFile, raw_data_file_id("HARPS", "a.fits")).size == 100


def test_the_same_name_on_another_instrument_is_another_file(run: CommandRunner) -> None:
    a = run(REGISTER, **file_fields("a.fits", instrument="HARPS")).ids
    b = run(REGISTER, **file_fields("a.fits", instrument="ESPRESSO")).ids
    assert a != b


def test_a_file_registered_twice_in_one_batch_is_a_duplicate(run: CommandRunner,
                                                              store: EventStore) -> None:
    spec = COMMANDS[REGISTER]
    uow = UnitOfWork(store)
    command = spec.model.model_validate(file_fields("a.fits"))
    spec.handle(command, uow, run.provenance(), run.policy)
    with pytest.raises(DuplicateEntity):
        spec.handle(command, uow, run.provenance(), run.policy)


def test_create_a_package_of_registered_and_new_files(run: CommandRunner) -> None:
    old = registered(run, "old.fits", size=300)
    package_id = uuid4()
    applied = run(CREATE, id=package_id, name="HARPS-2026-11-21", file_ids=old,
                  files=[file_fields("new.fits", size=200)])
    new = raw_data_file_id("HARPS", "new.fits")
    assert applied.ids == [package_id, *old, new]
    assert sorted(applied.names) == sorted([
        "RawDataFile.Registered", "RawDataPackage.Created", "RawDataFile.AssignedToPackage"])
    package = run.load(RawDataPackage, package_id)
    assert (package.status, package.total_size, package.name) == ("building", 500,
                                                                  "HARPS-2026-11-21")
    assert package.file_ids == [*old, new]
    assert run.load(RawDataFile, old[0]).package_id == package_id
    assert run.load(RawDataFile, new).package_id == package_id
    assert run.history(old[0]) == ["Registered", "AssignedToPackage"]
    assert run.history(new) == ["Registered"]  # registered into the package


def test_add_files_then_finalize(run: CommandRunner) -> None:
    first, second, third = registered(run, "1.fits", "2.fits", "3.fits")
    package_id = uuid4()
    run(CREATE, id=package_id, name="P", file_ids=[first])
    applied = run(ADD, id=package_id, file_ids=[second, third, first])
    assert applied.names == ["RawDataPackage.FilesAdded", "RawDataFile.AssignedToPackage",
                             "RawDataFile.AssignedToPackage"]
    assert applied.ids == [package_id, second, third, first]
    assert run(FINALIZE, id=package_id).names == ["RawDataPackage.Finalized"]
    package = run.load(RawDataPackage, package_id)
    assert (package.status, package.total_size) == ("complete", 300)
    assert package.file_ids == [first, second, third]
    assert package.finalized_at is not None
    assert run.history(package_id) == ["Created", "FilesAdded", "Finalized"]


def test_a_complete_package_takes_no_more_files(run: CommandRunner) -> None:
    first, second = registered(run, "1.fits", "2.fits")
    package_id = uuid4()
    run(CREATE, id=package_id, name="P", file_ids=[first])
    run(FINALIZE, id=package_id)
    assert isinstance(run.refused(ADD, id=package_id, file_ids=[second]), IllegalTransition)
    assert isinstance(run.refused(FINALIZE, id=package_id), IllegalTransition)
    assert run.load(RawDataFile, second).package_id is None


def test_a_file_belongs_to_one_package(run: CommandRunner) -> None:
    (f,) = registered(run, "1.fits")
    run(CREATE, id=uuid4(), name="P", file_ids=[f])
    refusal = run.refused(CREATE, id=uuid4(), name="Q", file_ids=[f])
    assert isinstance(refusal, IllegalTransition) and refusal.field == "file_ids"


def test_an_empty_package_cannot_be_finalized(run: CommandRunner) -> None:
    package_id = uuid4()
    run(CREATE, id=package_id, name="empty")
    refusal = run.refused(FINALIZE, id=package_id)
    assert isinstance(refusal, InvalidCommand)
    assert run.load(RawDataPackage, package_id).status == "building"


def test_the_size_limit_holds_at_creation_and_when_adding(run: CommandRunner) -> None:
    half = PACKAGE_LIMIT // 2
    a, b, c = registered(run, "a.fits", "b.fits", "c.fits", size=half)
    refusal = run.refused(CREATE, id=uuid4(), name="too big", file_ids=[a, b, c])
    assert isinstance(refusal, LimitExceeded) and refusal.field == "total_size"

    package_id = uuid4()
    run(CREATE, id=package_id, name="exactly full", file_ids=[a, b])  # == the limit: allowed
    assert isinstance(run.refused(ADD, id=package_id, file_ids=[c]), LimitExceeded)
    package = run.load(RawDataPackage, package_id)
    assert package.total_size == PACKAGE_LIMIT and package.file_ids == [a, b]
    assert run.load(RawDataFile, c).package_id is None


def test_a_lower_limit_refuses_finalizing_an_oversized_package(run: CommandRunner) -> None:
    """The limit is the policy's at the time of each command (a configuration change)."""
    a, b = registered(run, "a.fits", "b.fits", size=400)
    package_id = uuid4()
    run(CREATE, id=package_id, name="P", file_ids=[a, b])
    run.policy = replace(run.policy, package_size_limit=500)
    assert isinstance(run.refused(FINALIZE, id=package_id), LimitExceeded)


def test_adding_an_unknown_file_names_its_index(run: CommandRunner) -> None:
    (a,) = registered(run, "a.fits")
    package_id = uuid4()
    run(CREATE, id=package_id, name="P", file_ids=[a])
    refusal = run.refused(ADD, id=package_id, file_ids=[a, uuid4()])
    assert isinstance(refusal, TargetNotFound) and refusal.field == "file_ids.1"


def test_a_package_of_an_executed_obs_unit_refuses_another_units_files(
        run: CommandRunner) -> None:
    units = [uuid4(), uuid4()]
    for u in units:
        run(ObsUnitCommand.EXECUTED_OBS_UNIT_START, id=u, obs_unit_id="OU", instrument="HARPS",
            start_time=NIGHT)
    (other,) = run(REGISTER, **file_fields("x.fits", executed_obs_unit_id=units[1])).ids
    refusal = run.refused(CREATE, id=uuid4(), name="P", executed_obs_unit_id=units[0],
                          file_ids=[other])
    assert isinstance(refusal, InvalidCommand)
