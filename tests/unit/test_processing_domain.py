"""The processing job's rules without I/O: leases with expiry (two workers racing, a killed
worker's job taken over, attempts used up), reports only from the lease holder, cooperative
cancel (a cancelled job never succeeds, so it builds no products), products and catalog; and
a hypothesis state machine over every command in any order, checked against a simple model."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import uuid4

import pytest
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from domain.errors import DomainRejection, IllegalTransition, InvalidCommand
from domain.processing import (
    JOB_TRANSITIONS,
    DataProduct,
    JobKind,
    JobStatus,
    ProcessingJob,
    ProductStatus,
    data_product_id,
)
from tests.unit.test_domain import prov

T0 = datetime(2026, 11, 30, 9, 0, tzinfo=UTC)
LEASE = timedelta(seconds=60)
INPUT = {"file_id": "1c49d49d-34d9-5c36-be8c-62dcce3da68c", "name": "saao_1.fits",
         "instrument": "SAAO", "relative_path": "night/saao_1.fits", "size": 1123200,
         "checksum_algorithm": "sha256", "checksum_value": "ab" * 32, "file_type": "science",
         "executed_obs_unit_id": None, "metadata": {}}
OUTPUT = {"kind": "combined_image", "name": "combined_image.fits", "area": "products",
          "key": "j/combined_image.fits", "uri": None, "size": 10, "sha256": "cd" * 32,
          "media_type": "application/fits", "metrics": {"nframes": 1}}


def job(kind: JobKind = JobKind.PROCESS, max_attempts: int = 3, **kw: Any) -> ProcessingJob:
    return ProcessingJob.request(
        uuid4(), kind, kw.pop("inputs", [INPUT]), kw.pop("product_ids", []), "ccd_stack",
        "1.0.0", {"sigma": 3.0}, None, None, kw.pop("catalog", False), False, False,
        max_attempts, T0, prov())


def test_two_workers_racing_exactly_one_wins() -> None:
    j = job()
    j.claim("w1", LEASE, T0, prov())
    with pytest.raises(IllegalTransition, match="leased to w1"):
        j.claim("w2", LEASE, T0 + timedelta(seconds=1), prov())
    assert j.held_by("w1", 1) and j.attempts == 1


def test_a_killed_workers_job_is_taken_over_after_its_lease_expires() -> None:
    j = job()
    j.claim("w1", LEASE, T0, prov())
    j.start_step("w1", 1, "combine", T0, prov())
    j.renew("w1", 1, LEASE, T0 + timedelta(seconds=30), prov())  # expires at T0+90 s
    with pytest.raises(IllegalTransition):
        j.claim("w2", LEASE, T0 + timedelta(seconds=89), prov())
    j.claim("w2", LEASE, T0 + timedelta(seconds=91), prov())
    names = [type(e).__name__ for e in j.collect_events()]
    assert names[-2:] == ["LeaseExpired", "LeaseAcquired"]
    assert j.held_by("w2", 2) and j.steps[0]["status"] == "interrupted"
    # the first worker, back from the dead, can no longer report or succeed
    with pytest.raises(IllegalTransition, match="no longer holds it"):
        j.succeed("w1", 1, [OUTPUT], {}, T0 + timedelta(seconds=92), prov())
    j.succeed("w2", 2, [OUTPUT], {"numpy": "2"}, T0 + timedelta(seconds=95), prov())
    assert j.status == JobStatus.SUCCEEDED and j.lease_worker is None


def test_attempts_used_up_fail_the_job_with_a_reason() -> None:
    j = job(max_attempts=2)
    j.claim("w1", LEASE, T0, prov())
    j.claim("w2", LEASE, T0 + 2 * LEASE, prov())
    j.claim("w3", LEASE, T0 + 4 * LEASE, prov())
    assert j.status == JobStatus.FAILED and "gave up after 2 attempts" in (j.reason or "")


def test_a_retryable_failure_releases_the_job_until_attempts_run_out() -> None:
    j = job(max_attempts=2)
    j.claim("w1", LEASE, T0, prov())
    j.fail("w1", 1, "object store down", True, T0, prov())
    assert j.status == JobStatus.REQUESTED and j.reason == "object store down"
    j.claim("w1", LEASE, T0, prov())
    j.fail("w1", 2, "object store down", True, T0, prov())
    assert j.status == JobStatus.FAILED


def test_cancel_is_cooperative_and_a_cancelled_job_cannot_succeed() -> None:
    waiting = job()
    waiting.request_cancel("not needed", T0, prov())
    assert waiting.status == JobStatus.CANCELLED  # nobody held it: at once
    j = job()
    j.claim("w1", LEASE, T0, prov())
    j.request_cancel(None, T0, prov())
    assert j.status == JobStatus.RUNNING and j.cancel_requested
    with pytest.raises(IllegalTransition, match="cancel requested"):
        j.succeed("w1", 1, [OUTPUT], {}, T0, prov())
    j.confirm_cancel("w1", 1, T0, prov())
    assert j.status == JobStatus.CANCELLED
    with pytest.raises(IllegalTransition, match="cannot be cancelled"):
        j.request_cancel(None, T0, prov())
    with pytest.raises(IllegalTransition):
        DataProduct.build(j, OUTPUT, T0, prov())


def test_a_cancelled_job_whose_worker_died_is_cancelled_by_the_next_claim() -> None:
    j = job()
    j.claim("w1", LEASE, T0, prov())
    j.request_cancel("stop", T0, prov())
    j.claim("w2", LEASE, T0 + 2 * LEASE, prov())
    assert j.status == JobStatus.CANCELLED and j.attempts == 1


def test_products_are_built_from_a_succeeded_process_job_and_catalogued() -> None:
    j = job()
    j.claim("w1", LEASE, T0, prov())
    j.succeed("w1", 1, [OUTPUT], {"astropy": "7"}, T0, prov())
    p = DataProduct.build(j, OUTPUT, T0, prov())
    assert p.id == data_product_id(j.id, "combined_image")
    assert p.inputs == [{**INPUT, "role": None, "classified_from": None}]
    assert p.software == {"astropy": "7"}
    assert p.status == ProductStatus.BUILT
    p.catalog(uuid4(), True, False, T0, prov())
    assert p.status == ProductStatus.PUBLISHED and p.published and not p.archived


def test_a_product_records_the_role_the_algorithm_gave_each_input() -> None:
    raw_ccd = {**INPUT, "file_type": "raw_ccd"}
    j = job(inputs=[raw_ccd])
    j.claim("w1", LEASE, T0, prov())
    used = {**OUTPUT, "inputs": [{"file_id": INPUT["file_id"], "role": "bias",
                                  "classified_from": "IMAGETYP 'ZERO'"}]}
    j.succeed("w1", 1, [used], {}, T0, prov())
    p = DataProduct.build(j, used, T0, prov())
    assert p.inputs == [{**raw_ccd, "role": "bias", "classified_from": "IMAGETYP 'ZERO'"}]


@pytest.mark.parametrize("bad", [
    {"kind": JobKind.PROCESS, "inputs": []},
    {"kind": JobKind.CATALOG, "inputs": []},
    {"kind": JobKind.PROCESS, "inputs": [INPUT, INPUT]},
])
def test_bad_requests_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidCommand):
        job(**bad)


# -- the state machine ------------------------------------------------------------------------
WORKERS = st.sampled_from(["w1", "w2"])


class JobMachine(RuleBasedStateMachine):
    """Any sequence of claims, renewals, reports, failures and cancels, at any times: the
    status only moves along JOB_TRANSITIONS, a final job never changes, a running job always
    has a lease holder, attempts never exceed the maximum, and only a job without a cancel
    requested succeeds."""

    def __init__(self) -> None:
        super().__init__()
        self.job = job(max_attempts=2)
        self.now = T0
        self.previous = JobStatus(self.job.status)
        self.cancel_was_requested = False

    def _do(self, action: Any) -> None:
        before = JobStatus(self.job.status)
        final_before = self.job.final
        try:
            action()
        except DomainRejection:  # a refused command records nothing
            assert JobStatus(self.job.status) == before
            return
        after = JobStatus(self.job.status)
        assert not final_before, "a final job changed"
        assert after == before or after in JOB_TRANSITIONS[before] or (
            before == JobStatus.RUNNING and after in (JobStatus.CANCELLED, JobStatus.FAILED))
        self.previous = after

    @rule(seconds=st.integers(0, 200))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(worker=WORKERS)
    def claim(self, worker: str) -> None:
        self._do(lambda: self.job.claim(worker, LEASE, self.now, prov()))

    @rule(worker=WORKERS, attempt=st.integers(1, 3))
    def renew(self, worker: str, attempt: int) -> None:
        self._do(lambda: self.job.renew(worker, attempt, LEASE, self.now, prov()))

    @rule(worker=WORKERS, attempt=st.integers(1, 3), name=st.sampled_from(["a", "b"]))
    def step(self, worker: str, attempt: int, name: str) -> None:
        self._do(lambda: self.job.start_step(worker, attempt, name, self.now, prov()))
        self._do(lambda: self.job.complete_step(worker, attempt, name, self.now, prov()))

    @rule(worker=WORKERS, attempt=st.integers(1, 3))
    def succeed(self, worker: str, attempt: int) -> None:
        requested = self.job.cancel_requested
        self._do(lambda: self.job.succeed(worker, attempt, [OUTPUT], {}, self.now, prov()))
        if self.job.status == JobStatus.SUCCEEDED:
            assert not requested

    @rule(worker=WORKERS, attempt=st.integers(1, 3), retryable=st.booleans())
    def fail(self, worker: str, attempt: int, retryable: bool) -> None:
        self._do(lambda: self.job.fail(worker, attempt, "boom", retryable, self.now, prov()))

    @rule()
    def cancel(self) -> None:
        self._do(lambda: self.job.request_cancel("stop", self.now, prov()))

    @rule(worker=WORKERS, attempt=st.integers(1, 3))
    def confirm_cancel(self, worker: str, attempt: int) -> None:
        self._do(lambda: self.job.confirm_cancel(worker, attempt, self.now, prov()))

    @invariant()
    def consistent(self) -> None:
        j = self.job
        assert j.attempts <= j.max_attempts
        if j.status == JobStatus.RUNNING:
            assert j.lease_worker is not None and j.lease_expires_at is not None
        else:
            assert j.lease_worker is None
        if j.status == JobStatus.SUCCEEDED:
            assert not j.cancel_requested and j.outputs
        # replaying the recorded events rebuilds the same state
        events = list(j.pending_events)
        if events and type(events[0]).__name__ == "Requested":
            rebuilt = None
            for e in events:
                rebuilt = e.mutate(rebuilt)
            assert rebuilt is not None and rebuilt.status == j.status
            assert rebuilt.attempts == j.attempts and rebuilt.steps == j.steps


JobMachine.TestCase.settings = hypothesis_settings(max_examples=150, stateful_step_count=30,
                                                   deadline=None)
test_job_state_machine = JobMachine.TestCase
