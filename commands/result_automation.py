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
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import Engine, select, update

from commands.models import (
    ContributeAssetRequest,
    StartProcessingRunRequest,
    TaskOutcomeRequest,
)
from commands.service import CommandService
from domain.errors import DomainRejection
from infra.event_store import EventStore
from infra.logs import command_context
from infra.read_model_db import insert_missing
from infra.worker import PollingWorker
from projections.tables import build_positions, build_tables
from queries.service import QueryService

log = logging.getLogger("obsledger.results")

ACTOR = "obsledger:results"
#: How an executed obs unit's final status ends the task it carries out.
TASK_OUTCOME_OF_EXECUTION = {"success": "succeeded", "failed": "failed", "aborted": "canceled"}


async def _send(commands: CommandService, command_type: str, request: Any,
                path: dict[str, Any], key: str, correlation_id: str) -> None:
    with command_context(key, correlation_id):
        try:
            await commands.submit(command_type, request, path=path, actor=ACTOR,
                                  correlation_id=correlation_id, idempotency_key=key)
        except DomainRejection as e:  # refused at once (unknown or final): nothing to do
            log.info("%s %s not sent: %s", command_type, path, e)


class ResultsProcessManager(PollingWorker):
    """Raw data files → assets of results; finished executions → task outcomes."""

    name = "results-process-manager"
    POSITION = "process_manager:results"

    def __init__(self, store: EventStore, engine: Engine, queries: QueryService,
                 commands: CommandService, page_size: int = 500,
                 interval: float = 0.5) -> None:
        super().__init__(interval)
        self.store = store
        self.engine = engine
        self.queries = queries
        self.commands = commands
        self.page_size = page_size
        self.positions = build_positions()
        self.tasks = build_tables().observation_result_tasks
        with engine.begin() as conn:
            self.positions.create(conn, checkfirst=True)
            insert_missing(conn, self.positions, {
                "name": self.POSITION, "position": 0, "generation": "-",
                "updated_at": datetime.now(UTC)})

    def position(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(self.positions.c.position).where(
                self.positions.c.name == self.POSITION)).scalar_one())

    def _record_position(self, position: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(self.positions).where(self.positions.c.name == self.POSITION)
                         .values(position=position, updated_at=datetime.now(UTC)))

    def once(self) -> int:
        """Handle the next page of events the read models already show; return its size."""
        start = self.position()
        horizon = self.queries.read_model_position()  # the tasks it looks up are projected
        if horizon <= start:
            return 0
        notifications = [n for n in self.store.select_notifications(start, self.page_size)
                         if n.id <= horizon]
        if not notifications:
            return 0
        sends: list[tuple[str, Any, dict[str, Any], str, str]] = []
        for n in notifications:
            name = n.topic.rpartition(":")[2]
            if name == "RawDataFile.Registered":
                sends.extend(self._assets(self.store.decode(n)))
            elif name == "ExecutedObsUnit.Finished":
                sends.extend(self._outcomes(self.store.decode(n)))
        if sends:
            asyncio.run(self._send_all(sends))
        self._record_position(notifications[-1].id)
        return len(notifications)

    async def _send_all(self, sends: list[tuple[str, Any, dict[str, Any], str, str]]) -> None:
        for command_type, request, path, key, correlation in sends:
            await _send(self.commands, command_type, request, path, key, correlation)

    def _tasks_of(self, executed_obs_unit_id: str, open_only: bool) -> list[dict[str, Any]]:
        t = self.tasks
        q = select(t.c.id, t.c.result_id).where(t.c.executed_obs_unit_id == executed_obs_unit_id)
        if open_only:
            q = q.where(t.c.status == "open")
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(q)]

    def _assets(self, e: Any) -> list[tuple[str, Any, dict[str, Any], str, str]]:
        if e.executed_obs_unit_id is None:
            return []
        asset = f"raw_data_file:{e.originator_id}"
        return [("observation_result.contribute_asset", ContributeAssetRequest(asset_id=asset),
                 {"id": UUID(task["result_id"])},
                 f"pm:asset:{e.originator_id}:{task['result_id']}", e.correlation_id)
                for task in self._tasks_of(str(e.executed_obs_unit_id), open_only=False)]

    def _outcomes(self, e: Any) -> list[tuple[str, Any, dict[str, Any], str, str]]:
        outcome = TASK_OUTCOME_OF_EXECUTION.get(e.status)
        if outcome is None:
            return []
        return [("observation_result.report_task",
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
            await _send(self.commands, "observation_result.start_run",
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

    def catch_up(self) -> str:
        """Handle every event the read models show, then start the runs due now."""
        handled = 0
        while n := self.process_manager.once():
            handled += n
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
