"""Observation results, pure domain: fulfillment transitions, the data-product lifecycle and
its debounce, and property-based sequences of commands that must keep the invariants."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID, uuid4

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import initialize, invariant, precondition, rule

from domain.errors import DomainRejection, IllegalTransition, InvalidCommand
from domain.results import (
    FULFILLMENT_TRANSITIONS,
    OUTCOME_TARGET,
    CopiesMode,
    Fulfillment,
    ObservationResult,
    ProductStatus,
    RunEnd,
    TaskOutcome,
    observation_result_id,
)
from tests.unit.test_domain import _Machine, prov, replay

T0 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)
DEBOUNCE = timedelta(seconds=30)
RETRY_BASE = timedelta(seconds=10)
RETRY_LIMIT = 3


def result(not_before: datetime | None = None, copy_index: int = 0) -> ObservationResult:
    return ObservationResult.materialize(7, 42, 0, 1, copy_index, "HARPS", CopiesMode.SINGLE,
                                         not_before, {"exptime": 600}, prov())


def check_invariants(r: ObservationResult) -> None:
    """The issue's invariants, and the ones the lifecycle relies on."""
    assert r.last_built_revision is None or r.last_built_revision <= r.assets_revision
    if r.data_product_status == ProductStatus.READY:
        assert not r.dirty and r.last_built_revision == r.assets_revision
    running = [k for k, run in r.runs.items() if run["status"] == "running"]
    assert len(running) <= 1, "at most one run in progress"
    assert (r.current_processing_run_id is None) == (not running)
    assert (r.data_product_status == ProductStatus.BUILDING) == bool(running)
    assert (r.fulfilled_on is not None) == (r.fulfillment_status == Fulfillment.FULFILLED)
    assert sum(1 for t in r.tasks.values() if t["outcome"] is None) <= 1
    assert (r.open_task_id is not None) == (r.fulfillment_status == Fulfillment.DISPATCHED)
    if r.dirty:
        assert r.dirty_from_revision is not None
        assert r.last_built_revision is None or r.dirty_from_revision > r.last_built_revision


# -- identity --------------------------------------------------------------------------------
def test_ids_are_the_leaf_cell() -> None:
    a, b = result(), result()
    assert a.id == b.id == observation_result_id(7, 42, 0, 1, 0)
    assert result(copy_index=1).id != a.id
    assert len({observation_result_id(o, r, e, s, c) for o, r, e, s, c in
                itertools.product(range(3), repeat=5)}) == 3 ** 5


# -- fulfillment -----------------------------------------------------------------------------
def in_status(status: Fulfillment) -> ObservationResult:
    r = result()
    if status is Fulfillment.CANCELED:
        r.cancel("not needed", T0, prov())
    elif status is not Fulfillment.PENDING_DISPATCH:
        task = uuid4()
        r.dispatch(task, None, None, T0, prov())
        if status is not Fulfillment.DISPATCHED:
            outcome = (TaskOutcome.SUCCEEDED if status is Fulfillment.FULFILLED
                       else TaskOutcome.PARTIAL)
            r.report_task(task, outcome, T0 + timedelta(hours=1), None, prov())
    assert r.fulfillment_status == status
    return r


@pytest.mark.parametrize("current", list(Fulfillment))
def test_dispatch_follows_the_transition_map(current: Fulfillment) -> None:
    r = in_status(current)
    attempts = len(r.tasks)
    if Fulfillment.DISPATCHED in FULFILLMENT_TRANSITIONS[current]:
        r.dispatch(uuid4(), "ESPRESSO", uuid4(), T0, prov())
        assert r.fulfillment_status == Fulfillment.DISPATCHED
        assert r.tasks[str(r.open_task_id)]["attempt"] == attempts + 1
    else:
        with pytest.raises(IllegalTransition):
            r.dispatch(uuid4(), None, None, T0, prov())


@pytest.mark.parametrize(("current", "outcome"),
                         list(itertools.product([Fulfillment.DISPATCHED], TaskOutcome)))
