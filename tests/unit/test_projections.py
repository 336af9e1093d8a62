"""The projection registry: every event a read model follows is mapped once, by the feature
module of its aggregate, and names a real event type (no store needed)."""

from __future__ import annotations

from types import ModuleType

import pytest

import domain.downloads
import domain.obs_units
import domain.processing
import domain.raw_data
import domain.results
import domain.staging
from projections import obs_units, raw_data, staging
from projections.registry import FEATURES, Projections, assemble
from projections.rows import Rows
from projections.tables import build_tables

DOMAIN = (domain.obs_units, domain.raw_data, domain.staging, domain.results, domain.downloads,
          domain.processing)


def test_every_mapped_event_is_a_real_event_of_its_features_aggregates() -> None:
    handlers = Projections(build_tables(), "sqlite").handlers
    assert set(handlers) == {name for f in FEATURES
                             for name in f.handlers(Rows(build_tables(), "sqlite"))}
    for name in handlers:
        aggregate, event = name.split(".")
        found = [getattr(m, aggregate) for m in DOMAIN
                 if getattr(getattr(m, aggregate, None), "__module__", None) == m.__name__]
        assert len(found) == 1, name
        assert getattr(found[0], event).__qualname__ == name  # the stored topic's name


def test_assembly_refuses_an_event_mapped_twice_or_by_another_feature() -> None:
    rows = Rows(build_tables(), "sqlite")
    with pytest.raises(ValueError, match="mapped twice"):
        assemble([*FEATURES, staging], rows)
    stray = ModuleType("projections.stray")
    stray.AGGREGATES = ("StagingRequest",)  # type: ignore[attr-defined]
    stray.handlers = obs_units.handlers  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="other features' events"):
        assemble([raw_data, stray], rows)


def test_an_event_no_read_model_follows_changes_no_row() -> None:
    projections = Projections(build_tables(), "sqlite")
    ingested = domain.raw_data.RawDataFile.Ingested  # type: ignore[attr-defined]
    assert ingested.__qualname__ not in projections.handlers  # in the log, read from events
    assert projections.ops(object(), 1) == []
