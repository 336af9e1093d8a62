"""What links observation results to the rest of the system, without a human in between.

- ``ResultsProcessManager`` follows the event log (behind the read models, which it consults):
  a raw data file registered for an executed obs unit that carries out a task contributes an
  asset to that task's result; an executed obs unit finished while its task is open ends the
  task (success → succeeded, failed → failed, aborted → canceled).
- ``ResultsScheduler`` starts a processing run for every dirty result whose debounce has passed
  and that has no run in progress.

Both act only through critical commands with deterministic idempotency keys, so a crash between
sending the commands and recording how far they got repeats commands that the journal answers
from its record: each effect is applied exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any
from uuid import UUID

from eventsourcing.persistence import Notification
from sqlalchemy import Engine, select

from commands.results import (
    ContributeAssetRequest,
    ResultCommand,
    StartProcessingRunRequest,
    TaskOutcomeRequest,
)
from commands.service import CommandService
from infra.event_store import EventStore
from infra.worker import PollingWorker
from projections.tables import build_tables
from queries.service import QueryService
from workers.process_manager import LogProcessManager, Send, send_command

log = logging.getLogger("obsledger.results")

ACTOR = "obsledger:results"
#: How an executed obs unit's final status ends the task it carries out.
TASK_OUTCOME_OF_EXECUTION = {"success": "succeeded", "failed": "failed", "aborted": "canceled"}


class ResultsProcessManager(LogProcessManager):
    """Raw data files → assets of results; finished executions → task outcomes."""

    name = "results-process-manager"
    POSITION = "process_manager:results"
    ACTOR = ACTOR  # the module's: the scheduler sends as the same actor

    def __init__(self, store: EventStore, engine: Engine, queries: QueryService,
                 commands: CommandService, page_size: int = 500,
                 interval: float = 0.5) -> None:
        super().__init__(store, engine, commands, page_size, interval)
        self.queries = queries
        self.tasks = build_tables().observation_result_tasks

    def horizon(self) -> int:
        return self.queries.read_model_position()  # the tasks it looks up are projected

    def react(self, notification: Notification) -> list[Send]:
        name = notification.topic.rpartition(":")[2]
        if name == "RawDataFile.Registered":
            return self._assets(self.store.decode(notification))
        if name == "ExecutedObsUnit.Finished":
            return self._outcomes(self.store.decode(notification))
        return []

    def _tasks_of(self, executed_obs_unit_id: str, open_only: bool) -> list[dict[str, Any]]:
        t = self.tasks
        q = select(t.c.id, t.c.result_id).where(t.c.executed_obs_unit_id == executed_obs_unit_id)
        if open_only:
            q = q.where(t.c.status == "open")
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def _assets(self, e: Any) -> list[Send]:
        if e.executed_obs_unit_id is None:
            return []
        asset = f"raw_data_file:{e.originator_id}"
        return [(ResultCommand.OBSERVATION_RESULT_CONTRIBUTE_ASSET,
                 ContributeAssetRequest(asset_id=asset),
                 {"id": UUID(task["result_id"])},
                 f"pm:asset:{e.originator_id}:{task['result_id']}", e.correlation_id)
                for task in self._tasks_of(str(e.executed_obs_unit_id), open_only=False)]

    def _outcomes(self, e: Any) -> list[Send]:
        outcome = TASK_OUTCOME_OF_EXECUTION.get(e.status)
        if outcome is None:
            return []
        return [(ResultCommand.OBSERVATION_RESULT_REPORT_TASK,
                 TaskOutcomeRequest(outcome=outcome, finished_at=e.end_time,  # type: ignore[arg-type]
                                    executed_obs_unit_id=e.originator_id),
                 {"id": UUID(task["result_id"]), "task_id": UUID(task["id"])},
                 f"pm:finish:{e.originator_id}:{task['id']}", e.correlation_id)
                for task in self._tasks_of(str(e.originator_id), open_only=True)]


class ResultsScheduler(PollingWorker):
    """Starts a processing run for each due result (debounce passed, nothing in progress)."""

    name = "results-scheduler"

    def __init__(self, queries: QueryService, commands: CommandService,
                 clock: Callable[[], datetime], interval: float = 5.0,
                 batch: int = 500) -> None:
        super().__init__(interval)
        self.queries = queries
        self.commands = commands
        self.clock = clock
        self.batch = batch
        self.sent = 0  # start-run commands sent (repeats of a stale read included)

    def once(self) -> int:
        """Start runs for what is due now; return how many were sent (0 = nothing due)."""
        due = [r for r in self.queries.due_results(self.clock(), self.batch) if r["due"]]
        if not due:
            return 0
        # one key per dirty window and attempt: a stale read model asks again, and the
        # journal answers the repeat from its record
        asyncio.run(self._send_all([
            (str(r["id"]), f"scheduler:{r['id']}:{r['assets_revision']}:{r['failed_runs']}")
            for r in due]))
        self.sent += len(due)
        return 0 if len(due) < self.batch else len(due)

    async def _send_all(self, runs: list[tuple[str, str]]) -> None:
        for result_id, key in runs:
            await send_command(self.commands, ACTOR, ResultCommand.OBSERVATION_RESULT_START_RUN,
                               StartProcessingRunRequest(), {"id": UUID(result_id)}, key, key)


class ResultsAutomation:
    """The process manager and the scheduler, started and stopped together."""

    def __init__(self, process_manager: ResultsProcessManager,
                 scheduler: ResultsScheduler, runs: PollingWorker | None = None) -> None:
        self.process_manager = process_manager
        self.scheduler = scheduler
        self.runs = runs  # processing runs → processing jobs → ended runs

    def start(self) -> None:
        self.process_manager.start()
        self.scheduler.start()
        if self.runs is not None:
            self.runs.start()

    def stop(self) -> None:
        if self.runs is not None:
            self.runs.stop()
        self.scheduler.stop()
        self.process_manager.stop()

    def catch_up(self, progress: Callable[[int], None] | None = None) -> str:
        """Handle every event the read models show, then start the runs due now;
        ``progress`` is told each position the process manager reached."""
        handled = 0
        while n := self.process_manager.once():
            handled += n
            if progress is not None:
                progress(self.process_manager.position())
        started = self.scheduler.once() or self.scheduler.sent
        if self.runs is not None:
            while self.runs.once():
                pass
        return f"{handled} events handled, {started} processing runs requested"

    def report(self) -> dict[str, Any]:
        return {"process_manager_position": self.process_manager.position(),
                "runs_requested": self.scheduler.sent,
                "last_error": self.process_manager.last_error or self.scheduler.last_error
                or (self.runs.last_error if self.runs is not None else None)}
