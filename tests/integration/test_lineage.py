"""Lineage as data and its W3C PROV-JSON export, checked by reading the export back with the
``prov`` package (``ProvDocument.deserialize``): every node and relation, with its attributes."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from uuid import UUID, uuid4

import pytest
from prov.constants import PROV
from prov.model import (
    ProvActivity,
    ProvAgent,
    ProvAssociation,
    ProvCommunication,
    ProvDelegation,
    ProvDerivation,
    ProvDocument,
    ProvEntity,
    ProvGeneration,
    ProvMembership,
    ProvRecord,
    ProvUsage,
)

from infra.lineage import (
    NAMESPACE_URI,
    LineageEdge,
    LineageGraph,
    LineageNode,
    prov_attribute,
    prov_identifier,
    to_prov_json,
)

PROV_CLASS = {"product": ProvEntity, "raw_data_file": ProvEntity, "parameters": ProvEntity,
              "observation_result": ProvEntity, "processing_run": ProvActivity,
              "job": ProvActivity, "executed_obs_unit": ProvActivity, "algorithm": ProvAgent,
              "software": ProvAgent, "agent": ProvAgent}
RELATION_CLASS = {"wasGeneratedBy": ProvGeneration, "used": ProvUsage,
                  "wasAssociatedWith": ProvAssociation, "wasDerivedFrom": ProvDerivation,
                  "wasInformedBy": ProvCommunication, "hadMember": ProvMembership,
                  "actedOnBehalfOf": ProvDelegation}


def _t(hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 11, 29, hour, minute, tzinfo=UTC)


@pytest.fixture
def graph() -> LineageGraph:
    """A stacked image from a night: 3 raw frames (bias, flat, science) from 2 executed obs
    units, combined by ccd_stack 1.0.0 in one run of a processing job requested by a person."""
    product, run, job = uuid4(), uuid4(), uuid4()
    eou1, eou2, result = uuid4(), uuid4(), uuid4()
    files = [(uuid4(), name, kind, eou) for name, kind, eou in
             [("bias_001.fits", "bias", eou1), ("flat_V_001.fits", "flat", eou1),
              ("m51_V_001.fits", "science", eou2)]]
    nodes = [
        LineageNode(f"product:{product}", "product", "combined_image of job",
                    {"kind": "combined_image", "name": "m51_V_combined.fits",
                     "media_type": "application/fits", "size": 21_474_836_480,
                     "sha256": "ab" * 32, "object_key": f"products/{job}/combined.fits",
                     "metrics": {"noise": 4.2, "source_count": 118}, "status": "built"}),
        LineageNode(f"processing_run:{run}", "processing_run", "run 1 of the job",
                    {"attempt": 1, "status": "succeeded", "started_at": _t(3, 10),
                     "ended_at": _t(3, 12).isoformat(), "worker": "worker-a"}),
        LineageNode(f"job:{job}", "job", "process request",
                    {"job_kind": "process", "requested_at": _t(3, 9), "job_id": job}),
        LineageNode("algorithm:ccd_stack/1.0.0", "algorithm", "ccd_stack 1.0.0",
                    {"name": "ccd_stack", "version": "1.0.0"}),
        LineageNode(f"parameters:{run}", "parameters", "ccd_stack parameters",
                    {"sigma": 3.0, "maxiters": 5, "chunk_rows": None, "threshold_sigma": 5.0,
                     "detect": True, "combine": {"method": "mean", "clip": [3, 3]}}),
        LineageNode(f"software:{run}", "software", "software versions",
                    {"obsledger": "0.1.0", "numpy": "2.3.1", "scipy": "1.16.0",
                     "astropy": "8.0.2"}),
        LineageNode("agent:worker-a", "agent", "worker-a",
                    {"agent_type": "worker", "host": "proc-1"}),
        LineageNode("agent:alice", "agent", "alice", {"agent_type": "person"}),
        LineageNode(f"observation_result:{result}", "observation_result", "M51 in V",
                    {"status": "COMPLETE"}),
        LineageNode(f"executed_obs_unit:{eou1}", "executed_obs_unit", "calibrations",
                    {"started_at": _t(1), "ended_at": _t(1, 30), "telescope": "T1"}),
        LineageNode(f"executed_obs_unit:{eou2}", "executed_obs_unit", "M51 V exposure",
                    {"started_at": _t(2), "ended_at": _t(2, 5), "telescope": "T1"}),
    ]
    edges = [
        LineageEdge(f"product:{product}", f"processing_run:{run}", "wasGeneratedBy"),
        LineageEdge(f"processing_run:{run}", f"job:{job}", "wasInformedBy"),
        LineageEdge(f"processing_run:{run}", "algorithm:ccd_stack/1.0.0", "wasAssociatedWith"),
        LineageEdge(f"processing_run:{run}", f"software:{run}", "wasAssociatedWith"),
        LineageEdge(f"processing_run:{run}", "agent:worker-a", "wasAssociatedWith"),
        LineageEdge(f"processing_run:{run}", f"parameters:{run}", "used",
                    {"role": "parameters"}),
        LineageEdge(f"job:{job}", "agent:alice", "wasAssociatedWith"),
        LineageEdge("agent:worker-a", "agent:alice", "actedOnBehalfOf"),
        LineageEdge(f"product:{product}", "agent:alice", "wasAttributedTo"),
        LineageEdge(f"observation_result:{result}", f"product:{product}", "hadMember"),
    ]
    for file_id, name, kind, eou in files:
        nodes.append(LineageNode(f"raw_data_file:{file_id}", "raw_data_file", name,
                                 {"name": name, "file_type": kind, "size": 8_640_000,
                                  "checksum": f"sha256:{file_id.hex * 2}",
                                  "path": f"2026-11-29/{name}"}))
        edges += [
            LineageEdge(f"processing_run:{run}", f"raw_data_file:{file_id}", "used",
                        {"role": kind}),
            LineageEdge(f"product:{product}", f"raw_data_file:{file_id}", "wasDerivedFrom"),
            LineageEdge(f"raw_data_file:{file_id}", f"executed_obs_unit:{eou}",
                        "wasGeneratedBy"),
            LineageEdge(f"observation_result:{result}", f"raw_data_file:{file_id}",
                        "hadMember"),
        ]
    return LineageGraph(root=f"product:{product}", nodes=nodes, edges=edges)


def _expected(value: Any) -> Any:
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, UUID):
        return str(value)
    return value


def _as_time(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _extra(record: ProvRecord) -> dict[str, Any]:
    return {str(k): v for k, v in record.attributes}


def test_prov_json_round_trips_with_every_node_and_relation(graph: LineageGraph) -> None:
    exported = to_prov_json(graph)
    assert exported["prefix"] == {"obsledger": NAMESPACE_URI}
    doc = ProvDocument.deserialize(content=json.dumps(exported), format="json")

    records = {str(r.identifier): r for r in doc.get_records() if r.identifier is not None}
    assert len(records) == len(graph.nodes)
    for node in graph.nodes:
        record = records[prov_identifier(node.id)]
        assert type(record) is PROV_CLASS[node.kind], node.id
        assert record.get_attribute(PROV["label"]) == {node.label}
        types = {str(t) for t in record.get_attribute(PROV["type"])}
        assert any(t.startswith("obsledger:") for t in types)
        attributes = _extra(record)
        for name, value in node.attributes.items():
            if value is None:
                assert prov_attribute(name) not in attributes
            elif isinstance(record, ProvActivity) and name in ("started_at", "ended_at"):
                got = record.get_startTime() if name == "started_at" else record.get_endTime()
                assert got == _as_time(value)
            else:
                assert attributes[prov_attribute(name)] == _expected(value), (node.id, name)

    relations = [r for r in doc.get_records() if r.is_relation()]
    assert len(relations) == len(graph.edges)
    for edge in graph.edges:
        matches = [r for r in relations
                   if [str(q) for _, q in r.formal_attributes[:2]]
                   == [prov_identifier(edge.source), prov_identifier(edge.target)]]
        assert len(matches) == 1, edge
        (relation,) = matches
        expected_class = RELATION_CLASS.get(edge.relation)
        if expected_class is not None:
            assert type(relation) is expected_class
        else:  # wasAttributedTo
            assert relation.get_type() == PROV["Attribution"]
        for name, value in edge.attributes.items():
            key = "prov:role" if name == "role" else prov_attribute(name)
            assert {str(k): v for k, v in relation.attributes}[key] == value


def test_prov_types_follow_the_documented_mapping(graph: LineageGraph) -> None:
    doc = ProvDocument.deserialize(content=json.dumps(to_prov_json(graph)), format="json")
    types = {str(r.identifier): {str(t) for t in r.get_attribute(PROV["type"])}
             for r in doc.get_records() if r.identifier is not None}
    for node in graph.nodes:
        got = types[prov_identifier(node.id)]
        if node.kind in ("algorithm", "software") or node.id == "agent:worker-a":
            assert "prov:SoftwareAgent" in got
        if node.id == "agent:alice":
            assert "prov:Person" in got
        if node.kind == "observation_result":
            assert "prov:Collection" in got
    product = types[prov_identifier(graph.root)]
    assert product == {"obsledger:DataProduct"}


def test_the_export_is_stable(graph: LineageGraph) -> None:
    first = to_prov_json(graph)
    assert to_prov_json(graph) == first  # same graph, same document (blank node ids too)
    again = ProvDocument.deserialize(content=json.dumps(first), format="json")
    assert again == ProvDocument.deserialize(content=json.dumps(to_prov_json(graph)),
                                             format="json")


def test_to_json_is_plain_json(graph: LineageGraph) -> None:
    data = json.loads(json.dumps(graph.to_json()))
    assert data["root"] == graph.root
    assert [n["id"] for n in data["nodes"]] == [n.id for n in graph.nodes]
    run = next(n for n in data["nodes"] if n["kind"] == "processing_run")
    assert run["attributes"]["started_at"] == "2026-11-29T03:10:00+00:00"
    job = next(n for n in data["nodes"] if n["kind"] == "job")
    assert job["attributes"]["job_id"] == str(graph.node(job["id"]).attributes["job_id"])
    used = [e for e in data["edges"] if e["relation"] == "used"]
    assert sorted(e["attributes"]["role"] for e in used) == ["bias", "flat", "parameters",
                                                             "science"]
    assert "attributes" not in next(e for e in data["edges"] if e["relation"] == "hadMember")


def _node(node_id: str, kind: str) -> LineageNode:
    return LineageNode(node_id, kind, node_id, {})


@pytest.mark.parametrize(("nodes", "edges", "message"), [
    ([_node("p", "product"), _node("p", "product")], [], "appears twice"),
    ([_node("p", "thing")], [], "unknown kind"),
    ([_node("x", "product")], [], "root"),
    ([_node("p", "product")], [LineageEdge("p", "r", "wasGeneratedBy")], "not a node"),
    ([_node("p", "product"), _node("r", "processing_run")],
     [LineageEdge("p", "r", "madeOf")], "unknown lineage relation"),
    ([_node("p", "product"), _node("r", "processing_run")],
     [LineageEdge("p", "r", "used")], "used goes from a PROV activity to a PROV entity"),
    ([_node("p", "product"), _node("o", "observation_result")],
     [LineageEdge("o", "p", "hadMember", {"role": "x"})], "no attributes"),
])
def test_malformed_graphs_are_refused(nodes: list[LineageNode], edges: list[LineageEdge],
                                      message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LineageGraph(root="p", nodes=nodes, edges=edges)


def test_node_ids_with_any_characters_are_valid_prov_names() -> None:
    graph = LineageGraph(root="product:M51 V #1", nodes=[
        LineageNode("product:M51 V #1", "product", "M51 V #1", {"odd key!": "x"}),
        LineageNode("raw_data_file:night 1/ä.fits", "raw_data_file", "ä.fits", {}),
    ], edges=[LineageEdge("product:M51 V #1", "raw_data_file:night 1/ä.fits",
                          "wasDerivedFrom")])
    doc = ProvDocument.deserialize(content=json.dumps(to_prov_json(graph)), format="json")
    names = {str(r.identifier) for r in doc.get_records() if r.identifier is not None}
    assert names == {"obsledger:product:M51%20V%20%231",
                     "obsledger:raw_data_file:night%201/%C3%A4.fits"}
    (product,) = (r for r in doc.get_records() if str(r.identifier).endswith("%231"))
    assert _extra(product)["obsledger:odd_key_"] == "x"
