"""Every critical command type, assembled from the feature modules' declarations.

A new command type is declared in its feature module's ``SPECS``; a new feature module is
listed here. Nothing registers itself on import.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType, ModuleType

from commands import downloads, obs_units, processing, raw_data, results, staging
from commands.spec import CommandSpec

FEATURES = (obs_units, raw_data, staging, results, downloads, processing)


def assemble(features: Sequence[ModuleType]) -> dict[str, CommandSpec]:
    """The command types the feature modules declare (their ``SPECS``): each exactly once,
    and every member of each module's ``COMMAND_TYPES`` declared, by that module."""
    specs: dict[str, CommandSpec] = {}
    for feature in features:
        for spec in feature.SPECS:
            if spec.name in specs:
                raise ValueError(f"{spec.name} is declared twice")
            specs[spec.name] = spec
        elsewhere = [s.name for s in feature.SPECS if s.name not in feature.COMMAND_TYPES]
        if elsewhere:
            raise ValueError(f"{feature.__name__} declares other features' types: {elsewhere}")
    missing = {t for feature in features for t in feature.COMMAND_TYPES} - set(specs)
    if missing:
        raise ValueError(f"command types without a CommandSpec: {sorted(missing)}")
    return specs


#: command type → its declaration
COMMANDS: Mapping[str, CommandSpec] = MappingProxyType(assemble(FEATURES))

#: entity kind → the command types that create one (a pending one counts as existing)
CREATES: Mapping[str, frozenset[str]] = MappingProxyType({
    kind: frozenset(s.name for s in COMMANDS.values() if s.creates == kind)
    for kind in {s.creates for s in COMMANDS.values() if s.creates is not None}})

#: entity kind → the command types whose pending commands change its rows in smart queries
SHOWN_IN: Mapping[str, tuple[str, ...]] = MappingProxyType({
    kind: tuple(s.name for s in COMMANDS.values() if kind in s.shows)
    for kind in {k for s in COMMANDS.values() for k in s.shows}})
