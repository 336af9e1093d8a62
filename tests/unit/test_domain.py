"""Pure domain unit tests: aggregates, their rules and their events (no I/O)."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from uuid import UUID, uuid4

import pytest
from eventsourcing.application import Application
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from domain.errors import (
    DomainRejection,
    DuplicateEntity,
    IllegalTransition,
    InvalidCommand,
    LimitExceeded,
    TargetNotFound,
)
from domain.obs_units import ALLOWED_TRANSITIONS as EXEC_TRANSITIONS
from domain.obs_units import ExecutedObsUnit, ExecutionStatus
from domain.provenance import Provenance, utc
from domain.raw_data import (
    DEFAULT_PACKAGE_SIZE_LIMIT,
    RAW_DATA_FILE_NAMESPACE,
    PackageStatus,
    RawDataFile,
    RawDataPackage,
    raw_data_file_id,
)
from domain.receipts import CommandReceipt, receipt_id
from domain.staging import ALLOWED_TRANSITIONS as STAGING_TRANSITIONS
from domain.staging import StagingRequest, StagingStatus

T0 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)
_counter = itertools.count()


def prov(command_id: str | None = None, actor: str = "night-script",
         observed_at: datetime | None = T0) -> Provenance:
    return Provenance(actor=actor, command_id=command_id or f"cmd-{next(_counter)}",
                      correlation_id="corr-1", observed_at=observed_at)


def start_unit(start: datetime = T0, **kw: Any) -> ExecutedObsUnit:
    return ExecutedObsUnit.start(uuid4(), kw.get("obs_unit_id", "OU-1"),
                                 kw.get("instrument", "HARPS"), start,
                                 kw.get("metadata", {"airmass": 1.1}), prov())


def unit_in(status: ExecutionStatus) -> ExecutedObsUnit:
    unit = start_unit()
    if status is not ExecutionStatus.RUNNING:
        unit.finish(status.value, T0 + timedelta(hours=1), {}, prov())
    return unit


def make_file(name: str = "f1.fits", size: int = 100, instrument: str = "HARPS",
              executed_obs_unit_id: UUID | None = None,
              package_id: UUID | None = None) -> RawDataFile:
    return RawDataFile.register(
        name=name, instrument=instrument, relative_path=f"night/{name}", size=size,
        checksum_algorithm="md5", checksum_value="0" * 32,
        executed_obs_unit_id=executed_obs_unit_id, file_type="raw_science", created_at=T0,
        package_id=package_id, provenance=prov())


def make_package(files: list[RawDataFile], limit: int = DEFAULT_PACKAGE_SIZE_LIMIT,
                 executed_obs_unit_id: UUID | None = None) -> RawDataPackage:
    return RawDataPackage.create(package_id=uuid4(), name="pkg", executed_obs_unit_id=
                                 executed_obs_unit_id, files=files, size_limit=limit,
                                 provenance=prov())


def complete_package(sizes: tuple[int, ...] = (100, 200)) -> RawDataPackage:
    files = [make_file(f"c{next(_counter)}.fits", s) for s in sizes]
    pkg = make_package(files)
    pkg.finalize(DEFAULT_PACKAGE_SIZE_LIMIT, prov())
    return pkg


def staging_in(status: StagingStatus, sizes: tuple[int, ...] = (100, 200)) -> StagingRequest:
    req = StagingRequest.request(staging_id=uuid4(), packages=[complete_package(sizes)],
                                 destination="archive:/stage", provenance=prov())
    if status is StagingStatus.IN_PROGRESS:
        req.report_progress("in_progress", 10, 0, None, prov())
    elif status is StagingStatus.COMPLETED:
        req.report_progress("completed", req.bytes_total, req.files_total, None, prov())
    elif status is StagingStatus.FAILED:
        req.report_progress("failed", 10, 0, "disk full", prov())
    elif status is StagingStatus.CANCELLED:
        req.cancel("not needed", prov())
    assert req.status == status.value
    return req


def replay(events: Iterable[Any]) -> Any:
    agg = None
    for e in events:
        agg = e.mutate(agg)
    return agg


# -- executed obs units ----------------------------------------------------------------------
@pytest.mark.parametrize(("current", "target"),
                         list(itertools.product(ExecutionStatus, ExecutionStatus)))
def test_execution_transition_map(current: ExecutionStatus, target: ExecutionStatus) -> None:
    unit = unit_in(current)
    unit.collect_events()
    version = unit.version
    end = T0 + timedelta(hours=2)
    if target in EXEC_TRANSITIONS[current]:
        unit.finish(target.value, end, {"exposures": 3}, prov())
        assert unit.status == target.value
        assert unit.end_time == end
        assert unit.version == version + 1
        [ev] = unit.collect_events()
        assert type(ev).__qualname__ == "ExecutedObsUnit.Finished"
    else:
        with pytest.raises(IllegalTransition) as exc:
            unit.finish(target.value, end, {}, prov())
        assert exc.value.code == "conflict"
        assert exc.value.field == "status"
        assert unit.status == current.value
        assert unit.version == version
        assert unit.collect_events() == []


def test_transition_map_shape() -> None:
    assert set(EXEC_TRANSITIONS) == set(ExecutionStatus)
    finals = {s for s, exits in EXEC_TRANSITIONS.items() if not exits}
    assert finals == {ExecutionStatus.SUCCESS, ExecutionStatus.FAILED, ExecutionStatus.ABORTED}
    assert set(STAGING_TRANSITIONS) == set(StagingStatus)
    assert {s for s, exits in STAGING_TRANSITIONS.items() if not exits} == {
        StagingStatus.COMPLETED, StagingStatus.FAILED, StagingStatus.CANCELLED}


def test_finishing_twice_is_refused() -> None:
    unit = start_unit()
    unit.finish("success", T0 + timedelta(minutes=5), {}, prov())
    with pytest.raises(IllegalTransition, match="success"):
        unit.finish("success", T0 + timedelta(minutes=6), {}, prov())
    with pytest.raises(IllegalTransition):
        unit.finish("aborted", T0 + timedelta(minutes=6), {}, prov())
    assert unit.status == "success"
    assert unit.end_time == T0 + timedelta(minutes=5)


def test_end_before_start_is_refused() -> None:
    unit = start_unit()
    version = unit.version
    with pytest.raises(IllegalTransition) as exc:  # a conflict with the recorded start
        unit.finish("success", T0 - timedelta(seconds=1), {}, prov())
    assert exc.value.field == "end_time"
    assert exc.value.code == "conflict"
    assert unit.status == "running" and unit.end_time is None and unit.version == version
    unit.finish("success", T0, {}, prov())  # end == start is fine
    assert unit.status == "success"


def test_times_are_normalised_to_utc() -> None:
    naive = datetime(2026, 1, 1, 12, 0)
    unit = start_unit(start=naive)
    assert unit.start_time == datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    chile = timezone(timedelta(hours=-3))
    unit.finish("failed", datetime(2026, 1, 1, 10, 0, tzinfo=chile), {}, prov())
    assert unit.end_time == datetime(2026, 1, 1, 13, 0, tzinfo=UTC)
    assert unit.end_time.tzinfo == UTC
    assert utc(naive).tzinfo is UTC


def test_finish_merges_metadata_and_records_actors() -> None:
    unit = start_unit(metadata={"airmass": 1.1, "seeing": 0.9})
    unit.finish("success", T0 + timedelta(hours=1), {"seeing": 0.7, "exposures": 12},
                prov(actor="closer"))
    assert unit.metadata == {"airmass": 1.1, "seeing": 0.7, "exposures": 12}
    assert unit.started_by == "night-script"
    assert unit.finished_by == "closer"


def test_events_carry_provenance() -> None:
    observed = T0 + timedelta(minutes=3)
    p = Provenance(actor="robot", command_id="cmd-xyz", correlation_id="corr-abc",
                   observed_at=observed)
    unit = ExecutedObsUnit.start(uuid4(), "OU-9", "ESPRESSO", T0, {}, p)
    unit.finish("success", T0 + timedelta(hours=1), {}, p)
    f = RawDataFile.register(name="a.fits", instrument="ESPRESSO", relative_path="a.fits",
                             size=5, checksum_algorithm="md5", checksum_value="0" * 32,
                             executed_obs_unit_id=unit.id, file_type="raw", created_at=T0,
                             package_id=None, provenance=p)
    f2 = make_file("b.fits", 6, instrument="ESPRESSO")
    f2.collect_events()
    pkg = RawDataPackage.create(package_id=uuid4(), name="p", executed_obs_unit_id=unit.id,
                                files=[f], size_limit=100, provenance=p)
    pkg.add_files([f2], 100, p)
    pkg.finalize(100, p)
    req = StagingRequest.request(staging_id=uuid4(), packages=[pkg], destination="d",
                                 provenance=p)
    req.report_progress("in_progress", 1, 0, "started", p)
    req.cancel("stop", p)
    receipt = CommandReceipt.record("x.y", ["a"], p)
    events: list[Any] = [*unit.collect_events(), *f.collect_events(), *f2.collect_events(),
              *pkg.collect_events(), *req.collect_events(), *receipt.collect_events()]
    names = {type(e).__qualname__ for e in events}
    assert names == {
        "ExecutedObsUnit.Started", "ExecutedObsUnit.Finished", "RawDataFile.Registered",
        "RawDataFile.AssignedToPackage", "RawDataPackage.Created",
        "RawDataPackage.FilesAdded", "RawDataPackage.Finalized", "StagingRequest.Requested",
        "StagingRequest.ProgressReported", "StagingRequest.Cancelled",
        "CommandReceipt.Recorded"}
    for e in events:
        assert e.actor == "robot", e
        assert e.command_id == "cmd-xyz", e
        assert e.correlation_id == "corr-abc", e
        assert e.observed_at == observed, e


def test_provenance_event_fields() -> None:
    p = Provenance("a", "c", "k")
    assert p.event_fields() == {"actor": "a", "command_id": "c", "correlation_id": "k",
                                "observed_at": None}


# -- raw data files --------------------------------------------------------------------------
def test_raw_data_file_id_is_deterministic() -> None:
    a = raw_data_file_id("HARPS", "x.fits")
    assert a == raw_data_file_id("HARPS", "x.fits")
    assert isinstance(a, UUID) and a.version == 5
    assert a != raw_data_file_id("ESPRESSO", "x.fits")
    assert a != raw_data_file_id("HARPS", "y.fits")
    # the separator keeps (instrument, name) pairs apart that concatenate alike
    assert raw_data_file_id("AB", "C") != raw_data_file_id("A", "BC")
    # a stable, documented value: clients compute it on their side
    from uuid import uuid5
    assert a == uuid5(RAW_DATA_FILE_NAMESPACE, "HARPS\x00x.fits")
    assert make_file("x.fits").id == a


def test_register_refuses_negative_size() -> None:
    with pytest.raises(InvalidCommand) as exc:
        make_file(size=-1)
    assert exc.value.field == "size"
    assert make_file(size=0).size == 0


# -- raw data packages -----------------------------------------------------------------------
def test_package_create_groups_files() -> None:
    unit = start_unit()
    files = [make_file("a", 10, executed_obs_unit_id=unit.id), make_file("b", 20)]
    pkg = make_package(files, executed_obs_unit_id=unit.id)
    assert pkg.status == PackageStatus.BUILDING.value
    assert pkg.total_size == 30 and pkg.file_ids == [f.id for f in files]
    assert all(f.package_id == pkg.id for f in files)


@pytest.mark.parametrize(("limit", "ok"), [(299, False), (300, True), (301, True)])
def test_package_size_limit_at_create(limit: int, ok: bool) -> None:
    files = [make_file("a", 100), make_file("b", 200)]
    for f in files:
        f.collect_events()
    if ok:
        assert make_package(files, limit=limit).total_size == 300
        return
    with pytest.raises(LimitExceeded) as exc:
        make_package(files, limit=limit)
    assert exc.value.code == "limit_exceeded" and exc.value.field == "total_size"
    assert "300" in exc.value.message and str(limit) in exc.value.message
    assert all(f.package_id is None and f.collect_events() == [] for f in files)


def test_package_size_limit_at_add() -> None:
    pkg = make_package([make_file("a", 100)], limit=250)
    pkg.collect_events()
    big, small = make_file("big", 151), make_file("small", 150)
    version = pkg.version
    with pytest.raises(LimitExceeded):
        pkg.add_files([big], 250, prov())
    assert pkg.total_size == 100 and pkg.version == version and big.package_id is None
    assert pkg.collect_events() == []
    pkg.add_files([small], 250, prov())
    assert pkg.total_size == 250 and pkg.file_ids[-1] == small.id
    assert small.package_id == pkg.id


def test_package_size_limit_at_finalize() -> None:
    pkg = make_package([make_file("a", 100), make_file("b", 100)], limit=1000)
    version = pkg.version
    with pytest.raises(LimitExceeded):
        pkg.finalize(199, prov())  # the limit was lowered meanwhile
    assert pkg.status == "building" and pkg.version == version
    assert pkg.finalized_at is None
    pkg.finalize(200, prov())
    assert pkg.status == "complete"
    events = pkg.collect_events()
    finalized = events[-1]
    assert type(finalized).__qualname__ == "RawDataPackage.Finalized"
    assert pkg.finalized_at == finalized.timestamp  # as the read model shows it
    assert replay(events).finalized_at == finalized.timestamp


def test_empty_package_cannot_be_finalized() -> None:
    pkg = make_package([])
    with pytest.raises(InvalidCommand):
        pkg.finalize(10, prov())
    assert pkg.status == "building"


def test_complete_package_is_frozen() -> None:
    pkg = make_package([make_file("a", 1)])
    pkg.finalize(10, prov())
    with pytest.raises(IllegalTransition):
        pkg.finalize(10, prov())
    with pytest.raises(IllegalTransition):
        pkg.add_files([make_file("b", 1)], 10, prov())
    assert len(pkg.file_ids) == 1


def test_file_already_in_another_package() -> None:
    f = make_file("a", 1)
    first = make_package([f])
    with pytest.raises(IllegalTransition, match="already belongs"):
        make_package([f])
    other = make_package([make_file("b", 1)])
    other.collect_events()
    with pytest.raises(IllegalTransition) as exc:
        other.add_files([f], 10, prov())
    assert exc.value.field == "file_ids"
    assert f.package_id == first.id
    assert other.collect_events() == [] and len(other.file_ids) == 1
    with pytest.raises(IllegalTransition):
        f.assign_to_package(other.id, prov())


def test_file_registered_into_a_package_belongs_to_it() -> None:
    pid = uuid4()
    f = make_file("a", 1, package_id=pid)
    pkg = RawDataPackage.create(package_id=pid, name="p", executed_obs_unit_id=None,
                                files=[f], size_limit=10, provenance=prov())
    assert pkg.file_ids == [f.id]
    assert [type(e).__qualname__ for e in f.collect_events()] == ["RawDataFile.Registered"]


def test_file_of_another_executed_obs_unit() -> None:
    u1, u2 = start_unit(), start_unit()
    f = make_file("a", 1, executed_obs_unit_id=u1.id)
    with pytest.raises(InvalidCommand, match=str(u1.id)):
        make_package([f], executed_obs_unit_id=u2.id)
    pkg = make_package([make_file("b", 1, executed_obs_unit_id=u2.id)],
                       executed_obs_unit_id=u2.id)
    with pytest.raises(InvalidCommand):
        pkg.add_files([f], 10, prov())
    assert f.package_id is None
    # a package without an execution takes files of any execution
    assert make_package([f]).executed_obs_unit_id is None


def test_adding_files_already_in_the_package_is_a_no_op() -> None:
    f = make_file("a", 5)
    pkg = make_package([f])
    pkg.collect_events()
    f.collect_events()
    pkg.add_files([f], 100, prov())
    assert pkg.collect_events() == [] and f.collect_events() == []
    assert pkg.total_size == 5 and pkg.file_ids == [f.id]


def test_adding_the_same_file_twice_in_one_command_counts_it_once() -> None:
    pkg = make_package([make_file("a", 5)])
    g = make_file("g", 7)
    pkg.add_files([g, g], 100, prov())
    assert pkg.file_ids.count(g.id) == 1
    assert pkg.total_size == 12


# -- staging ---------------------------------------------------------------------------------
def test_only_complete_packages_can_be_staged() -> None:
    building = make_package([make_file("a", 1)])
    with pytest.raises(IllegalTransition) as exc:
        StagingRequest.request(staging_id=uuid4(), packages=[complete_package(), building],
                               destination="d", provenance=prov())
    assert exc.value.field == "package_ids"
    p1, p2 = complete_package((1, 2)), complete_package((3,))
    req = StagingRequest.request(staging_id=uuid4(), packages=[p1, p2], destination="d",
                                 provenance=prov())
    assert req.status == "pending"
    assert (req.bytes_total, req.files_total) == (6, 3)
    assert req.package_ids == [p1.id, p2.id]


@pytest.mark.parametrize(("current", "target"),
                         list(itertools.product(StagingStatus, StagingStatus)))
def test_staging_transition_map(current: StagingStatus, target: StagingStatus) -> None:
    req = staging_in(current)
    req.collect_events()
    before = (req.status, req.bytes_transferred, req.files_transferred, req.version)
    allowed = target in STAGING_TRANSITIONS[current]
    if target is StagingStatus.CANCELLED:
        if allowed:
            req.cancel("r", prov())
            assert req.status == "cancelled" and req.message == "r"
        else:
            with pytest.raises(IllegalTransition):
                req.cancel("r", prov())
        return
    if allowed:
        req.report_progress(target.value, 20, 1, None, prov())
        assert (req.status, req.bytes_transferred, req.files_transferred) == (
            target.value, 20, 1)
        assert req.version == before[3] + 1
    else:
        with pytest.raises(IllegalTransition):
            req.report_progress(target.value, 20, 1, None, prov())
        assert (req.status, req.bytes_transferred, req.files_transferred,
                req.version) == before
        assert req.collect_events() == []


def test_progress_cannot_go_backwards() -> None:
    req = staging_in(StagingStatus.PENDING)
    req.report_progress("in_progress", 100, 1, None, prov())
    version = req.version
    with pytest.raises(InvalidCommand, match="backwards"):
        req.report_progress("in_progress", 99, 1, None, prov())
    with pytest.raises(InvalidCommand, match="backwards"):
        req.report_progress("completed", 300, 0, None, prov())
    assert (req.bytes_transferred, req.files_transferred, req.version) == (100, 1, version)
    req.report_progress("in_progress", 100, 1, "same again", prov())  # repeating is fine
    assert req.message == "same again"


def test_progress_cannot_exceed_totals() -> None:
    req = staging_in(StagingStatus.PENDING, sizes=(100, 200))
    with pytest.raises(InvalidCommand, match="exceeds"):
        req.report_progress("in_progress", 301, 0, None, prov())
    with pytest.raises(InvalidCommand, match="exceeds"):
        req.report_progress("in_progress", 0, 3, None, prov())
    req.report_progress("completed", 300, 2, None, prov())
    assert req.status == "completed"


def test_cancel_is_not_a_progress_status() -> None:
    req = staging_in(StagingStatus.PENDING)
    with pytest.raises(InvalidCommand):
        req.report_progress("cancelled", 0, 0, None, prov())
    assert req.status == "pending"


def test_cancel_not_possible_once_completed() -> None:
    req = staging_in(StagingStatus.COMPLETED)
    with pytest.raises(IllegalTransition, match="completed"):
        req.cancel("too late", prov())
    assert req.status == "completed"
    req2 = staging_in(StagingStatus.IN_PROGRESS)
    req2.cancel("stop", prov())
    assert req2.status == "cancelled"
    with pytest.raises(IllegalTransition):
        req2.cancel("again", prov())


# -- errors and receipts ---------------------------------------------------------------------
def test_rejection_codes() -> None:
    assert {c.code for c in (TargetNotFound, IllegalTransition, DuplicateEntity, LimitExceeded,
                             InvalidCommand, DomainRejection)} == {
        "not_found", "conflict", "limit_exceeded", "invalid", "rejected"}
    assert TargetNotFound.code == "not_found" and DuplicateEntity.code == "conflict"
    e = LimitExceeded("too big", field="total_size")
    assert isinstance(e, DomainRejection) and str(e) == "too big" and e.field == "total_size"


def test_receipt_id_is_deterministic() -> None:
    assert receipt_id("c1") == receipt_id("c1") != receipt_id("c2")
    r = CommandReceipt.record("executed_obs_unit.start", ["x"], prov("c1"))
    assert r.id == receipt_id("c1") and r.entity_ids == ["x"]


def test_replaying_events_reconstructs_aggregates() -> None:
    f = make_file("a", 3)
    pkg = make_package([f], limit=10)
    pkg.add_files([make_file("b", 4)], 10, prov())
    pkg.finalize(10, prov())
    pkg_events = pkg.collect_events()
    assert replay(pkg_events) == pkg
    assert replay(f.collect_events()) == f


# -- property-based: the state machines ------------------------------------------------------
class _Machine(RuleBasedStateMachine):
    """Collects every event; a popo Application stores them, to check reconstruction too."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []
        self.app: Application[UUID] = Application(env={"PERSISTENCE_MODULE":
                                                       "eventsourcing.popo"})
        self.agg: Any = None

    def collect(self) -> None:
        new = list(self.agg.collect_events())
        if new:
            self.app.save(*new)
        self.events.extend(new)

    def refused(self, expected: type[DomainRejection] | None, action: Any) -> None:
        """Run ``action``; if ``expected`` it must raise exactly that and change nothing."""
        before = dict(self.agg.__dict__)
        version = self.agg.version
        if expected is None:
            action()
            assert self.agg.version == version + 1
            self.collect()
            return
        try:
            action()
        except DomainRejection as e:
            assert type(e) is expected, (type(e), expected, e)
        else:
            raise AssertionError(f"expected {expected.__name__}")
        assert self.agg.version == version
        assert self.agg.__dict__ == before
        assert self.agg.collect_events() == []

    @invariant()
    def replay_reconstructs(self) -> None:
        if self.agg is None:
            return
        assert replay(self.events) == self.agg
        assert self.app.repository.get(self.agg.id) == self.agg
        assert self.agg.version == len(self.events)