def test_task_outcomes_drive_fulfillment(current: Fulfillment, outcome: TaskOutcome) -> None:
    r = in_status(current)
    task = UUID(str(r.open_task_id))
    done = T0 + timedelta(hours=2)
    r.report_task(task, outcome, done, None, prov())
    assert r.fulfillment_status == OUTCOME_TARGET[outcome]
    assert r.fulfilled_on == (done if outcome is TaskOutcome.SUCCEEDED else None)
    with pytest.raises(IllegalTransition):  # a task ends once
        r.report_task(task, outcome, done, None, prov())


def test_a_failed_attempt_is_retried_as_a_new_attempt() -> None:
    r = result()
    first = uuid4()
    r.dispatch(first, None, None, T0, prov())
    r.report_task(first, TaskOutcome.FAILED, T0, None, prov())
    second = uuid4()
    r.dispatch(second, "HARPS", None, T0, prov())
    assert [r.tasks[str(t)]["attempt"] for t in (first, second)] == [1, 2]
    r.report_task(second, TaskOutcome.SUCCEEDED, T0 + timedelta(hours=1), None, prov())
    assert r.fulfillment_status == Fulfillment.FULFILLED


def test_not_before_and_unknown_tasks_are_refused() -> None:
    r = result(not_before=T0 + timedelta(days=1))
    with pytest.raises(InvalidCommand, match="before"):
        r.dispatch(uuid4(), None, None, T0, prov())
    with pytest.raises(InvalidCommand, match="no task"):
        r.report_task(uuid4(), TaskOutcome.SUCCEEDED, T0, None, prov())


@pytest.mark.parametrize("current", list(Fulfillment))
def test_cancel_works_from_any_non_final_state(current: Fulfillment) -> None:
    r = in_status(current)
    open_task = r.open_task_id
    if current in (Fulfillment.FULFILLED, Fulfillment.CANCELED):
        with pytest.raises(IllegalTransition):
            r.cancel("late", T0, prov())
        return
    r.cancel("no longer needed", T0, prov())
    assert r.fulfillment_status == Fulfillment.CANCELED
    if open_task is not None:
        assert r.tasks[open_task]["outcome"] == TaskOutcome.CANCELED


# -- data products ---------------------------------------------------------------------------
def test_a_burst_of_assets_is_one_dirty_window() -> None:
    r = result()
    for i in range(100):
        assert r.contribute_asset(f"a{i}", T0 + timedelta(seconds=i), DEBOUNCE, prov())
    assert not r.contribute_asset("a5", T0, DEBOUNCE, prov())  # counted once
    assert (r.assets_revision, r.dirty_from_revision) == (100, 1)
    assert r.next_eligible_run_at == T0 + timedelta(seconds=99) + DEBOUNCE
    assert not r.due(T0 + timedelta(seconds=128))
    assert r.due(T0 + timedelta(seconds=129))


def test_a_build_that_saw_every_asset_is_ready() -> None:
    r = result()
    r.contribute_asset("a", T0, DEBOUNCE, prov())
    run = uuid4()
    r.start_run(run, T0 + DEBOUNCE, prov())
    assert r.data_product_status == ProductStatus.BUILDING and not r.due(T0 + DEBOUNCE * 9)
    outputs = [{"name": "combined.fits", "kind": "image"}]
    r.end_run(run, RunEnd.COMPLETED, outputs, None, T0 + DEBOUNCE * 2, RETRY_LIMIT,
              RETRY_BASE, prov())
    assert r.data_product_status == ProductStatus.READY
    assert (r.last_built_revision, r.dirty_from_revision, r.next_eligible_run_at) == (1, None,
                                                                                      None)
    assert r.runs[str(run)]["outputs"] == outputs
    check_invariants(r)


def test_assets_arriving_during_a_build_leave_it_stale_and_dirty() -> None:
    r = result()
    r.contribute_asset("a", T0, DEBOUNCE, prov())
    run = uuid4()
    r.start_run(run, T0 + DEBOUNCE, prov())
    r.contribute_asset("b", T0 + DEBOUNCE * 2, DEBOUNCE, prov())
    r.contribute_asset("c", T0 + DEBOUNCE * 2, DEBOUNCE, prov())
    assert r.data_product_status == ProductStatus.BUILDING
    r.end_run(run, RunEnd.COMPLETED, [], None, T0 + DEBOUNCE * 3, RETRY_LIMIT, RETRY_BASE,
              prov())
    assert r.data_product_status == ProductStatus.STALE
    assert (r.last_built_revision, r.dirty_from_revision, r.assets_revision) == (1, 2, 3)
    assert r.due(T0 + DEBOUNCE * 3)
    check_invariants(r)


