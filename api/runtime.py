"""Wiring: the journal, the event store, the dispatcher, the projector and the queries."""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from commands.dispatcher import Dispatcher
from commands.download_automation import Downloader
from commands.handlers import utcnow
from commands.processing_automation import ProcessingRunManager
from commands.processing_worker import ProcessingWorker
from commands.result_automation import ResultsAutomation, ResultsProcessManager, ResultsScheduler
from commands.service import CommandService
from infra.accounts import AccountStore, Authenticator, TokenSigner
from infra.audit_chain import AnchorLog, ChainKeeper
from infra.event_store import EventStore, StoreUnavailable
from infra.journal import Journal
from infra.kafka_relay import AnchorPublisher, EventRelay, broker_reachable
from infra.metrics import Metrics, State, gauge
from infra.object_store import ObjectStore, object_store_from_settings
from infra.read_model_db import create_read_model_engine
from infra.request_audit import RequestAuditLog
from infra.settings import Settings
from projections.kafka_projector import KafkaProjector
from projections.projector import Projector
from projections.tables import READ_MODELS
from queries.downloads import DownloadQueries
from queries.processing import ProcessingQueries
from queries.service import QueryService

log = logging.getLogger("obsledger")

#: The cyclic garbage collector's thresholds in an obsledger process. With Python's defaults
#: (700, 10, 10) a bulk registration of 5,000 files (each an aggregate, an event and a stored
#: event, none of them cyclic garbage) set off ~2,200 collections, a full one every ~5,000
#: files, and spent a third of the dispatch in them; with these, a tenth as many and a quarter
#: of the time (bench/commands.py --only bulk).
GC_THRESHOLDS = (20_000, 20, 20)


class Ledger:
    """Everything one obsledger process runs. The store may be down at start: commands are
    still accepted into the journal, and the workers start once the store answers."""

    def __init__(self, settings: Settings, *, workers: bool | None = None,
                 clock: Callable[[], datetime] | None = None) -> None:
        gc.set_threshold(*GC_THRESHOLDS)
        self.settings = settings
        self.clock = clock  # the dispatcher's (tests of the results' debounce set it)
        settings.prepare_dirs()
        self.journal = Journal(settings.journal_file)
        self.engine = create_read_model_engine(settings.read_model_database_url)
        self.queries = QueryService(self.engine, self.journal)
        self.auth = Authenticator(AccountStore(self.engine),
                                  TokenSigner(settings.signing_secret(), settings.token_ttl_s),
                                  refresh_s=settings.auth_refresh_s)
        self.request_audit = RequestAuditLog(self.engine, settings.request_audit_flush_s,
                                             settings.request_audit_buffer)
        self.downloads = DownloadQueries(self.queries)
        self.processing = ProcessingQueries(self.queries)
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
        self.metrics.watch(self.metrics_state)
        # with embedded workers this process applies what it accepts: keep the objects
        self.commands = CommandService(self.journal, None, self.metrics,
                                       keep_accepted=self.workers)
        self._stopping = threading.Event()
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
            if self.settings.projection_source == "kafka":
                self.projector = KafkaProjector(self.store, self.engine, self.settings)
            else:
                self.projector = Projector(self.store, self.engine,
                                           self.settings.projection_page_size,
                                           self.settings.projection_poll_s)
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
                                     metrics=self.metrics, accepted=self.commands.accepted)
        self.journal.on_append(self.dispatcher.wake)
        return True

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

    def _applied(self, position: int) -> None:
        """The dispatcher applied commands up to ``position``: wake who follows the log."""
        if self.projector is not None:
            self.projector.wake(position)
        if self.relay is not None:
            self.relay.wake(position)

    # -- operations ------------------------------------------------------------------------
    def readiness(self) -> dict[str, Any]:
        """What ``GET /ready`` checks and the metrics' gauges report (``docs/OPERATIONS.md``)."""
        oldest = self.journal.oldest_pending_received_at()
        checks: dict[str, Any] = {
            "store_reachable": False,
            "journal_depth": self.journal.depth(),
            "oldest_pending_age_s": round((datetime.now(UTC) - oldest).total_seconds(), 3)
            if oldest else 0.0,
            "head_position": None, "projector_position": None,
            "projector_lag_events": None, "projector_lag_s": None,
            "relay": None,
            "downloader": self.downloader.report() if self.downloader else None,
        }
        store = self.store
        if store is None or not store.ping():
            return checks
        checks["store_reachable"] = True
        checks["head_position"] = store.max_position()
        position = self.queries.read_model_position()
        lag = store.lag(position)
        checks.update(projector_position=position, projector_lag_events=lag["events"],
                      projector_lag_s=lag["seconds"])
        if self.relay is not None:
            published = self.relay.read_position()
            relay_lag = store.lag(published)
            checks["relay"] = {
                "published_position": published, "lag_events": relay_lag["events"],
                "lag_s": relay_lag["seconds"],
                "broker_reachable": broker_reachable(self.settings.kafka_bootstrap_servers)}
        return checks

    def metrics_state(self) -> State:
        c = self.readiness()
        state: State = {
            "obsledger_journal_depth": gauge(c["journal_depth"]),
            "obsledger_journal_oldest_pending_seconds": gauge(c["oldest_pending_age_s"]),
            "obsledger_event_store_up": gauge(int(c["store_reachable"])),
            "obsledger_event_store_head_position": gauge(c["head_position"]),
            "obsledger_request_audit_pending": gauge(self.request_audit.pending),
            "obsledger_request_audit_dropped": gauge(self.request_audit.dropped),
            "obsledger_request_audit_refused": gauge(self.request_audit.refused),
        }
        if c["projector_lag_events"] is not None:
            # every read model is projected in the same transactions: one lag for all
            state["obsledger_projection_lag_events"] = [
                ((m,), float(c["projector_lag_events"])) for m in READ_MODELS]
            state["obsledger_projection_lag_seconds"] = [
                ((m,), float(c["projector_lag_s"])) for m in READ_MODELS]
        if c["relay"] is not None:
            state["obsledger_relay_lag_events"] = gauge(c["relay"]["lag_events"])
            state["obsledger_relay_lag_seconds"] = gauge(c["relay"]["lag_s"])
            state["obsledger_kafka_broker_up"] = gauge(int(c["relay"]["broker_reachable"]))
        if c["store_reachable"]:
            try:
                state["obsledger_processing_jobs"] = [
                    ((status,), float(n)) for status, n in sorted(self.processing.counts().items())]
            except Exception as e:  # the read-model database is down: other gauges say so
                log.debug("processing job counts unavailable: %s", e)
        if c["downloader"] is not None:
            state["obsledger_download_active_jobs"] = gauge(c["downloader"]["active_jobs"])
            state["obsledger_download_files_in_flight"] = gauge(
                c["downloader"]["files_in_flight"])
        return state

    def start_workers(self) -> None:
        """Start the dispatcher and projector threads (now, or once the store answers)."""
        if not self.workers:
            return
        if self.dispatcher is not None and self.projector is not None:
            self.dispatcher.start()
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
            return

        def connect_later() -> None:
            while not self._stopping.wait(2.0):
                if self._connect_store():
                    self.start_workers()
                    return

        threading.Thread(target=connect_later, name="store-connect", daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
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
        if self.store is not None:
            self.store.close()
        self.engine.dispose()