class ExecutedObsUnitMachine(_Machine):
    @initialize(start=st.datetimes(min_value=datetime(2020, 1, 1),
                                   max_value=datetime(2030, 1, 1), timezones=st.just(UTC)))
    def start(self, start: datetime) -> None:
        self.agg = ExecutedObsUnit.start(uuid4(), "OU-1", "HARPS", start, {"n": 0}, prov())
        self.model = ExecutionStatus.RUNNING
        self.start_time = start
        self.collect()

    @rule(status=st.sampled_from(list(ExecutionStatus)),
          offset=st.integers(min_value=-3600, max_value=3600),
          meta=st.dictionaries(st.sampled_from("abc"), st.integers(), max_size=2))
    def finish(self, status: ExecutionStatus, offset: int, meta: dict[str, int]) -> None:
        target = status
        end = self.start_time + timedelta(seconds=offset)
        expected: type[DomainRejection] | None = None
        if target not in EXEC_TRANSITIONS[self.model] or end < self.start_time:
            expected = IllegalTransition
        self.refused(expected, lambda: self.agg.finish(target.value, end, meta, prov()))
        if expected is None:
            self.model = target
            assert self.agg.end_time == end

    @invariant()
    def status_matches_model(self) -> None:
        assert self.agg.status == self.model.value


