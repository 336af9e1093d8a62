"""Time travel, as a property (hypothesis): for random command histories over a few staging
requests, stored one event per transaction in SQLite and PostgreSQL,

- ``state --version N`` equals the aggregate right after its N-th event (the in-memory
  events folded, the last fold being the aggregate the command methods built; N = 0: none);
- ``state --recorded-at T`` equals replaying only the events recorded by T.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from typing import Any
from uuid import UUID, uuid4

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootstrap.ledger import Ledger
from domain.errors import DomainRejection
from domain.staging import StagingRequest
from queries.audit import EventFilter, aggregate_state, replay, state_at
from tests.conftest import ROOT, settings_env
from tests.unit.test_domain import complete_package, prov

ACTIONS = ("progress", "complete", "fail", "cancel")

steps = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(ACTIONS),
                           st.floats(0, 1, allow_nan=False)), max_size=12)


def run_history(ledger: Ledger, history: list[tuple[int, str, float]],
                ) -> dict[UUID, list[tuple[Any, dict[str, Any]]]]:
    """Apply the history to three staging requests, saving each event on its own; return per
    aggregate [(event, state after it)] as the command methods left it in memory."""
    assert ledger.store is not None
    seen: dict[UUID, list[tuple[Any, dict[str, Any]]]] = {}
    requests = []
    for _ in range(3):
        package = complete_package((100, 200, 300))
        ledger.store.save(*package.collect_events())
        req = StagingRequest.request(staging_id=uuid4(), packages=[package],
                                     destination="archive:/stage", provenance=prov())
        requests.append(req)
        seen[req.id] = []
    pending = [(req, req.collect_events()) for req in requests]  # the Requested events
    for i, action, fraction in history:
        req = requests[i]
        try:
            if action == "progress":
                req.report_progress("in_progress",
                                    max(req.bytes_transferred, int(fraction * req.bytes_total)),
                                    max(req.files_transferred, int(fraction * req.files_total)),
                                    None, prov())
            elif action == "complete":
                req.report_progress("completed", req.bytes_total, req.files_total, None,
                                    prov())
            elif action == "fail":
                req.report_progress("failed", req.bytes_transferred, req.files_transferred,
                                    "disk full", prov())
            else:
                req.cancel("operator", prov())
        except DomainRejection:
            continue  # refused: no event
        pending.append((req, req.collect_events()))
    replayed: dict[UUID, Any] = {}
    for req, events in pending:
        for e in events:
            ledger.store.save(e)
            replayed[req.id] = e.mutate(replayed.get(req.id))
            seen[req.id].append((e, aggregate_state(replayed[req.id])))
    for req in requests:  # the fold of the events is the aggregate the methods built
        assert seen[req.id][-1][1] == aggregate_state(req)
    return seen


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=steps)
def test_state_by_version_and_by_recorded_time(ledger: Ledger,
                                               history: list[tuple[int, str, float]]) -> None:
    store = ledger.store
    assert store is not None
    for aggregate_id, events in run_history(ledger, history).items():
        key = str(aggregate_id)
        assert state_at(store, key, version=0) == (None, [], None)
        for n, (_, expected) in enumerate(events, start=1):
            state, used, _ = state_at(store, key, version=n)
            assert state == expected
            assert [e.version for e in used] == list(range(1, n + 1))
        stamps = [e.timestamp for e, _ in events]
        times = {stamps[0] - timedelta(seconds=1), *stamps,
                 *(t + timedelta(microseconds=1) for t in stamps)}
        for t in sorted(times):
            state, used, _ = state_at(store, key, recorded_at=t)
            by_t: Any = None  # replaying only the events recorded by t, from the log
            for e in replay(store, EventFilter(aggregate_id=key,
                                               recorded_to=t + timedelta(microseconds=1))):
                by_t = store.decode(_notification(store, key, e.version)).mutate(by_t)
            assert state == (None if by_t is None else aggregate_state(by_t))
            known = [e for e, _ in events if e.timestamp <= t]
            assert len(used) == len(known)
            assert state == (events[len(known) - 1][1] if known else None)


def _notification(store: Any, aggregate_id: str, version: int) -> Any:
    (stored,) = store.recorder.select_events(UUID(aggregate_id), gt=version - 1, lte=version)
    return stored


def test_state_on_the_command_line(ledger: Ledger) -> None:
    seen = run_history(ledger, [(0, "progress", 0.5), (0, "complete", 0)])
    aggregate_id, events = next(iter(seen.items()))
    env = settings_env(ledger.settings)
    done = subprocess.run([sys.executable, "-m", "api.cli", "state", str(aggregate_id),
                           "--version", "2"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    body = orjson.loads(done.stdout)
    assert body["state"] == events[1][1] and len(body["events"]) == 2
    at = events[0][0].timestamp.isoformat()
    done = subprocess.run([sys.executable, "-m", "api.cli", "state", str(aggregate_id),
                           "--recorded-at", at], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout)["state"] == events[0][1]
