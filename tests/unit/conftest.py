"""Fast tests: handlers, the unit of work and the dispatcher over the in-memory event store.

Nothing here touches a disk, a database server or the network: the event store is
``EventStore.in_memory()`` (eventsourcing's POPO recorder), the journal of the dispatcher
tests an SQLite ``:memory:`` database. ``make test-unit`` runs this folder alone (without
tests/conftest.py, whose servers and application imports cost more than these tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from commands.spec import Policy
from infra.event_store import EventStore
from tests.unit.runner import PACKAGE_LIMIT, Clock, CommandRunner


@pytest.fixture
def store() -> Iterator[EventStore]:
    s = EventStore.in_memory()
    yield s
    s.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def policy(clock: Clock) -> Policy:
    return Policy(package_size_limit=PACKAGE_LIMIT, result_debounce=timedelta(seconds=60),
                  run_retry_limit=2, run_retry_base=timedelta(seconds=60), clock=clock)


@pytest.fixture
def run(store: EventStore, policy: Policy) -> CommandRunner:
    return CommandRunner(store, policy)
