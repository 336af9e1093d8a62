"""What a pending command will change: journal entries replayed onto read-model rows.

Rows are plain dicts in the shape of ``queries.models`` views. ``Overlay`` starts from the
projected rows (loaded on demand) and applies each not-yet-projected command in journal order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from domain.raw_data import raw_data_file_id
from domain.results import (
    OUTCOME_TARGET,
    CopiesMode,
    Fulfillment,
    TaskOutcome,
    copies_per_cell,
    leaf_cells,
)
from infra.journal import JournalEntry

Kind = str  # "executed_obs_unit" | "raw_data_file" | "raw_data_package" | "staging" | …
Loader = Callable[[Kind, str], dict[str, Any] | None]


def mark_pending(row: dict[str, Any], entry: JournalEntry) -> dict[str, Any]:
    """``row`` as changed by ``entry``, a command not yet visible in the read model."""
    row["pending"] = True
    row["command_status"] = entry.status
    ids = row.setdefault("pending_command_ids", [])
    if entry.command_id not in ids:
        ids.append(entry.command_id)
    return row


class Overlay:
    def __init__(self, load: Loader) -> None:
        self._load = load
        self.rows: dict[Kind, dict[str, dict[str, Any] | None]] = {
            "executed_obs_unit": {}, "raw_data_file": {}, "raw_data_package": {}, "staging": {},
            "observation_result": {}}
        self.touched: dict[Kind, list[str]] = {k: [] for k in self.rows}

    def row(self, kind: Kind, entity_id: str) -> dict[str, Any] | None:
        cache = self.rows[kind]
        if entity_id not in cache:
            cache[entity_id] = self._load(kind, entity_id)
        return cache[entity_id]

    def _mark(self, kind: Kind, entity_id: str, row: dict[str, Any], entry: JournalEntry) -> None:
        mark_pending(row, entry)
        self.rows[kind][entity_id] = row
        if entity_id not in self.touched[kind]:
            self.touched[kind].append(entity_id)

    def _create(self, kind: Kind, entity_id: str, row: dict[str, Any],
                entry: JournalEntry) -> None:
        current = self.row(kind, entity_id)
        if current is not None and not current.get("pending"):
            return  # already projected (the query read it after the projector caught up)
        row.setdefault("last_position", None)
        self._mark(kind, entity_id, row, entry)

    def _patch(self, kind: Kind, entity_id: str, entry: JournalEntry,
               change: Callable[[dict[str, Any]], None]) -> None:
        row = self.row(kind, entity_id)
        if row is None:
            return
        if entry.status == "applied" and (row.get("last_position") or 0) >= (entry.position or 0):
            return  # the read model already shows this command
        change(row)
        self._mark(kind, entity_id, row, entry)

    def apply(self, entry: JournalEntry) -> None:
        handler = _HANDLERS.get(entry.command_type)
        if handler is not None:
            handler(self, entry, entry.payload)


def _file_row(f: dict[str, Any], package_id: str | None = None) -> dict[str, Any]:
    return {
        "id": str(raw_data_file_id(f["instrument"], f["name"])), "name": f["name"],
        "instrument": f["instrument"], "relative_path": f["relative_path"], "size": f["size"],
        "checksum": f["checksum"], "executed_obs_unit_id": f.get("executed_obs_unit_id"),
        "package_id": package_id, "file_type": f["file_type"], "created_at": f["created_at"],
    }


def _start(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    o._create("executed_obs_unit", p["id"], {
        "id": p["id"], "obs_unit_id": p["obs_unit_id"], "instrument": p["instrument"],
        "status": "running", "start_time": p["start_time"], "end_time": None,
        "metadata": p.get("metadata", {}), "started_by": e.actor, "finished_by": None}, e)


def _finish(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    def change(r: dict[str, Any]) -> None:
        if r["status"] == "running":
            r.update(status=p["status"], end_time=p["end_time"], finished_by=e.actor,
                     metadata={**r.get("metadata", {}), **p.get("metadata", {})})
    o._patch("executed_obs_unit", p["id"], e, change)


def _register(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    for f in p.get("files", [p]):
        row = _file_row(f)
        o._create("raw_data_file", row["id"], row, e)


def _create_package(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    pid = p["id"]
    sizes: list[int | None] = []
    for f in p.get("files", []):
        row = _file_row(f, pid)
        sizes.append(f["size"])
        o._create("raw_data_file", row["id"], row, e)
    for fid in p.get("file_ids", []):
        existing = o.row("raw_data_file", fid)
        sizes.append(existing["size"] if existing else None)
        o._patch("raw_data_file", fid, e, lambda r: r.update(package_id=pid))
    total = None if None in sizes else sum(s for s in sizes if s is not None)
    o._create("raw_data_package", pid, {
        "id": pid, "name": p["name"], "executed_obs_unit_id": p.get("executed_obs_unit_id"),
        "status": "building", "total_size": total, "file_count": len(sizes),
        "finalized_at": None}, e)


def _add_files(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    pid = p["id"]
    for fid in p["file_ids"]:
        o._patch("raw_data_file", fid, e, lambda r: r.update(package_id=pid))

    def change(r: dict[str, Any]) -> None:
        r["file_count"] = r.get("file_count", 0) + len(p["file_ids"])
        r["total_size"] = None  # known once applied
    o._patch("raw_data_package", pid, e, change)


def _finalize(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    o._patch("raw_data_package", p["id"], e, lambda r: r.update(status="complete"))


def _stage(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    o._create("staging", p["id"], {
        "id": p["id"], "package_ids": p["package_ids"], "destination": p["destination"],
        "status": "pending", "bytes_total": None, "files_total": None,
        "bytes_transferred": 0, "files_transferred": 0, "message": None}, e)


def _progress(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    def change(r: dict[str, Any]) -> None:
        if r["status"] in ("pending", "in_progress"):
            r.update(status=p["status"], bytes_transferred=p["bytes_transferred"],
                     files_transferred=p["files_transferred"], message=p.get("message"))
    o._patch("staging", p["id"], e, change)


def _cancel(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    def change(r: dict[str, Any]) -> None:
        if r["status"] in ("pending", "in_progress"):
            r.update(status="cancelled", message=p.get("reason"))
    o._patch("staging", p["id"], e, change)


# -- observation results: what a pending command will do (marked pending; the applied
# command may differ where the outcome depends on state only the dispatcher sees) ------------
def _materialize(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
    copies = copies_per_cell(CopiesMode(p["copies_mode"]), p["copies"],
                             p.get("eligible_instruments") or [])
    for rid, epoch, sample, copy, instrument in leaf_cells(
            p["observation_id"], p["request_id"], p["epochs"], p["samples"], copies):
        o._create("observation_result", str(rid), {
            "id": str(rid), "short_id": None, "observation_id": p["observation_id"],
            "request_id": p["request_id"], "epoch_index": epoch, "sample_index": sample,
            "copy_index": copy, "instrument_id": instrument, "copies_mode": p["copies_mode"],
            "not_before": p.get("not_before"), "spec_snapshot": p.get("spec_snapshot"),
            "fulfillment_status": "pending_dispatch", "fulfilled_on": None, "task_count": 0,
            "data_product_status": "PENDING", "assets_revision": 0,
            "dirty_from_revision": None, "dirty": False, "next_eligible_run_at": None,
            "last_built_revision": None, "current_processing_run_id": None,
            "failed_runs": 0}, e)


def _result_patch(change: Callable[[dict[str, Any], dict[str, Any]], None]) -> Callable[
        [Overlay, JournalEntry, dict[str, Any]], None]:
    def handler(o: Overlay, e: JournalEntry, p: dict[str, Any]) -> None:
        o._patch("observation_result", p["id"], e, lambda r: change(r, p))
    return handler


def _dispatched(r: dict[str, Any], p: dict[str, Any]) -> None:
    if r["fulfillment_status"] in ("pending_dispatch", "partially_fulfilled"):
        r.update(fulfillment_status="dispatched", task_count=r["task_count"] + 1)


def _task_ended(r: dict[str, Any], p: dict[str, Any]) -> None:
    if r["fulfillment_status"] == "dispatched":
        target = OUTCOME_TARGET[TaskOutcome(p["outcome"])]
        r.update(fulfillment_status=target.value, fulfilled_on=p["finished_at"]
                 if target is Fulfillment.FULFILLED else None)


def _canceled(r: dict[str, Any], p: dict[str, Any]) -> None:
    if r["fulfillment_status"] not in ("fulfilled", "canceled"):
        r["fulfillment_status"] = "canceled"


def _asset(r: dict[str, Any], p: dict[str, Any]) -> None:
    r["assets_revision"] += 1  # unless the asset was counted already: known once applied
    r["dirty_from_revision"] = r["dirty_from_revision"] or r["assets_revision"]
    r["dirty"] = True
    if r["data_product_status"] != "BUILDING":
        r["data_product_status"] = "STALE" if r["last_built_revision"] is not None \
            else "PENDING"


def _run_started(r: dict[str, Any], p: dict[str, Any]) -> None:
    if r["current_processing_run_id"] is None:
        r.update(data_product_status="BUILDING", current_processing_run_id=p["run_id"])


def _run_ended(r: dict[str, Any], p: dict[str, Any]) -> None:
    if r["current_processing_run_id"] == p["run_id"]:
        status = {"completed": "READY", "failed": "FAILED", "blocked": "BLOCKED",
                  "skipped": "SKIPPED"}[p["end"]]
        r.update(data_product_status=status, current_processing_run_id=None)


_HANDLERS: dict[str, Callable[[Overlay, JournalEntry, dict[str, Any]], None]] = {
    "observation_result.materialize": _materialize,
    "observation_result.dispatch": _result_patch(_dispatched),
    "observation_result.report_task": _result_patch(_task_ended),
    "observation_result.cancel": _result_patch(_canceled),
    "observation_result.contribute_asset": _result_patch(_asset),
    "observation_result.start_run": _result_patch(_run_started),
    "observation_result.end_run": _result_patch(_run_ended),
    "executed_obs_unit.start": _start,
    "executed_obs_unit.finish": _finish,
    "raw_data_file.register": _register,
    "raw_data_file.register_bulk": _register,
    "raw_data_package.create": _create_package,
    "raw_data_package.add_files": _add_files,
    "raw_data_package.finalize": _finalize,
    "staging.stage": _stage,
    "staging.report_progress": _progress,
    "staging.cancel": _cancel,
}