class StagingRequestMachine(_Machine):
    @initialize(sizes=st.lists(st.integers(min_value=0, max_value=1000), min_size=1,
                               max_size=4))
    def request(self, sizes: list[int]) -> None:
        pkg = complete_package(tuple(sizes))
        self.agg = StagingRequest.request(staging_id=uuid4(), packages=[pkg],
                                          destination="d", provenance=prov())
        self.model = StagingStatus.PENDING
        self.bytes = self.files = 0
        self.collect()

    @rule(status=st.sampled_from(list(StagingStatus)), data=st.data())
    def report(self, status: StagingStatus, data: st.DataObject) -> None:
        target = status
        b = data.draw(st.integers(min_value=0, max_value=self.agg.bytes_total + 2), "bytes")
        f = data.draw(st.integers(min_value=0, max_value=self.agg.files_total + 1), "files")
        expected: type[DomainRejection] | None = None
        if target not in STAGING_TRANSITIONS[self.model]:
            expected = IllegalTransition
        elif target is StagingStatus.CANCELLED or b < self.bytes or f < self.files or (
                b > self.agg.bytes_total or f > self.agg.files_total):
            expected = InvalidCommand
        self.refused(expected, lambda: self.agg.report_progress(target.value, b, f, "m",
                                                                prov()))
        if expected is None:
            self.model, self.bytes, self.files = target, b, f

    @rule(reason=st.one_of(st.none(), st.text(max_size=5)))
    def cancel(self, reason: str | None) -> None:
        allowed = StagingStatus.CANCELLED in STAGING_TRANSITIONS[self.model]
        self.refused(None if allowed else IllegalTransition,
                     lambda: self.agg.cancel(reason, prov()))
        if allowed:
            self.model = StagingStatus.CANCELLED
            assert self.agg.message == reason

    @invariant()
    def status_matches_model(self) -> None:
        assert self.agg.status == self.model.value
        assert (self.agg.bytes_transferred, self.agg.files_transferred) == (self.bytes,
                                                                            self.files)
        assert 0 <= self.agg.bytes_transferred <= self.agg.bytes_total


