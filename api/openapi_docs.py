"""What the served OpenAPI schema says beyond the routes' own declarations: the tags'
descriptions (``openapi_tags``), and the descriptions of the operations whose decorators give
only a summary.
``ObsLedgerAPI.openapi`` applies them; tests/http/test_openapi_docs.py keeps every operation and
tag described."""

from __future__ import annotations

from typing import Any

READER = "Any signed-in account with a reading role may call it."
OPERATOR = "Operators (and administrators) may call it."
WRITER = "Telescope automation and operators (critical writers) may call it."
ADMIN = "Administrators only."
COMMAND = ("Answers 202 once the command is durably journaled (200 with its outcome under "
           "`?wait=true`); `Location` names the command's status.")
SMART = ("Merges commands journaled but not yet projected (`pending: true`), so a client reads "
         "its own writes.")
COUNT = "Answers the counts from one snapshot of the read models (503 while they are down)."

TAGS: list[dict[str, str]] = [
    {"name": "accounts", "description": "Sign-in, tokens, users and service accounts of "
     "the observatory's people and automation."},
    {"name": "executed obs units", "description": "Executions of planned observing units: "
     "started and finished by telescope automation (critical commands) and read by dashboards."},
    {"name": "raw data files", "description": "The raw data files the instruments write, "
     "registered one by one or in bulk."},
    {"name": "raw data packages", "description": "Packages of raw data files, built then "
     "finalized for staging."},
    {"name": "staging", "description": "Transfers of complete packages to a destination, "
     "reported by the transfer agent."},
    {"name": "commands", "description": "Where a critical command stands: accepted, applied "
     "or rejected."},
    {"name": "operations", "description": "Health, readiness and metrics for the people who "
     "run the ledger."},
    {"name": "observation results", "description": "Observation results: their tasks, "
     "contributing assets and processing runs, and what the scheduler builds next."},
    {"name": "audit", "description": "Read-only audit tools: the request audit log and the "
     "event log's history (auditor role)."},
    {"name": "MAST search", "description": "Searches of the MAST archive (never journaled: "
     "they change nothing)."},
    {"name": "MAST downloads", "description": "Download jobs from the MAST archive: "
     "requested, paused, resumed and cancelled as critical commands."},
    {"name": "processing jobs", "description": "Ingest, process and catalog jobs run by the "
     "processing workers, with their steps, leases and outputs."},
    {"name": "data products", "description": "The data products the processing jobs build, "
     "their lineage and their files."},
    {"name": "live stream", "description": "The live stream of the ledger's events "
     "(server-sent events)."},
    {"name": "dashboard", "description": "The night view: the page and its summary."},
]

