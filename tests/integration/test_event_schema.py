"""Schema evolution: an event stored in its old form (``StagingRequest.Cancelled`` version 1,
before ``previous_status`` existed) is read by today's code — through the aggregate, the
projector and the audit tools — on SQLite and PostgreSQL, and the audit chain over the stored
bytes still verifies."""

from __future__ import annotations

from datetime import UTC
from typing import Any
from uuid import uuid4

import orjson
import pytest
from eventsourcing.persistence import (
    DatetimeAsISO,
    DecimalAsStr,
    JSONTranscoder,
    StoredEvent,
    TranscodingNotRegisteredError,
    UUIDAsHex,
)
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from sqlalchemy import select

from bootstrap.ledger import Ledger
from domain.staging import StagingRequest, StagingStatus
from infra.audit_chain import AnchorLog, ChainKeeper, verify
from infra.event_store import EventStateTranscoder
from queries.audit import EventFilter, replay, state_at
from tests.unit.test_domain import complete_package, prov


def as_version_1(ledger: Ledger, event: Any) -> StoredEvent:
    """The stored form the code before ``class_version = 2`` wrote for ``event``: the same
    transcoding, without ``previous_status`` and without a ``class_version`` key."""
    assert ledger.store is not None
    mapper = ledger.store.mapper
    v2 = mapper.to_stored_event(event)
    state = mapper.transcoder.decode(v2.state)
    assert state.pop("class_version") == 2
    del state["previous_status"]
    return StoredEvent(originator_id=v2.originator_id,
                       originator_version=v2.originator_version, topic=v2.topic,
                       state=mapper.transcoder.encode(state))


def test_the_current_form_carries_its_version(ledger: Ledger) -> None:
    assert ledger.store is not None
    req = StagingRequest.request(staging_id=uuid4(), packages=[complete_package()],
                                 destination="archive:/stage", provenance=prov())
    req.report_progress("in_progress", 10, 1, None, prov())
    req.cancel("operator", prov())
    stored = ledger.store.mapper.to_stored_event(req.collect_events()[-1])
    state = orjson.loads(stored.state)
    assert state["class_version"] == 2 and state["previous_status"] == "in_progress"


def test_an_event_stored_as_version_1_is_read_by_the_new_code(ledger: Ledger) -> None:
    store, projector = ledger.store, ledger.projector
    assert store is not None and projector is not None
    package = complete_package()
    req = StagingRequest.request(staging_id=uuid4(), packages=[package],
                                 destination="archive:/stage", provenance=prov())
    req.cancel("not needed", prov(actor="old-client"))
    events = req.collect_events()
    store.save(*package.collect_events(), *events[:-1])
    old = as_version_1(ledger, events[-1])
    store.recorder.insert_events([old])  # as the old code stored it, byte for byte
    position = store.max_position()
    raw = store.select_notifications(position - 1, 1)[0]
    assert bytes(raw.state) == old.state and b"class_version" not in old.state

    # the aggregate: upcast on the way in
    loaded = store.get(req.id)
    assert isinstance(loaded, StagingRequest)
    assert loaded.status == StagingStatus.CANCELLED.value and loaded.message == "not needed"
    assert loaded.cancelled_from is None and loaded.version == 2
    decoded = store.decode(raw)
    assert isinstance(decoded, StagingRequest.Cancelled) and decoded.previous_status is None

    # the read model
    projector.catch_up()
    t = projector.tables.staging_requests
    with ledger.engine.connect() as conn:
        row = conn.execute(select(t).where(t.c.id == str(req.id))).mappings().one()
    assert row["status"] == "cancelled" and row["message"] == "not needed"
    assert row["last_actor"] == "old-client" and row["last_position"] == position
    _, report = projector.check()
    assert all(not (r["missing"] or r["extra"] or r["different"]) for r in report.values())

    # the audit tools: replay shows the event as stored, with its schema version; state
    # travels through the upcaster
    (cancelled,) = replay(store, EventFilter(event_type="Cancelled"))
    assert cancelled.schema_version == 1 and "previous_status" not in cancelled.data
    assert cancelled.data["reason"] == "not needed" and cancelled.actor == "old-client"
    state, trail, _ = state_at(store, str(req.id))
    assert state is not None and state["status"] == "cancelled"
    assert state["cancelled_from"] is None and len(trail) == 2

    # a newer event beside the old one, then the chain over the stored bytes
    other = StagingRequest.request(staging_id=uuid4(), packages=[package],
                                   destination="archive:/stage", provenance=prov())
    other.cancel("twice", prov())
    store.save(*other.collect_events())
    newer = list(replay(store, EventFilter(event_type="Cancelled")))[-1]
    assert newer.schema_version == 2 and newer.data["previous_status"] == "pending"
    anchors = AnchorLog(ledger.settings.anchors_file)
    ChainKeeper(store, ledger.engine, anchors, anchor_every=3).catch_up()
    result = verify(store, ledger.engine, anchors)
    assert result.ok and result.events == store.max_position()


# -- the bytes of a stored event ------------------------------------------------------------
def _transcoder(cls: type[JSONTranscoder]) -> JSONTranscoder:
    """``cls`` with the transcodings the ledger registers (UUIDs, decimals, datetimes)."""
    transcoder = cls()
    for transcoding in (UUIDAsHex(), DecimalAsStr(), DatetimeAsISO()):
        transcoder.register(transcoding)
    return transcoder


def _stock() -> JSONTranscoder:
    return _transcoder(JSONTranscoder)


def _ours() -> JSONTranscoder:
    return _transcoder(EventStateTranscoder)


_leaves = (st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text()
           | st.floats(allow_nan=False, allow_infinity=False) | st.uuids()
           | st.datetimes(timezones=st.just(UTC)) | st.decimals(allow_nan=False))
_states = st.dictionaries(st.text(), st.recursive(
    _leaves, lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(), inner, max_size=4), max_leaves=12), max_size=8)


@given(_states)
@hyp_settings(max_examples=300, deadline=None)
def test_event_states_are_written_byte_for_byte_as_eventsourcing_writes_them(
        state: dict[str, Any]) -> None:
    """The orjson writer must not change a byte: the audit chain hashes the stored bytes, and
    older events were written by eventsourcing's json-module transcoder."""
    ours, stock = _ours(), _stock()
    assert ours.encode(state) == stock.encode(state)
    assert ours.decode(ours.encode(state)) == stock.decode(stock.encode(state))


def test_what_orjson_writes_differently_goes_to_the_stock_encoder() -> None:
    ours, stock = _ours(), _stock()
    unusual = [{"x": float("nan")}, {"x": [float("-inf")]}, {"x": 2**70}, {1: "int key"},
               {"x": {"y": (1, 2)}}]
    for state in unusual:
        assert ours.encode(state) == stock.encode(state)
    with pytest.raises(TranscodingNotRegisteredError):
        ours.encode({"x": object()})


def test_the_ledger_writes_with_the_orjson_transcoder(ledger: Ledger) -> None:
    assert ledger.store is not None
    assert isinstance(ledger.store.mapper.transcoder, EventStateTranscoder)