_machine_settings = settings(max_examples=60, stateful_step_count=12, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
TestExecutedObsUnitMachine = ExecutedObsUnitMachine.TestCase
TestExecutedObsUnitMachine.settings = _machine_settings
TestStagingRequestMachine = StagingRequestMachine.TestCase
TestStagingRequestMachine.settings = _machine_settings


def test_registration_is_the_event_eventsourcing_makes_for_a_new_file() -> None:
    """The dispatcher registers files by their creation event (no aggregate built); it must be
    the very event that constructing the aggregate makes, and rebuild the same file."""
    fields: dict[str, Any] = dict(
        name="r.fits", instrument="NIRPS", relative_path="night/r.fits", size=42,
        checksum_algorithm="sha256", checksum_value="a" * 64,
        executed_obs_unit_id=uuid4(), file_type="raw_science", package_id=uuid4())
    p = prov()
    made = RawDataFile.registration(**fields, created_at=T0, provenance=p)
    constructed = RawDataFile(id=raw_data_file_id("NIRPS", "r.fits"), **fields,
                              created_at=T0, **p.event_fields())
    [built] = constructed.collect_events()
    assert type(made) is type(built)
    ours, theirs = dict(vars(made)), dict(vars(built))
    assert ours.pop("timestamp") <= theirs.pop("timestamp")
    assert ours == theirs
    rebuilt = made.mutate(None)
    assert isinstance(rebuilt, RawDataFile)
    assert (rebuilt.id, rebuilt.version, rebuilt.size, rebuilt.package_id) == (
        constructed.id, constructed.version, 42, fields["package_id"])
    registered = RawDataFile.register(**fields, created_at=T0, provenance=prov())
    assert len(registered.collect_events()) == 1