#: Descriptions of operations whose decorators carry only a summary, by (method, path).
OPERATIONS: dict[tuple[str, str], str] = {
    ("get", "/auth/me"): "The account the bearer token acts as: its name, kind and roles. "
    "Any signed-in account may call it.",
    ("post", "/auth/register"): f"Creates a user account (a person at a dashboard) with its "
    f"roles. {ADMIN}",
    ("get", "/auth/accounts"): f"Lists every account, users and service accounts. {ADMIN}",
    ("put", "/auth/accounts/{id}/disabled"): "Disables or enables an account: its tokens stop "
    f"or resume working. {ADMIN}",
    ("post", "/auth/service-accounts"): "Creates a service account for telescope automation "
    f"or an agent; tokens are issued separately. {ADMIN}",
    ("post", "/auth/service-accounts/{id}/tokens"): "Issues a long-lived API token for a "
    f"service account; the token is shown once, in this answer. {ADMIN}",
    ("get", "/auth/service-accounts/{id}/tokens"): "Lists a service account's tokens (never "
    f"their secrets). {ADMIN}",
    ("delete", "/auth/service-accounts/{id}/tokens/{token_id}"): "Revokes a service token: "
    "refused at once by this process, by others within OBSLEDGER_AUTH_REFRESH_S. "
    f"{ADMIN}",
    ("post", "/executed_obs_units/start"): "Records that the telescope started executing a "
    f"planned obs unit. {WRITER} {COMMAND}",
    ("put", "/executed_obs_units/{id}/finish"): "Records how an execution ended: success, "
    f"failed or aborted. {WRITER} {COMMAND}",
    ("get", "/raw_data_files"): f"Raw data files, filtered and paged (`Link` header). {READER} "
    f"{SMART}",
    ("post", "/raw_data_package"): "Creates a raw data package, optionally registering its "
    f"files. {WRITER} {COMMAND}",
    ("post", "/raw_data_package/{id}/files"): "Adds registered raw data files to a package "
    f"still building. {WRITER} {COMMAND}",
    ("put", "/raw_data_package/{id}/finalize"): "Finalizes a package (building -> complete), "
    f"refused beyond the size limit. {WRITER} {COMMAND}",
    ("post", "/staging/stage"): "Requests that complete packages be staged to a destination. "
    f"{WRITER} {COMMAND}",
    ("put", "/staging/{id}/progress"): "The transfer agent reports a staging request's "
    f"progress or outcome. {WRITER} {COMMAND}",
    ("delete", "/staging/{id}"): "Cancels a staging request that has not completed. "
    f"{OPERATOR} {COMMAND}",
    ("get", "/raw_data_package/counts"): f"Raw data packages by status, with their bytes. "
    f"{READER} {COUNT}",
    ("get", "/staging/counts"): f"Staging requests by status, with their bytes. {READER} "
    f"{COUNT}",
    ("get", "/executed_obs_units/counts"): f"Executed obs units by status and instrument. "
    f"{READER} {COUNT}",
    ("get", "/raw_data_files/counts"): "Raw data files by instrument and file type, with "
    f"their bytes and how many are packaged. {READER} {COUNT}",
    ("get", "/mast/download/counts"): f"MAST download jobs by status, with their bytes. "
    f"{READER} {COUNT}",
    ("get", "/ops/jobs/counts"): f"Processing jobs by status and kind. {READER} {COUNT}",
    ("get", "/products/counts"): "Data products (built ones too) by status and kind, with "
    f"their bytes. {READER} {COUNT}",
    ("get", "/executed_obs_units"): "Executed obs units for dashboards, filtered and paged "
    f"(`Link` header). {READER} {SMART}",
    ("get", "/executed_obs_units/execution/{id}"): f"One execution by its id. {READER} {SMART}",
    ("get", "/executed_obs_units/{obs_unit_id}"): "Every execution of a planned obs unit. "
    f"{READER} {SMART}",
    ("get", "/raw_data_files/{id}"): f"One raw data file. {READER} {SMART}",
    ("get", "/raw_data_package/{id}"): f"A raw data package with its files. {READER} {SMART}",
    ("get", "/staging/status/{id}"): f"Where a staging request stands. {READER} {SMART}",
    ("get", "/commands/{command_id}"): "Where a critical command stands: accepted, applied "
    f"(with its log position) or rejected (with the reason). {READER}",
    ("get", "/health"): "Journal depth, store reachability and projection lag, for the "
    "people and monitors who run the ledger; no role is required.",
    ("get", "/metrics"): "Prometheus metrics in the text exposition format: commands, journal "
    "depth, latencies and lags, for the Prometheus scraper; no role is required.",
    ("post", "/observation_results/{id}/dispatch"): "Dispatches a new task (an execution "
    f"attempt) for the result. {WRITER} {COMMAND}",
    ("put", "/observation_results/{id}/tasks/{task_id}"): "Records a task's outcome: "
    f"succeeded, partial, failed or canceled. {WRITER} {COMMAND}",
    ("post", "/observation_results/{id}/cancel"): "Cancels the result from any non-final "
    f"state, with its open task. {OPERATOR} {COMMAND}",
    ("post", "/observation_results/{id}/assets"): "Records a contributing asset: bumps the "
    f"result's assets_revision and debounces its rebuild. {WRITER} {COMMAND}",
    ("post", "/observation_results/{id}/runs"): "Starts a processing run of the result's "
    f"current assets_revision. {WRITER} {COMMAND}",
    ("put", "/observation_results/{id}/runs/{run_id}"): "Ends the run in progress: completed "
    f"(with outputs), failed, blocked or skipped. {WRITER} {COMMAND}",
    ("get", "/observation_results"): "Observation results for dashboards, filtered and paged "
    f"(`Link` header). {READER} {SMART}",
    ("get", "/observation_results/due"): "What the scheduler builds next, and when. "
    f"{READER}",
    ("get", "/observation_results/counts"): "Results by fulfillment and data-product status. "
    f"{READER} {COUNT}",
    ("get", "/observation_results/{id}"): f"One result with its tasks, runs and outputs. "
    f"{READER} {SMART}",
    ("post", "/mast/download/pause/{job_id}"): "Pauses a download job; its partial files and "
    f"checkpoints stay. {OPERATOR} {COMMAND}",
    ("post", "/mast/download/resume/{job_id}"): "Resumes a paused or failed download job "
    f"from its last checkpoints. {OPERATOR} {COMMAND}",
    ("get", "/mast/download/resumable"): "Download jobs that can be resumed (paused or "
    f"failed), paged (`Link` header). {READER}",
    ("get", "/mast/download/jobs"): "Download jobs, newest first, paged (`Link` header). "
    f"{READER} {SMART}",
    ("delete", "/mast/download/{job_id}"): "Cancels a download job; its partial files are "
    f"removed after the retention. {OPERATOR} {COMMAND}",
    ("get", "/ops/algorithms"): "The registered algorithms: name, version, summary, "
    f"parameter schema and steps. {READER}",
    ("get", "/ops/jobs"): "Processing jobs, newest first, paged (`Link` header); requested "
    f"ones not yet projected lead the first page. {READER} {SMART}",
    ("get", "/ops/jobs/{id}"): "One processing job: steps, progress, timings, lease, outputs "
    f"and errors. {READER} {SMART}",
    ("get", "/products/{id}"): "One data product: type, size, checksum, metrics, status and "
    f"inputs. {READER}",
    ("get", "/products/{id}/download"): "Downloads a product: a presigned URL in JSON (S3 object "
    f"store), or the file itself streamed (local object store). {READER}",
    ("get", "/dashboard"): "The night at a glance, an HTML page that signs in with an "
    "existing account. No role is needed to load the page; its summary needs a reading "
    "role.",
}


def describe(schema: dict[str, Any]) -> None:
    """Give the operations of ``schema`` their missing descriptions."""
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            text = OPERATIONS.get((method, path))
            if text and not operation.get("description"):
                operation["description"] = text
