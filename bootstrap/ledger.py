"""Wiring: the journal, the event store, the dispatcher, the projector and the queries."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar, cast

from sqlalchemy import Engine

from bootstrap.scaleout import Coordinator
from commands.dispatcher import Dispatcher
from commands.downloads import DownloadCommand
from commands.models import utcnow
from commands.service import CommandService
from domain.obs_units import ExecutionStatus
from domain.processing import JobStatus
from domain.staging import StagingStatus
from infra.accounts import AccountStore, Authenticator
from infra.audit_chain import AnchorLog, ChainKeeper
from infra.availability import (
    EVENT_STORE,
    READ_MODEL_DB,
    UNAVAILABLE_ERRORS,
    Availability,
    Bounded,
    unavailable_part,
)
from infra.event_store import EventStore, StoreUnavailable
from infra.journal import Journal, JournalEntry
from infra.journal_slots import JournalSlot, PeerJournals
from infra.kafka_relay import AnchorPublisher, EventRelay, broker_reachable
from infra.metrics import Metrics, State, build_commit, build_version, gauge
from infra.object_store import ObjectStore, object_store_from_settings
from infra.read_model_db import create_probe_engine, create_read_model_engine, select_one
from infra.request_audit import RequestAuditLog
from infra.schema import migrate
from infra.settings import Settings
from infra.tokens import TokenSigner
from projections.kafka_projector import KafkaProjector
from projections.projector import Projector
from queries.downloads import DownloadQueries
from queries.night import NightQueries
from queries.processing import ProcessingQueries
from queries.service import QueryService
from queries.stream import ReadModelFeed
from workers.download_automation import Downloader, same_files_precheck
from workers.processing_automation import ProcessingRunManager
from workers.processing_worker import ProcessingWorker
from workers.result_automation import ResultsAutomation, ResultsProcessManager, ResultsScheduler

log = logging.getLogger("obsledger")
T = TypeVar("T")

#: The cyclic garbage collector's thresholds in an obsledger process. With Python's defaults
#: (700, 10, 10) a bulk registration of 5,000 files (each an aggregate, an event and a stored
#: event, none of them cyclic garbage) set off ~2,200 collections, a full one every ~5,000
#: files, and spent a third of the dispatch in them; with these, a tenth as many and a quarter
#: of the time (bench/commands.py --only bulk).
GC_THRESHOLDS = (20_000, 20, 20)

#: How long the metrics' counts by status (read models) are reused between scrapes.
STATUS_COUNTS_MAX_AGE_S = 5.0


class Ledger:
    """Everything one obsledger process runs. The store may be down at start: commands are
    still accepted into the journal, and the workers start once the store answers."""

    def __init__(self, settings: Settings, *, workers: bool | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self.settings = settings
        self.clock = clock  # the dispatcher's (tests of the results' debounce set it)
        settings.prepare_dirs()
        # several API processes (journal slots): each its own journal, the others' read
        self.slot: JournalSlot | None = None
        self.peers: PeerJournals | None = None
        if settings.journal_slots:
            self.slot = JournalSlot.claim(settings.journal_file)
            self.peers = PeerJournals(settings.journal_file, self.slot.path)
        self.journal = Journal(self.slot.path if self.slot else settings.journal_file)
        self.coordinator: Coordinator | None = None
        self.engine = create_read_model_engine(settings.read_model_database_url,
                                               settings.postgres_connect_timeout)
        self.availability = Availability()
        self._probe_engines: list[Engine] = []
        self._bounded: dict[str, Bounded[Any]] = {}
        self.queries = QueryService(self.engine, self.journal, self.availability)
        self.auth = Authenticator(AccountStore(self.engine),
                                  TokenSigner(settings.signing_secret(), settings.token_ttl_s),
                                  refresh_s=settings.auth_refresh_s,
                                  cache=settings.accounts_cache_file)
        self.request_audit = RequestAuditLog(self.engine, settings.request_audit_flush_s,
                                             settings.request_audit_buffer)
        self.downloads = DownloadQueries(self.queries)
        self.processing = ProcessingQueries(self.queries)
        self.night = NightQueries(self.queries, self.downloads, self.processing)
        self._objects: ObjectStore | None = None
        self._objects_lock = threading.Lock()
        self._objects_status: tuple[float, dict[str, Any]] | None = None
        self.processing_worker: ProcessingWorker | None = None
        self.workers = settings.embedded_workers if workers is None else workers
        self.store: EventStore | None = None
        self.dispatcher: Dispatcher | None = None
        self.projector: Projector | None = None
        self.relay: EventRelay | None = None
        self.results: ResultsAutomation | None = None
        self.chain: ChainKeeper | None = None
        self.downloader: Downloader | None = None
        self._anchor_publisher: AnchorPublisher | None = None
        self.metrics = Metrics()
        self.metrics.set_build(version=build_version(), commit=build_commit(),
                               store=settings.store)
        self.metrics.watch(self.metrics_state)
        self._status_counts: tuple[float, State] | None = None
        # with embedded workers this process applies what it accepts: keep the objects
        self.commands = CommandService(self.journal, None, self.metrics,
                                       keep_accepted=self.workers,
                                       availability=self.availability, peers=self.peers)
        self.commands.prechecks[DownloadCommand.DOWNLOAD_JOB_REQUEST] = same_files_precheck(
            self.downloads, settings)
        self._stopping = threading.Event()
        # the live stream (GET /stream): started by its first subscriber
        self.feed = ReadModelFeed(self.journal, self.projected_position, self.download_progress)
        self._connect_store()

    def connect(self, timeout: float) -> bool:
        """Retry connecting the event store (and wiring the workers) for up to ``timeout``
        seconds: a database that is starting, or two processes creating the same tables at
        once ("tuple concurrently updated"), is a moment's wait, not a failure."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while not self._connect_store():
            if time.monotonic() + delay > deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
        return True

    def _connect_store(self) -> bool:
        if self.store is not None:
            return True
        try:
            self.store = EventStore(self.settings)
        except StoreUnavailable as e:
            log.warning("event store unavailable at start: %s", e)
            return False
        try:
            migrate(self.engine)  # the tables the log cannot rebuild, at the head revision
            if self.settings.projection_source == "kafka":
                self.projector = KafkaProjector(self.store, self.engine, self.settings)
            else:
                self.projector = Projector(self.store, self.engine,
                                           self.settings.projection_page_size,
                                           self.settings.projection_poll_s)
            self.projector.rebuild_workers = self.settings.rebuild_workers
            if self.settings.kafka_bootstrap:
                self.relay = EventRelay(self.store, self.engine, self.settings)
            if self.settings.kafka_bootstrap:
                self._anchor_publisher = AnchorPublisher(self.settings)
            self.chain = ChainKeeper(self.store, self.engine,
                                     AnchorLog(self.settings.anchors_file),
                                     anchor_every=self.settings.audit_anchor_every,
                                     publish=self._anchor_publisher)
            self.results = ResultsAutomation(
                ResultsProcessManager(self.store, self.engine, self.queries, self.commands),
                ResultsScheduler(self.queries, self.commands, self.clock or utcnow,
                                 interval=self.settings.results_scheduler_interval_s),
                ProcessingRunManager(self.store, self.engine, self.commands, self.settings))
        except Exception as e:  # the database went away again: retry later, not half-wired
            log.warning("read-model database unavailable at start: %s", e)
            self.store.close()
            self.store = None
            self.projector = self.relay = self.chain = self.results = None
            return False
        self.commands.store = self.store
        self.downloader = Downloader(self.store, self.downloads, self.commands, self.settings,
                                     self.metrics)
        self.processing_worker = ProcessingWorker(self.store, self.processing, self.commands,
                                                  self.settings, self.objects)
        self.dispatcher = Dispatcher(self.journal, self.store, self.settings,
                                     on_applied=self._applied, clock=self.clock,
                                     metrics=self.metrics, accepted=self.commands.accepted,
                                     peers=self.peers)
        self.journal.on_append(self.dispatcher.wake)
        self.feed.attach(self.store, self.projector)
        return True

    def projected_position(self) -> int:
        """The read models' position: this process's projector's when it runs here, else
        read from the read-model database."""
        if self.projector is not None and self.workers and self.settings.embedded_projector \
                and self.leading:
            return self.projector.position
        return self.queries.read_model_position()

    def download_progress(self) -> list[dict[str, Any]]:
        """The live progress of the download jobs this process's downloader runs."""
        return self.downloader.progress.jobs() if self.downloader is not None else []

    @property
    def objects(self) -> ObjectStore:
        """The object store of raw data, intermediate files and products (made on first
        use: an S3 store checks its buckets then)."""
        with self._objects_lock:
            if self._objects is None:
                self._objects = object_store_from_settings(self.settings)
            return self._objects

    def object_store_status(self, max_age_s: float = 10.0) -> dict[str, Any]:
        """Whether the object store answers (``check()``), remembered for ``max_age_s``: an
        unreachable S3 store takes its connect timeouts to say so."""
        now = time.monotonic()
        cached = self._objects_status
        if cached is not None and now - cached[0] < max_age_s:
            return cached[1]
        status: dict[str, Any] = {"kind": self.settings.object_store, "reachable": True,
                                  "error": None}
        try:
            self.objects.check()
        except Exception as e:  # ObjectStoreUnavailable, or a bad configuration
            status.update(reachable=False, error=str(e))
        self._objects_status = (now, status)
        return status

    def event_store(self) -> EventStore:
        """The event store for a request: 503 at once (``StoreUnavailable``) when it is not
        connected or known not to answer, instead of waiting on its pool."""
        if self.store is None or self.availability.down(EVENT_STORE):
            raise StoreUnavailable("the event store does not answer")
        return self.store

    # -- availability --------------------------------------------------------------------
    def start_probes(self) -> None:
        """Check every ``health_probe_s`` that the event store and the read-model database
        answer, each on a connection of its own with short timeouts (``infra.availability``).
        """
        s = self.settings
        checks: dict[str, Callable[[], None]] = {}
        for part, url in ((EVENT_STORE, s.event_store_database_url),
                          (READ_MODEL_DB, s.read_model_database_url)):
            if url.startswith("sqlite"):  # a local file: the store's own engine or ping
                checks[part] = self._check_sqlite_event_store if part == EVENT_STORE \
                    else partial(select_one, self.engine)
                continue
            engine = create_probe_engine(url, s.postgres_connect_timeout)
            self._probe_engines.append(engine)
            checks[part] = partial(select_one, engine)
        self.availability.start_probes(checks, s.health_probe_s)

    def _check_sqlite_event_store(self) -> None:
        if self.store is not None and not self.store.ping():
            raise StoreUnavailable("the event store does not answer")

    def bounded(self, name: str, fn: Callable[[], T]) -> T | None:
        """``fn()`` within ``health_budget_s`` (None when it takes longer: a store that
        hangs), one call at a time (``infra.availability.Bounded``)."""
        b = self._bounded.get(name)
        if b is None:
            b = self._bounded[name] = Bounded(fn, self.settings.health_budget_s, name)
        return cast("T | None", b())

    def command_entry(self, command_id: str) -> JournalEntry | None:
        """A journaled command: in this process's journal, else in another API process's
        (journal slots)."""
        entry = self.journal.get(command_id)
        if entry is None and self.peers is not None:
            entry = self.peers.get(command_id)
        return entry

    def scaleout_report(self) -> dict[str, Any] | None:
        """This process among several (journal slots): its slot, whether it leads, what the
        other journals still hold, how many orphaned journals it applied (None: alone)."""
        if self.slot is None or self.peers is None:
            return None
        c = self.coordinator
        return {"journal_slot": self.slot.number, "journal_file": self.slot.path.name,
                "leader": bool(c and c.leader), "demoted": bool(c and c.demoted),
                "other_journals_depth": self.peers.depth(),
                "adopted_journals": c.adopted if c else 0}

    @property
    def leading(self) -> bool:
        """Whether this process runs the workers there is one of (always, alone)."""
        return self.coordinator is None or self.coordinator.leader

    def applied(self, position: int) -> None:
        self._applied(position)

    def _applied(self, position: int) -> None:
        """The dispatcher applied commands up to ``position``: wake who follows the log."""
        if self.projector is not None:
            self.projector.wake(position)
        if self.relay is not None:
            self.relay.wake(position)

    # -- operations ------------------------------------------------------------------------
    def readiness(self) -> dict[str, Any]:
        """What ``GET /ready`` checks and the metrics' gauges report (``docs/OPERATIONS.md``).
        Figures read from the stores come within ``health_budget_s`` or are left out."""
        if self.store is None or self.availability.down(EVENT_STORE):
            return self._readiness(remote=False)  # nothing to read from the stores
        checks = self.bounded("readiness", self._readiness)
        return checks if checks is not None else self._readiness(remote=False)

    def _readiness(self, remote: bool = True) -> dict[str, Any]:
        oldest = self.journal.oldest_pending_received_at()
        checks: dict[str, Any] = {
            "store_reachable": False,
            "read_models_reachable": self.availability.up(READ_MODEL_DB),
            "journal_depth": self.journal.depth(),
            "oldest_pending_age_s": round((datetime.now(UTC) - oldest).total_seconds(), 3)
            if oldest else 0.0,
            "head_position": None, "projector_position": None,
            "projector_lag_events": None, "projector_lag_s": None,
            "relay": None,
            "downloader": self.downloader.report() if self.downloader else None,
        }
        store = self.store
        if store is None or self.availability.down(EVENT_STORE):
            return checks
        checks["store_reachable"] = True
        if not remote:
            return checks
        try:
            checks["head_position"] = store.max_position()
            if self.availability.down(READ_MODEL_DB):
                return checks
            position = self.queries.read_model_position()
            lag = store.lag(position)
            checks.update(projector_position=position, projector_lag_events=lag["events"],
                          projector_lag_s=lag["seconds"])
            if self.relay is not None:
                relay = self.relay.read_state()
                published = relay["sent_position"]
                relay_lag = store.lag(published)
                checks["relay"] = {
                    "published_position": published, "lag_events": relay_lag["events"],
                    "lag_s": relay_lag["seconds"],
                    "broker_reachable": broker_reachable(self.settings.kafka_bootstrap_servers),
                    "verified_position": relay["verified_position"],
                    "data_losses": relay["data_losses"],
                    "verified_age_s": round((datetime.now(UTC) - relay["verified_at"])
                                            .total_seconds(), 3)
                    if relay["verified_at"] else None}
        except UNAVAILABLE_ERRORS as e:  # went down since: say so, leave the figures out
            self.availability.failed(unavailable_part(e) or EVENT_STORE, e)
            return self._readiness(remote=False)
        return checks

    def metrics_state(self) -> State:
        c = self.readiness()
        state: State = {
            "obsledger_journal_depth": gauge(c["journal_depth"]),
            "obsledger_journal_oldest_pending_seconds": gauge(c["oldest_pending_age_s"]),
            "obsledger_event_store_up": gauge(int(c["store_reachable"])),
            "obsledger_read_models_up": gauge(int(c["read_models_reachable"])),
            "obsledger_event_store_head_position": gauge(c["head_position"]),
            "obsledger_request_audit_pending": gauge(self.request_audit.pending),
            "obsledger_request_audit_dropped": gauge(self.request_audit.dropped),
            "obsledger_request_audit_refused": gauge(self.request_audit.refused),
            "obsledger_request_audit_writer_up": gauge(int(self.request_audit.writer_up)),
            "obsledger_request_audit_writer_errors": gauge(self.request_audit.writer_errors),
        }
        if c["projector_lag_events"] is not None:
            # every read model is projected in the same transactions: one lag for all
            state["obsledger_projection_lag_events"] = gauge(c["projector_lag_events"])
            state["obsledger_projection_lag_seconds"] = gauge(c["projector_lag_s"])
        if c["relay"] is not None:
            state["obsledger_relay_lag_events"] = gauge(c["relay"]["lag_events"])
            state["obsledger_relay_lag_seconds"] = gauge(c["relay"]["lag_s"])
            state["obsledger_kafka_broker_up"] = gauge(int(c["relay"]["broker_reachable"]))
            state["obsledger_relay_sent_position"] = gauge(c["relay"]["published_position"])
            state["obsledger_relay_verified_position"] = gauge(c["relay"]["verified_position"])
            state["obsledger_relay_verified_age_seconds"] = gauge(c["relay"]["verified_age_s"])
            state["obsledger_relay_broker_data_losses"] = gauge(c["relay"]["data_losses"])
        if c["store_reachable"] and c["projector_position"] is not None:  # read in time
            state.update(self._chain_lag())
            state.update(self._read_model_counts())
        if c["downloader"] is not None:
            state["obsledger_download_active_jobs"] = gauge(c["downloader"]["active_jobs"])
            state["obsledger_download_files_in_flight"] = gauge(
                c["downloader"]["files_in_flight"])
        return state

    def _chain_lag(self) -> State:
        """How far the audit hash chain is behind the log (its keeper may be another
        process: the chained position is read from the table)."""
        if self.chain is None or self.store is None:
            return {}
        try:
            lag = self.store.lag(self.chain.read_position())
        except Exception as e:  # the read-model database is down: other gauges say so
            log.debug("audit chain lag unavailable: %s", e)
            return {}
        return {"obsledger_audit_chain_lag_events": gauge(lag["events"]),
                "obsledger_audit_chain_lag_seconds": gauge(lag["seconds"])}

    def _read_model_counts(self) -> State:
        """Rows by status of the read models an operator watches, from GROUP BY queries on
        indexed columns, remembered for ``STATUS_COUNTS_MAX_AGE_S`` (several scrapers cost
        one query). Every status the domain knows is present, 0 when no row has it."""
        now = time.monotonic()
        cached = self._status_counts
        if cached is not None and now - cached[0] < STATUS_COUNTS_MAX_AGE_S:
            return cached[1]
        state: State = {}
        for name, statuses, count in (
                ("obsledger_executed_obs_units", ExecutionStatus,
                 lambda: self.queries.status_counts("executed_obs_units")),
                ("obsledger_staging_requests", StagingStatus,
                 lambda: self.queries.status_counts("staging_requests")),
                ("obsledger_processing_jobs", JobStatus, self.processing.counts)):
            try:
                counts = {str(s): 0 for s in statuses} | count()
            except Exception as e:  # the read-model database is down: other gauges say so
                log.debug("%s unavailable: %s", name, e)
                continue
            state[name] = [((status,), float(n)) for status, n in sorted(counts.items())]
        self._status_counts = (now, state)
        return state

    def start_workers(self) -> None:
        """Start the dispatcher and projector threads (now, or once the store answers)."""
        if not self.workers:
            return
        if self.dispatcher is not None and self.projector is not None:
            self.dispatcher.start()
            if self.slot is not None:  # one of several processes: the leader runs the rest
                self.coordinator = Coordinator(self, self._start_singletons,
                                               self._stop_singletons)
                self.coordinator.start()
                return
            self._start_singletons()
            return

        def connect_later() -> None:
            while not self._stopping.wait(2.0):
                if self._connect_store():
                    self.start_workers()
                    return

        threading.Thread(target=connect_later, name="store-connect", daemon=True).start()

    def _start_singletons(self) -> None:
        """The workers there must be one of: the projector, relay, results automation,
        audit chain, downloader and processing worker."""
        if self.projector is not None:
            if self.settings.embedded_projector:
                self.projector.start()
            if self.relay is not None and self.settings.embedded_relay:
                self.relay.start()
            if self.results is not None and self.settings.embedded_results_automation:
                self.results.start()
            if self.chain is not None and self.settings.embedded_audit_chain:
                self.chain.start()
            if self.downloader is not None and self.settings.embedded_downloader:
                self.downloader.start()
            if self.processing_worker is not None and \
                    self.settings.embedded_processing_worker:
                self.processing_worker.start()

    def _stop_singletons(self) -> None:
        for worker in (self.downloader, self.processing_worker, self.results, self.chain,
                       self.projector, self.relay):
            if worker is not None:
                worker.stop()

    def stop(self) -> None:
        self._stopping.set()
        if self.coordinator is not None:
            self.coordinator.stop()
        self.feed.stop()
        self.availability.stop()
        if self.downloader is not None:
            self.downloader.stop()
        if self.processing_worker is not None:
            self.processing_worker.stop()
        if self.results is not None:
            self.results.stop()
        if self.chain is not None:
            self.chain.stop()
        if self._anchor_publisher is not None:
            self._anchor_publisher.close()
        if self.dispatcher is not None:
            self.dispatcher.stop()
        if self.projector is not None:
            self.projector.stop()
        if self.relay is not None:
            self.relay.stop()
        self.request_audit.stop()
        self.journal.close()
        if self.peers is not None:
            self.peers.close()
        if self.slot is not None:
            self.slot.release()
        if self.store is not None:
            self.store.close()
        self.engine.dispose()
        for engine in self._probe_engines:
            engine.dispose()
