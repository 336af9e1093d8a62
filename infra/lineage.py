"""A data product's lineage as data, and as a W3C PROV-JSON document (docs/PROCESSING.md,
"Lineage").

``LineageGraph`` is what the API returns by default (``to_json``): nodes of a few kinds and
named relations between them. ``to_prov_json`` turns it into PROV-JSON with the ``prov``
package, in the ``obsledger`` namespace (``urn:obsledger:``). The mapping:

============================  ===============================================================
node kind                     PROV
============================  ===============================================================
``product``                   ``prov:Entity``, type ``obsledger:DataProduct``
``raw_data_file``             ``prov:Entity``, type ``obsledger:RawDataFile``
``parameters``                ``prov:Entity``, type ``obsledger:Parameters`` (one attribute
                              per parameter), ``used`` by the run
``observation_result``        ``prov:Entity`` and ``prov:Collection``, type
                              ``obsledger:ObservationResult`` (``hadMember`` its files)
``processing_run``            ``prov:Activity``, type ``obsledger:ProcessingRun``
``job``                       ``prov:Activity``, type ``obsledger:ProcessingJob``
``executed_obs_unit``         ``prov:Activity``, type ``obsledger:ExecutedObsUnit`` (the
                              exposure that generated raw data files)
``algorithm``                 ``prov:Agent``, ``prov:SoftwareAgent`` + ``obsledger:Algorithm``
                              (name and version): the run ``wasAssociatedWith`` it
``software``                  ``prov:Agent``, ``prov:SoftwareAgent`` +
                              ``obsledger:SoftwareEnvironment`` (package versions)
``agent``                     ``prov:Agent``: ``prov:Person`` / ``prov:SoftwareAgent`` /
                              ``prov:Organization`` by its ``agent_type`` attribute
                              (``person``, ``worker``/``software``, ``organization``)
============================  ===============================================================

Attributes become ``obsledger:<name>`` (``None`` values are left out; dicts and lists are
JSON text); ``started_at``/``ended_at`` of activities become ``prov:startTime``/``prov:endTime``;
a node's label is ``prov:label``. Edge attributes go on the relation (``role`` →
``prov:role``, e.g. ``used`` with role ``bias``); ``hadMember`` carries none.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from enum import Enum
from pathlib import PurePath
from typing import Any
from urllib.parse import quote
from uuid import UUID

NAMESPACE_PREFIX = "obsledger"
NAMESPACE_URI = "urn:obsledger:"

ENTITY, ACTIVITY, AGENT = "entity", "activity", "agent"

# kind -> (PROV class, obsledger type)
NODE_KINDS: dict[str, tuple[str, str]] = {
    "product": (ENTITY, "DataProduct"),
    "raw_data_file": (ENTITY, "RawDataFile"),
    "parameters": (ENTITY, "Parameters"),
    "observation_result": (ENTITY, "ObservationResult"),
    "processing_run": (ACTIVITY, "ProcessingRun"),
    "job": (ACTIVITY, "ProcessingJob"),
    "executed_obs_unit": (ACTIVITY, "ExecutedObsUnit"),
    "algorithm": (AGENT, "Algorithm"),
    "software": (AGENT, "SoftwareEnvironment"),
    "agent": (AGENT, "Actor"),
}

# relation -> (source's PROV class, target's PROV class)
RELATIONS: dict[str, tuple[str, str]] = {
    "wasGeneratedBy": (ENTITY, ACTIVITY),
    "used": (ACTIVITY, ENTITY),
    "wasAssociatedWith": (ACTIVITY, AGENT),
    "wasDerivedFrom": (ENTITY, ENTITY),
    "wasAttributedTo": (ENTITY, AGENT),
    "wasInformedBy": (ACTIVITY, ACTIVITY),
    "hadMember": (ENTITY, ENTITY),
    "actedOnBehalfOf": (AGENT, AGENT),
}

AGENT_TYPES = {"person": "Person", "worker": "SoftwareAgent", "software": "SoftwareAgent",
               "organization": "Organization"}
TIME_ATTRIBUTES = {"started_at": "startTime", "ended_at": "endTime"}


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON types (times as ISO 8601, ids and paths as text)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, UUID | PurePath):
        return str(value)
    if isinstance(value, Enum):
        return _jsonable(value.value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(v) for v in value]
    return str(value)


@dataclass(frozen=True)
class LineageNode:
    id: str
    kind: str
    label: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "label": self.label,
                "attributes": _jsonable(self.attributes)}


@dataclass(frozen=True)
class LineageEdge:
    source: str
    target: str
    relation: str
    attributes: dict[str, Any] = field(default_factory=dict)  # e.g. {"role": "bias"}

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "target": self.target,
                               "relation": self.relation}
        if self.attributes:
            out["attributes"] = _jsonable(self.attributes)
        return out


@dataclass(frozen=True)
class LineageGraph:
    """The lineage of ``root`` (usually a product). Checked when built: unique node ids, known
    kinds and relations, edges between existing nodes whose PROV classes fit the relation
    (``ValueError`` otherwise)."""

    root: str
    nodes: list[LineageNode]
    edges: list[LineageEdge]

    def __post_init__(self) -> None:
        kinds: dict[str, str] = {}
        for node in self.nodes:
            if node.kind not in NODE_KINDS:
                raise ValueError(f"lineage node {node.id!r}: unknown kind {node.kind!r} "
                                 f"(one of {', '.join(NODE_KINDS)})")
            if node.id in kinds:
                raise ValueError(f"lineage node {node.id!r} appears twice")
            kinds[node.id] = node.kind
        if self.root not in kinds:
            raise ValueError(f"the lineage root {self.root!r} is not one of its nodes")
        for edge in self.edges:
            if edge.relation not in RELATIONS:
                raise ValueError(f"unknown lineage relation {edge.relation!r} "
                                 f"(one of {', '.join(RELATIONS)})")
            for end in (edge.source, edge.target):
                if end not in kinds:
                    raise ValueError(f"lineage edge {edge.relation} refers to {end!r}, "
                                     "which is not a node")
            if edge.relation == "hadMember" and edge.attributes:
                raise ValueError("hadMember carries no attributes")
            want = RELATIONS[edge.relation]
            got = (NODE_KINDS[kinds[edge.source]][0], NODE_KINDS[kinds[edge.target]][0])
            if got != want:
                raise ValueError(
                    f"{edge.relation} goes from a PROV {want[0]} to a PROV {want[1]}, not from "
                    f"{kinds[edge.source]} {edge.source!r} ({got[0]}) to "
                    f"{kinds[edge.target]} {edge.target!r} ({got[1]})")

    def node(self, node_id: str) -> LineageNode:
        for node in self.nodes:
            if node.id == node_id:
                return node
        raise KeyError(node_id)

    def to_json(self) -> dict[str, Any]:
        return {"root": self.root, "nodes": [n.to_json() for n in self.nodes],
                "edges": [e.to_json() for e in self.edges]}


_LOCAL_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def prov_identifier(node_id: str) -> str:
    """The PROV qualified name of a node: ``obsledger:<id>``, characters outside
    ``[A-Za-z0-9_.:/-]`` percent-encoded."""
    return f"{NAMESPACE_PREFIX}:{quote(node_id, safe=':/-_.')}"


def prov_attribute(name: str) -> str:
    """The PROV attribute name of a node attribute: ``obsledger:<name>`` (characters outside
    ``[A-Za-z0-9_.-]`` become ``_``)."""
    return f"{NAMESPACE_PREFIX}:{_LOCAL_NAME.sub('_', name)}"


def _prov_value(value: Any) -> Any:
    if isinstance(value, bool | int | float | str | datetime):
        return value
    if isinstance(value, date | UUID | PurePath | Enum):
        return _jsonable(value)
    return json.dumps(_jsonable(value), sort_keys=True)


def _as_time(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


def to_prov_json(graph: LineageGraph) -> dict[str, Any]:
    """The graph as a W3C PROV-JSON document (a dict ready for ``json.dumps``)."""
    from prov.constants import PROV
    from prov.model import ProvDocument

    doc = ProvDocument()
    ns = doc.add_namespace(NAMESPACE_PREFIX, NAMESPACE_URI)
    collections = {e.source for e in graph.edges if e.relation == "hadMember"}
    for node in graph.nodes:
        prov_class, type_name = NODE_KINDS[node.kind]
        types: list[Any] = [ns[type_name]]
        attributes: list[tuple[Any, Any]] = [(PROV["label"], node.label)]
        start = end = None
        for name, value in node.attributes.items():
            if value is None:
                continue
            if prov_class == ACTIVITY and name in TIME_ATTRIBUTES:
                if name == "started_at":
                    start = _as_time(value)
                else:
                    end = _as_time(value)
                continue
            attributes.append((ns[_LOCAL_NAME.sub("_", name)], _prov_value(value)))
        if prov_class == AGENT:
            agent_type = "software" if node.kind in ("algorithm", "software") else str(
                node.attributes.get("agent_type", "")).lower()
            if agent_type in AGENT_TYPES:
                types.insert(0, PROV[AGENT_TYPES[agent_type]])
        if node.kind == "observation_result" or node.id in collections:
            types.insert(0, PROV["Collection"])
        attributes.extend((PROV["type"], t) for t in types)
        identifier = prov_identifier(node.id)
        if prov_class == ENTITY:
            doc.entity(identifier, attributes)
        elif prov_class == ACTIVITY:
            doc.activity(identifier, start, end, attributes)
        else:
            doc.agent(identifier, attributes)

    for edge in graph.edges:
        source, target = prov_identifier(edge.source), prov_identifier(edge.target)
        extra: list[tuple[Any, Any]] = []
        for name, value in edge.attributes.items():
            if value is None:
                continue
            key = PROV["role"] if name == "role" else ns[_LOCAL_NAME.sub("_", name)]
            extra.append((key, _prov_value(value)))
        other = extra or None
        # each relation (checked against RELATIONS when the graph was built) is the name of
        # the ProvDocument method that records it; a membership takes no attributes
        relate = getattr(doc, edge.relation)
        if edge.relation == "hadMember":
            relate(source, target)
        else:
            relate(source, target, other_attributes=other)
    text = doc.serialize(format="json")
    assert text is not None  # serialize() returns the text when given no destination
    result: dict[str, Any] = json.loads(text)
    return result


__all__ = ["NAMESPACE_URI", "NODE_KINDS", "RELATIONS", "LineageEdge", "LineageGraph",
           "LineageNode", "prov_attribute", "prov_identifier", "to_prov_json"]