def test_failed_runs_back_off_then_give_up_until_a_new_asset() -> None:
    r = result()
    r.contribute_asset("a", T0, DEBOUNCE, prov())
    now = T0 + DEBOUNCE
    waits = []
    for _ in range(RETRY_LIMIT + 1):
        assert r.due(now)
        run = uuid4()
        r.start_run(run, now, prov())
        r.end_run(run, RunEnd.FAILED, [], "bias frames missing", now, RETRY_LIMIT, RETRY_BASE,
                  prov())
        assert r.data_product_status == ProductStatus.FAILED
        if r.next_eligible_run_at is None:
            break
        waits.append(r.next_eligible_run_at - now)
        now = r.next_eligible_run_at
    assert waits == [RETRY_BASE, RETRY_BASE * 2, RETRY_BASE * 4]
    assert not r.due(now + timedelta(days=1))  # given up
    r.contribute_asset("b", now, DEBOUNCE, prov())
    assert r.due(now + DEBOUNCE) and r.failed_runs == 0


def test_blocked_and_skipped_runs() -> None:
    r = result()
    r.contribute_asset("a", T0, DEBOUNCE, prov())
    run = uuid4()
    r.start_run(run, T0 + DEBOUNCE, prov())
    with pytest.raises(InvalidCommand):
        r.end_run(run, RunEnd.BLOCKED, [{"name": "x"}], None, T0, RETRY_LIMIT, RETRY_BASE,
                  prov())
    r.end_run(run, RunEnd.BLOCKED, [], "no flat field", T0 + DEBOUNCE, RETRY_LIMIT,
              RETRY_BASE, prov())
    assert r.data_product_status == ProductStatus.BLOCKED and not r.due(T0 + timedelta(days=9))
    r.contribute_asset("flat", T0 + DEBOUNCE, DEBOUNCE, prov())  # the prerequisite arrives
    assert r.due(T0 + DEBOUNCE * 2)
    run = uuid4()
    r.start_run(run, T0 + DEBOUNCE * 2, prov())
    r.end_run(run, RunEnd.SKIPPED, [], None, T0 + DEBOUNCE * 2, RETRY_LIMIT, RETRY_BASE, prov())
    assert r.data_product_status == ProductStatus.SKIPPED and not r.dirty


def test_runs_are_refused_when_nothing_is_new_or_one_is_in_progress() -> None:
    r = result()
    with pytest.raises(IllegalTransition, match="nothing new"):
        r.start_run(uuid4(), T0, prov())
    r.contribute_asset("a", T0, DEBOUNCE, prov())
    r.start_run(uuid4(), T0, prov())
    with pytest.raises(IllegalTransition, match="in progress"):
        r.start_run(uuid4(), T0, prov())
    with pytest.raises(IllegalTransition, match="not the run in progress"):
        r.end_run(uuid4(), RunEnd.COMPLETED, [], None, T0, RETRY_LIMIT, RETRY_BASE, prov())


