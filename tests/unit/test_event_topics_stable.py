"""Stored events must keep loading: every event class of domain/ keeps its topic
(``module:QualName``), its fields in their order and the bytes the application's transcoder
writes for it. ``tests/data/event_topics_stable.json`` holds, for each event class, its topic
and the stored state of a sample instance as recorded before domain/ was refactored; a
change to domain/ that would alter either fails here.

Regenerate the file only for a deliberate, documented schema change:
``python -m tests.unit.test_event_topics_stable``."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import pkgutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID, uuid5

from eventsourcing.domain import Aggregate, CanInitAggregate, DomainEvent
from eventsourcing.utils import get_topic

import domain
from infra.event_store import event_mapper

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "event_topics_stable.json"
SAMPLE_NAMESPACE = UUID("0b7c6f3e-1d2a-4c5b-8e9f-a1b2c3d4e5f6")
SAMPLE_TIME = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)


def domain_event_classes() -> dict[str, type[DomainEvent]]:
    """Every event class an aggregate of domain/ declares, by topic."""
    found: dict[str, type[DomainEvent]] = {}
    for info in pkgutil.iter_modules(domain.__path__):
        module = importlib.import_module(f"domain.{info.name}")
        for aggregate in vars(module).values():
            if not (inspect.isclass(aggregate) and issubclass(aggregate, Aggregate)
                    and aggregate.__module__ == module.__name__):
                continue
            for value in vars(aggregate).values():
                if inspect.isclass(value) and issubclass(value, DomainEvent):
                    found[get_topic(value)] = value
    return found


def _sample(name: str, annotation: str) -> Any:
    """A deterministic value of the type ``annotation`` names (the first of a union)."""
    kind = annotation.split(" | ")[0].strip()
    if kind.startswith("list["):
        return [_sample(name, kind[5:-1])]
    if kind.startswith("dict") or kind == "Any":
        return {"key": f"{name}-value", "n": 3}
    simple: dict[str, Any] = {
        "str": f"{name}-value", "int": len(name), "float": len(name) / 8,
        "bool": True, "datetime": SAMPLE_TIME, "UUID": uuid5(SAMPLE_NAMESPACE, name)}
    return simple[kind]


def sample_event(event_cls: type[DomainEvent]) -> DomainEvent:
    """An instance of ``event_cls`` with a sample value in each field."""
    fields: dict[str, Any] = {
        "originator_id": uuid5(SAMPLE_NAMESPACE, get_topic(event_cls)),
        "originator_version": 1 if issubclass(event_cls, CanInitAggregate) else 2,
        "timestamp": SAMPLE_TIME}
    for field in dataclasses.fields(event_cls):  # type: ignore[arg-type]
        if field.name in fields:
            continue
        if field.name == "originator_topic":
            fields[field.name] = get_topic(event_cls).rsplit(".", 1)[0]
        else:
            fields[field.name] = _sample(field.name, str(field.type))
    return event_cls(**fields)


def current_record() -> dict[str, dict[str, str]]:
    """Topic → the stored topic and state of the sample instance of that event class."""
    mapper = event_mapper()
    record = {}
    for topic, event_cls in sorted(domain_event_classes().items()):
        stored = mapper.to_stored_event(sample_event(event_cls))
        record[topic] = {"topic": stored.topic, "state": stored.state.decode()}
    return record


def test_every_event_keeps_its_topic_and_stored_json() -> None:
    expected = json.loads(GOLDEN.read_text())
    current = current_record()
    assert sorted(current) == sorted(expected)
    for topic, stored in expected.items():
        assert current[topic] == stored, topic


def test_the_samples_load_back_as_the_same_events() -> None:
    mapper = event_mapper()
    for event_cls in domain_event_classes().values():
        event = sample_event(event_cls)
        assert mapper.to_domain_event(mapper.to_stored_event(event)) == event


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(current_record(), indent=1, ensure_ascii=False) + "\n")
