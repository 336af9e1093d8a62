"""Processing runs of observation results go through the processing workers.

``ProcessingRunManager`` follows the event log:

- ``ObservationResult.RunStarted`` by the results scheduler (runs started through
  ``POST /observation_results/{id}/runs`` are their sender's to end): a ``process`` job
  for the run (id ``job_id_of_run(run_id)``), its inputs the result's assets that are raw
  data files, the default algorithm (``processing_default_algorithm``, latest version, default
  parameters), catalogued when ``processing_catalog_runs``; a result without raw data files
  (in the event store) ends the run ``skipped``;
- ``ProcessingJob.Succeeded`` / ``Failed`` / ``Cancelled`` of a run's job: the run ends
  (``observation_result.end_run``) ``completed`` with the products as outputs, or ``failed``
  with the job's reason; the result becomes READY (or STALE, FAILED) as the domain decides.

Both act through critical commands with deterministic idempotency keys, like the results'
process manager, so a crash between sending and recording the position repeats commands the
journal answers from its record.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Notification
from sqlalchemy import Engine

from commands.algorithms import algorithm
from commands.models import Checksum
from commands.processing import ProcessingCommand, RequestProcessingJob
from commands.results import EndProcessingRunRequest, ProductOutput, ResultCommand
from commands.service import CommandService
from domain.errors import DomainRejection
from domain.processing import (
    DataProduct,
    JobKind,
    ProcessingJob,
    data_product_id,
    job_id_of_run,
)
from domain.results import ObservationResult
from infra.event_store import EventStore
from infra.settings import Settings
from workers.process_manager import LogProcessManager, Send
from workers.result_automation import ACTOR as SCHEDULER

log = logging.getLogger("obsledger.processing")

ACTOR = "obsledger:processing"
RAW_ASSET = "raw_data_file:"



def raw_files(assets: set[str]) -> list[UUID]:
    """The raw data files among a result's assets (``raw_data_file:<uuid>``)."""
    out = []
    for a in assets:
        if a.startswith(RAW_ASSET):
            try:
                out.append(UUID(a[len(RAW_ASSET):]))
            except ValueError:
                continue
    return out


class ProcessingRunManager(LogProcessManager):
    """Runs started → process jobs; those jobs ended → runs ended."""

    name = "processing-run-manager"
    POSITION = "process_manager:processing"
    ACTOR = ACTOR

    def __init__(self, store: EventStore, engine: Engine, commands: CommandService,
                 settings: Settings, page_size: int = 500, interval: float = 0.5) -> None:
        super().__init__(store, engine, commands, page_size, interval)
        self.settings = settings

    def react(self, notification: Notification) -> list[Send]:
        name = notification.topic.rpartition(":")[2]
        if name == "ObservationResult.RunStarted":
            return self._run_started(self.store.decode(notification))
        if name in ("ProcessingJob.Succeeded", "ProcessingJob.Failed",
                    "ProcessingJob.Cancelled"):
            return self._job_ended(self.store.decode(notification))
        return []

    def _run_started(self, e: Any) -> list[Send]:
        result = self.store.get(e.originator_id)
        if not isinstance(result, ObservationResult):
            return []
        run_id = UUID(str(e.run_id))
        if e.actor != SCHEDULER or str(result.current_processing_run_id) != str(run_id):
            # a run someone else started (they end it), or one that ended already (an old
            # event, read again from the start)
            return []
        files = sorted(self.store.existing(raw_files(result.assets)))
        correlation = f"processing_run:{run_id}"
        if not files:
            return [(ResultCommand.OBSERVATION_RESULT_END_RUN,
                     EndProcessingRunRequest(end="skipped", error=None),
                     {"id": result.id, "run_id": run_id}, f"pm:run:{run_id}:end", correlation)]
        name = self.settings.processing_default_algorithm
        try:
            version = algorithm(name).version
        except DomainRejection as exc:
            return [(ResultCommand.OBSERVATION_RESULT_END_RUN,
                     EndProcessingRunRequest(end="failed", error=str(exc)),
                     {"id": result.id, "run_id": run_id}, f"pm:run:{run_id}:end", correlation)]
        catalog = self.settings.processing_catalog_runs
        request = RequestProcessingJob(
            id=job_id_of_run(run_id), kind=JobKind.PROCESS.value, file_ids=files,
            algorithm=name, algorithm_version=version, parameters={}, result_id=result.id,
            run_id=run_id, catalog=catalog, publish=catalog, archive=False,
            max_attempts=self.settings.processing_max_attempts)
        return [(ProcessingCommand.PROCESSING_JOB_REQUEST, request, {}, f"pm:run:{run_id}:job",
                 correlation)]

    def _job_ended(self, e: Any) -> list[Send]:
        job = self.store.get(e.originator_id)
        if not isinstance(job, ProcessingJob) or job.run_id is None or job.result_id is None:
            return []
        run_id = job.run_id
        path = {"id": job.result_id, "run_id": run_id}
        key, correlation = f"pm:run:{run_id}:end", f"processing_run:{run_id}"
        if job.status != "succeeded":
            what = "cancelled" if job.status == "cancelled" else "failed"
            request = EndProcessingRunRequest(
                end="failed", error=f"processing job {job.id} {what}: {job.reason}"[:4000])
            return [(ResultCommand.OBSERVATION_RESULT_END_RUN, request, path, key, correlation)]
        outputs = []
        for o in job.outputs:
            product = self.store.get(data_product_id(job.id, o["kind"]))
            outputs.append(ProductOutput(
                name=o["name"], kind=o["kind"], uri=o.get("uri"), size=o["size"],
                checksum=Checksum(algorithm="sha256", value=o["sha256"]),
                metadata={"product_id": str(data_product_id(job.id, o["kind"])),
                          "job_id": str(job.id), "key": o["key"],
                          "media_type": o["media_type"], "metrics": o.get("metrics") or {},
                          "status": product.status if isinstance(product, DataProduct)
                          else "built"}))
        return [(ResultCommand.OBSERVATION_RESULT_END_RUN,
                 EndProcessingRunRequest(end="completed", outputs=outputs), path, key,
                 correlation)]