# -- property-based: random command sequences keep the invariants ------------------------------
class ObservationResultMachine(_Machine):
    @initialize(not_before=st.one_of(st.none(), st.integers(min_value=0, max_value=100)))
    def materialize(self, not_before: int | None) -> None:
        nb = T0 + timedelta(seconds=not_before) if not_before is not None else None
        self.agg = ObservationResult.materialize(1, 2, 0, 0, 0, None, CopiesMode.COUNT, nb,
                                                 None, prov())
        self.now = T0
        self.model = Fulfillment.PENDING_DISPATCH
        self.collect()

    def attempt(self, action: Any) -> bool:
        """Run a command: refused → nothing changed; accepted → exactly one event."""
        before, version = dict(self.agg.__dict__), self.agg.version
        try:
            action()
        except DomainRejection:
            assert self.agg.version == version and self.agg.__dict__ == before
            assert self.agg.collect_events() == []
            return False
        assert self.agg.version == version + 1
        self.collect()
        return True

    @rule(seconds=st.integers(min_value=0, max_value=120))
    def tick(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule()
    def dispatch(self) -> None:
        nb = self.agg.not_before
        expected_ok = (Fulfillment.DISPATCHED in FULFILLMENT_TRANSITIONS[self.model]
                       and (nb is None or self.now >= nb))
        ok = self.attempt(lambda: self.agg.dispatch(uuid4(), "HARPS", None, self.now, prov()))
        assert ok == expected_ok
        if ok:
            self.model = Fulfillment.DISPATCHED

    @rule(outcome=st.sampled_from(list(TaskOutcome)), known=st.booleans())
    def report(self, outcome: TaskOutcome, known: bool) -> None:
        task = self.agg.open_task_id if known else None
        task_id = UUID(task) if task else uuid4()
        ok = self.attempt(lambda: self.agg.report_task(task_id, outcome, self.now, None,
                                                       prov()))
        assert ok == (task is not None)
        if ok:
            self.model = OUTCOME_TARGET[outcome]

    @rule()
    def cancel(self) -> None:
        ok = self.attempt(lambda: self.agg.cancel("r", self.now, prov()))
        assert ok == (Fulfillment.CANCELED in FULFILLMENT_TRANSITIONS[self.model])
        if ok:
            self.model = Fulfillment.CANCELED

    @rule(asset=st.sampled_from([f"asset-{i}" for i in range(8)]))
    def contribute(self, asset: str) -> None:
        revision = self.agg.assets_revision
        new = asset not in self.agg.assets
        assert self.agg.contribute_asset(asset, self.now, DEBOUNCE, prov()) == new
        self.collect()
        assert self.agg.assets_revision == revision + new
        if new:
            assert self.agg.next_eligible_run_at == self.now + DEBOUNCE

    @rule()
    def start_run(self) -> None:
        expected = self.agg.dirty and self.agg.current_processing_run_id is None
        assert self.attempt(lambda: self.agg.start_run(uuid4(), self.now, prov())) == expected

    @precondition(lambda self: self.agg is not None and self.agg.current_processing_run_id)
    @rule(end=st.sampled_from(list(RunEnd)))
    def end_run(self, end: RunEnd) -> None:
        run = self.agg.current_processing_run_id
        revision = self.agg.runs[str(run)]["revision"]
        outputs = [{"name": "p.fits"}] if end is RunEnd.COMPLETED else []
        error = None if end is RunEnd.COMPLETED else "e"
        assert self.attempt(lambda: self.agg.end_run(run, end, outputs, error, self.now,
                                                     RETRY_LIMIT, RETRY_BASE, prov()))
        if end in (RunEnd.COMPLETED, RunEnd.SKIPPED):
            assert self.agg.last_built_revision == revision
            assert self.agg.dirty == (self.agg.assets_revision > revision)

    @invariant()
    def invariants_hold(self) -> None:
        if self.agg is not None:
            check_invariants(self.agg)
            assert self.agg.fulfillment_status == self.model.value
            assert self.agg.due(self.now) == (
                self.agg.dirty and self.agg.current_processing_run_id is None
                and self.agg.next_eligible_run_at is not None
                and self.agg.next_eligible_run_at <= self.now)


TestObservationResultMachine = ObservationResultMachine.TestCase
TestObservationResultMachine.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])


def test_replay_of_a_full_lifecycle() -> None:
    r = result()
    task, run = uuid4(), uuid4()
    r.dispatch(task, None, None, T0, prov())
    r.contribute_asset("raw-1", T0, DEBOUNCE, prov())
    r.report_task(task, TaskOutcome.SUCCEEDED, T0 + timedelta(hours=1), uuid4(), prov())
    r.start_run(run, T0 + timedelta(hours=1), prov())
    r.end_run(run, RunEnd.COMPLETED, [{"name": "c.fits", "sha256": "0" * 64}], None,
              T0 + timedelta(hours=2), RETRY_LIMIT, RETRY_BASE, prov())
    events = r.collect_events()
    assert [type(e).__qualname__ for e in events] == [
        "ObservationResult.Materialized", "ObservationResult.Dispatched",
        "ObservationResult.AssetContributed", "ObservationResult.TaskEnded",
        "ObservationResult.RunStarted", "ObservationResult.RunEnded"]
    assert replay(events) == r
