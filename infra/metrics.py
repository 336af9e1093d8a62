"""Prometheus metrics (``prometheus-client``), one registry per ledger.

Counters and histograms are updated where things happen (command acceptance, the dispatcher,
the event store, HTTP); gauges that describe state (journal depth, lags) are read from the
ledger when Prometheus scrapes ``GET /metrics``, so they are never stale.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger("obsledger.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: name → (help, labels): the gauges a state snapshot may carry.
STATE_GAUGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "obsledger_journal_depth": ("Commands accepted and not yet applied or rejected.", ()),
    "obsledger_journal_oldest_pending_seconds": ("Age of the oldest accepted command.", ()),
    "obsledger_event_store_up": ("1 when the event store answers.", ()),
    "obsledger_read_models_up": ("1 when the read-model database answers (0: smart queries "
                                 "answer from the journal alone, or 503).", ()),
    "obsledger_event_store_head_position": ("The log's last position.", ()),
    # every read model is projected in the same transactions (one position): one lag for all
    "obsledger_projection_lag_events": ("Events not yet in the read models.", ()),
    "obsledger_projection_lag_seconds": ("Age of the oldest event not yet in the read models.",
                                         ()),
    "obsledger_relay_lag_events": ("Events not yet published to Kafka.", ()),
    "obsledger_relay_lag_seconds": ("Age of the oldest event not yet published to Kafka.", ()),
    "obsledger_kafka_broker_up": ("1 when a bootstrap broker accepts connections.", ()),
    "obsledger_relay_sent_position": ("The last log position the relay published, "
                                      "acknowledged (acks=all) and recorded.", ()),
    "obsledger_relay_verified_position": ("The last log position proven present in Kafka "
                                          "(read back by the relay).", ()),
    "obsledger_relay_verified_age_seconds": ("Seconds since the relay last proved its "
                                             "position present in Kafka.", ()),
    "obsledger_relay_broker_data_losses": ("Times the relay found that Kafka had lost "
                                           "records it acknowledged (and re-published).", ()),
    "obsledger_request_audit_pending": ("Request audit records not yet written.", ()),
    "obsledger_request_audit_dropped": ("Request audit records dropped (buffer full while the "
                                        "database was unreachable).", ()),
    "obsledger_request_audit_refused": ("Request audit records the database refused (left "
                                        "out).", ()),
    "obsledger_request_audit_writer_up": ("1 while the request audit writer thread is alive.",
                                          ()),
    "obsledger_request_audit_writer_errors": ("Unexpected errors the request audit writer "
                                              "survived (it goes on; what it held is kept).",
                                              ()),
    "obsledger_download_active_jobs": ("MAST download jobs this process is running.", ()),
    "obsledger_download_files_in_flight": ("MAST files being fetched by this process.", ()),
    "obsledger_processing_jobs": ("Processing jobs by status (read model).", ("status",)),
    "obsledger_executed_obs_units": ("Executed obs units by status (read model).", ("status",)),
    "obsledger_staging_requests": ("Staging requests by status (read model).", ("status",)),
    "obsledger_audit_chain_lag_events": ("Events not yet in the audit hash chain.", ()),
    "obsledger_audit_chain_lag_seconds": ("Age of the oldest event not yet in the audit hash "
                                          "chain.", ()),
}

#: The state values above that only grow (counts since the process started): exposed as
#: counters, ``<name>_total``, as Prometheus' conventions want.
STATE_COUNTERS = frozenset({"obsledger_request_audit_dropped", "obsledger_request_audit_refused",
                            "obsledger_request_audit_writer_errors",
                            "obsledger_relay_broker_data_losses"})

State = dict[str, list[tuple[tuple[str, ...], float]]]  # gauge → [(label values, value)]


class _StateCollector(Collector):
    def __init__(self, snapshot: Callable[[], State]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        try:
            state = self.snapshot()
        except Exception as e:  # a scrape never fails: the gauges it could not read are absent
            log.warning("metrics: state unavailable: %s", e)
            return
        for name, samples in state.items():
            help_text, labels = STATE_GAUGES[name]
            family: GaugeMetricFamily | CounterMetricFamily = (
                CounterMetricFamily if name in STATE_COUNTERS else GaugeMetricFamily)(
                name, help_text, labels=list(labels))
            for values, value in samples:
                family.add_metric(list(values), value)
            yield family

    def describe(self) -> list[Metric]:
        return []


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.commands_accepted = Counter(
            "obsledger_commands_accepted", "Critical commands journaled and acknowledged.",
            ["command_type"], registry=r)
        self.commands_applied = Counter(
            "obsledger_commands_applied", "Commands applied to the event store.",
            ["command_type"], registry=r)
        self.commands_rejected = Counter(
            "obsledger_commands_rejected", "Commands the domain refused.",
            ["command_type", "reason_code"], registry=r)
        self.dispatch_batch = Histogram(
            "obsledger_dispatch_batch_commands", "Commands per dispatcher batch.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000), registry=r)
        self.append_seconds = Histogram(
            "obsledger_event_store_append_seconds", "One event-store transaction (a batch).",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r)
        self.http_seconds = Histogram(
            "obsledger_http_request_duration_seconds", "HTTP requests by route and status.",
            ["method", "route", "status"], registry=r)
        self.download_bytes = Counter(
            "obsledger_download_bytes", "Bytes fetched from the MAST archive (re-fetched "
            "bytes after a restart included).", registry=r)
        # counted where the dispatcher's transaction committed the files' registration events
        # (a replayed or refused command adds nothing)
        self.raw_data_files_registered = Counter(
            "obsledger_raw_data_files_registered", "Raw data files registered in the event "
            "store (one per registration event, bulk registrations included).", registry=r)
        self.raw_data_registered_bytes = Counter(
            "obsledger_raw_data_registered_bytes", "Sizes of the raw data files registered in "
            "the event store, added up.", registry=r)
        self.build = Info("obsledger_build", "This process: obsledger version, git commit, "
                          "event store kind.", registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_…
        PlatformCollector(registry=r)  # python_info
        GCCollector(registry=r)  # python_gc_…
        self.password_checks = Counter(
            "obsledger_password_checks", "argon2 password checks and hashes run (login, "
            "password_change, hash), after the rate limits let them through.", ["kind"],
            registry=r)
        self.password_checks_refused = Counter(
            "obsledger_password_checks_refused", "Logins and password changes answered 503 "
            "because OBSLEDGER_AUTH_PASSWORD_CHECKS were running and the queue was full.",
            registry=r)

        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached: the hot paths skip the registry's lock."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._child(self.http_seconds, method, route, str(status)).observe(seconds)

    def accepted(self, command_type: str) -> None:
        self._child(self.commands_accepted, command_type).inc()

    def registered(self, files: int, size: int) -> None:
        """Raw data files whose registration events were just stored."""
        self.raw_data_files_registered.inc(files)
        self.raw_data_registered_bytes.inc(size)

    def set_build(self, *, version: str, commit: str, store: str) -> None:
        self.build.info({"version": version, "commit": commit, "store": store})

    def watch(self, snapshot: Callable[[], State]) -> None:
        """Gauges read from ``snapshot()`` at every scrape."""
        self.registry.register(_StateCollector(snapshot))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """One sample's value (tests, diagnostics)."""
        return self.registry.get_sample_value(name, labels or {})


def gauge(value: Any) -> list[tuple[tuple[str, ...], float]]:
    """A state gauge without labels (None: absent)."""
    return [] if value is None else [((), float(value))]


@functools.cache
def build_version() -> str:
    """The installed obsledger distribution's version."""
    from importlib import metadata

    try:
        return metadata.version("obsledger")
    except metadata.PackageNotFoundError:
        return "unknown"


@functools.cache
def build_commit() -> str:
    """The git commit this code was built from: ``OBSLEDGER_GIT_COMMIT`` (the Docker image
    sets it from its build argument), else the commit of the checkout the code runs from
    (``make run``: an editable install), else ``unknown``."""
    commit = os.environ.get("OBSLEDGER_GIT_COMMIT", "").strip()
    if commit:
        return commit
    source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(source, "pyproject.toml")):
        return "unknown"  # installed in site-packages: no checkout of ours to ask
    try:
        out = subprocess.run(["git", "-C", source, "rev-parse", "--short=12", "HEAD"],
                             capture_output=True, text=True, timeout=2, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"
