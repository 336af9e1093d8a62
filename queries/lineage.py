"""A data product's lineage, assembled from the read models as ``infra.lineage.LineageGraph``.

product ─wasGeneratedBy→ processing run (when the results scheduler started it) ─wasInformedBy→
job; without a run the job itself generated the product. The job ─wasAssociatedWith→ the
algorithm (name and version) and the software (obsledger, numpy, scipy, astropy as they were
when it ran), ─used→ its parameters and every input raw data file (with its checksum; the edge
carries the role the algorithm gave the file — bias, dark, flat, science — and what said so); the
product ─wasDerivedFrom→ each raw data file, which ─wasGeneratedBy→ the executed obs unit that
wrote it; an observation result ─hadMember→ the products of its runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import select

from infra.lineage import LineageEdge, LineageGraph, LineageNode
from queries.processing import ProcessingQueries
from queries.rows import ExecutedObsUnitRow
from queries.service import unit_view


def _plain(value: Any) -> Any:
    """JSON (and PROV) friendly attribute values: times as ISO 8601 strings."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class _Builder:
    def __init__(self, root: str) -> None:
        self.root = root
        self.nodes: dict[str, LineageNode] = {}
        self.edges: list[LineageEdge] = []

    def node(self, node_id: str, kind: str, label: str, **attributes: Any) -> str:
        if node_id not in self.nodes:
            self.nodes[node_id] = LineageNode(id=node_id, kind=kind, label=label,
                                              attributes=_plain(attributes))
        return node_id

    def edge(self, source: str, target: str, relation: str, **attributes: Any) -> None:
        edge = LineageEdge(source=source, target=target, relation=relation,
                           attributes=attributes)
        if edge not in self.edges:
            self.edges.append(edge)

    def graph(self) -> LineageGraph:
        return LineageGraph(root=self.root, nodes=list(self.nodes.values()), edges=self.edges)


def product_lineage(processing: ProcessingQueries, product_id: str) -> LineageGraph | None:
    """The lineage graph of one product (None: no such product)."""
    product = processing.product(product_id)
    if product is None:
        return None
    job = processing.job(product["job_id"]) or {}
    b = _Builder(f"product:{product_id}")
    pnode = b.node(b.root, "product", product["name"], product_id=product_id,
                   product_kind=product["kind"], status=product["status"],
                   media_type=product["media_type"], size=product["size"],
                   sha256=product["checksum"]["value"], key=product["key"], uri=product["uri"],
                   metrics=product["metrics"], built_at=product["built_at"])
    jnode = b.node(f"job:{product['job_id']}", "job", f"{job.get('kind', 'process')} job",
                   job_id=product["job_id"], job_kind=job.get("kind"),
                   status=job.get("status"),
                   requested_at=job.get("requested_at"), started_at=job.get("started_at"),
                   ended_at=job.get("finished_at"), attempts=job.get("attempts"))
    activity = jnode
    if product["run_id"]:
        activity = b.node(f"processing_run:{product['run_id']}", "processing_run",
                          "processing run", run_id=product["run_id"],
                          result_id=product["result_id"])
        b.edge(activity, jnode, "wasInformedBy")
    if product["result_id"]:
        rnode = b.node(f"observation_result:{product['result_id']}", "observation_result",
                       "observation result", result_id=product["result_id"])
        b.edge(rnode, pnode, "hadMember")
    b.edge(pnode, activity, "wasGeneratedBy")
    anode = b.node(f"algorithm:{product['algorithm']}:{product['algorithm_version']}",
                   "algorithm", f"{product['algorithm']} {product['algorithm_version']}",
                   name=product["algorithm"], version=product["algorithm_version"])
    b.edge(activity, anode, "wasAssociatedWith")
    parameters = b.node(f"parameters:{product_id}", "parameters", "parameters",
                        **product["parameters"])
    b.edge(activity, parameters, "used")
    if job.get("requested_by"):
        who = job["requested_by"]
        kind = "worker" if who.startswith("obsledger:") else (
            "software" if who.startswith("service:") else "person")
        requester = b.node(f"agent:{who}", "agent", who, name=who, agent_type=kind)
        b.edge(jnode, requester, "wasAssociatedWith", role="requester")
    if job.get("completed_by"):
        worker = b.node(f"agent:worker:{job['completed_by']}", "agent", job["completed_by"],
                        name=job["completed_by"], agent_type="worker")
        b.edge(jnode, worker, "wasAssociatedWith", role="worker")
    for name, version in sorted(product["software"].items()):
        snode = b.node(f"software:{name}:{version}", "software", f"{name} {version}",
                       name=name, version=version)
        b.edge(activity, snode, "wasAssociatedWith")
    units = _executions(processing, [i["executed_obs_unit_id"] for i in product["inputs"]
                                     if i["executed_obs_unit_id"]])
    for i in product["inputs"]:
        fnode = b.node(f"raw_data_file:{i['file_id']}", "raw_data_file", i["name"],
                       file_id=i["file_id"], name=i["name"], instrument=i["instrument"],
                       relative_path=i["relative_path"], size=i["size"],
                       checksum_algorithm=i["checksum"]["algorithm"],
                       checksum=i["checksum"]["value"], file_type=i["file_type"])
        # the role the algorithm gave the file (bias, dark, flat, science), not its file type
        # (``raw_ccd`` says nothing when the frames are told apart by IMAGETYP)
        used = {"role": i["role"], "classified_from": i["classified_from"]} \
            if i.get("role") else {}
        b.edge(activity, fnode, "used", **used)
        b.edge(pnode, fnode, "wasDerivedFrom")
        unit_id = i["executed_obs_unit_id"]
        if unit_id:
            unit: Mapping[str, Any] = units.get(unit_id, {})
            unode = b.node(f"executed_obs_unit:{unit_id}", "executed_obs_unit",
                           f"execution of {unit.get('obs_unit_id', '?')}",
                           executed_obs_unit_id=unit_id, obs_unit_id=unit.get("obs_unit_id"),
                           instrument=unit.get("instrument"), status=unit.get("status"),
                           started_at=unit.get("start_time"), ended_at=unit.get("end_time"))
            b.edge(fnode, unode, "wasGeneratedBy")
    return b.graph()


def _executions(processing: ProcessingQueries, ids: list[str]) -> dict[str, ExecutedObsUnitRow]:
    if not ids:
        return {}
    u = processing.q.t.executed_obs_units
    with processing.q.connect() as conn, conn.begin():
        return {r["id"]: unit_view(r) for r in processing.q.fetch_rows(
            conn, select(u).where(u.c.id.in_(sorted(set(ids)))))}
