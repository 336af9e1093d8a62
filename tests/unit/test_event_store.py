"""The in-memory event store keeps the contract the SQL stores keep (infra/event_store.py):
atomic saves, collisions as IntegrityError, log positions from 1 without gaps, the
notification log the projectors and the relay follow, and the look-ups of the dispatcher."""

from __future__ import annotations

from datetime import timedelta
from uuid import uuid4

import pytest

from domain.obs_units import ExecutedObsUnit
from domain.provenance import Provenance
from domain.receipts import CommandReceipt, receipt_id
from infra.event_store import MEMORY, EventStore, IntegrityError
from tests.unit.runner import NIGHT

PROV = Provenance(actor="night-operator", command_id="c-1", correlation_id="c-1")


def unit(store: EventStore, finished: bool = False) -> ExecutedObsUnit:
    u = ExecutedObsUnit.start(uuid4(), "OU-1", "HARPS", NIGHT, {}, PROV)
    if finished:
        u.finish("success", NIGHT + timedelta(hours=1), {}, PROV)
    return u


def test_it_is_a_store_of_its_own_kind(store: EventStore) -> None:
    assert store.kind == MEMORY
    assert store.notify_channel is None
    assert store.ping()
    assert store.max_position() == 0 and store.lag(0) == {"events": 0, "seconds": 0.0}


def test_saves_get_consecutive_positions_from_one(store: EventStore) -> None:
    a, b = unit(store, finished=True), unit(store)
    recordings = store.save(*a.collect_events(), *b.collect_events())
    assert [r.notification.id for r in recordings] == [1, 2, 3]
    assert store.max_position() == 3
    assert store.position_of(a.id) == 1 and store.position_of(a.id, 2) == 2
    assert store.position_of(b.id) == 3 and store.position_of(b.id, 2) is None
    assert store.position_of(uuid4()) is None


def test_a_collision_saves_nothing_of_the_transaction(store: EventStore) -> None:
    a = unit(store)
    store.save(*a.collect_events())
    b = unit(store)
    again = ExecutedObsUnit.start(a.id, "OU-2", "ESPRESSO", NIGHT, {}, PROV)
    with pytest.raises(IntegrityError):
        store.save(*b.collect_events(), *again.collect_events())
    assert store.max_position() == 1
    assert not store.exists(b.id)
    loaded = store.get(a.id)
    assert isinstance(loaded, ExecutedObsUnit) and loaded.obs_unit_id == "OU-1"


def test_a_receipt_collides_on_its_command_id(store: EventStore) -> None:
    store.save(*CommandReceipt.record("executed_obs_unit.start", [], PROV).collect_events())
    with pytest.raises(IntegrityError):
        store.save(*CommandReceipt.record("executed_obs_unit.start", [],
                                          PROV).collect_events())
    assert store.exists(receipt_id("c-1")) and store.recorded_by(receipt_id("c-1")) == \
        "night-operator"
    assert store.recorded_by(uuid4()) is None


def test_reading_aggregates_back(store: EventStore) -> None:
    a, b = unit(store, finished=True), unit(store)
    store.save(*a.collect_events(), *b.collect_events())
    loaded = store.get(a.id)
    assert isinstance(loaded, ExecutedObsUnit)
    assert (loaded.status, loaded.version) == ("success", 2)
    assert store.get(uuid4()) is None
    assert store.existing([a.id, b.id, uuid4()]) == {a.id, b.id}
    assert [v for v, _ in store.topics_since(a.id, 0)] == [1, 2]
    assert [t.rsplit(".", 1)[-1] for _, t in store.topics_since(a.id, 1)] == ["Finished"]


def test_the_notification_log_pages_and_decodes(store: EventStore) -> None:
    units = [unit(store) for _ in range(5)]
    store.save(*(e for u in units for e in u.collect_events()))
    page = store.select_notifications(2, 2)
    assert [n.id for n in page] == [3, 4]
    assert [n.originator_id for n in page] == [units[2].id, units[3].id]
    event = store.decode(page[0])
    assert type(event).__qualname__ == "ExecutedObsUnit.Started"
    assert event.obs_unit_id == "OU-1"
    assert store.select_notifications(5, 10) == []
    lag = store.lag(3)
    assert lag["events"] == 2 and 0 <= lag["seconds"] < 60


def test_each_in_memory_store_is_its_own(store: EventStore) -> None:
    store.save(*unit(store).collect_events())
    other = EventStore.in_memory()
    try:
        assert other.max_position() == 0
    finally:
        other.close()
