"""HTTP for the people who run the ledger: health (journal depth, store reachability, lag),
readiness against the configured thresholds, and the Prometheus metrics; with the reports
they answer (``health_report``, ``readiness_report``)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from starlette.concurrency import run_in_threadpool

from api.deps import feature_router, json_response, ledger_of
from api.errors import ErrorResponse
from bootstrap.ledger import Ledger
from infra.availability import EVENT_STORE, READ_MODEL_DB, UNAVAILABLE_ERRORS, unavailable_part
from infra.kafka_relay import broker_reachable
from infra.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from projections.kafka_projector import KafkaProjector


def health_router() -> APIRouter:
    r = feature_router()

    @r.get("/health", tags=["operations"], summary="Journal depth, store reachability, lag")
    async def health(request: Request) -> Any:
        return await run_in_threadpool(health_report, ledger_of(request))

    @r.get("/ready", tags=["operations"], responses={503: {"model": ErrorResponse}},
           summary="Readiness: store reachable, journal depth and age, projector and relay "
           "lag within the configured thresholds",
           description="200 `{ready: true, checks}`; 503 in the error format, `errors` naming "
           "each failing check, with the same `checks` (shape in docs/OPERATIONS.md).")
    async def ready(request: Request) -> Any:
        failing, checks = await run_in_threadpool(readiness_report, ledger_of(request))
        if not failing:
            return {"ready": True, "checks": checks}
        return json_response({"detail": "not ready: " + "; ".join(m for _, m in failing),
                              "status_code": 503,
                              "errors": [{"field": f, "message": m} for f, m in failing],
                              "ready": False, "checks": checks}, 503)

    @r.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
           summary="Prometheus metrics: commands by type and outcome, journal depth, "
           "dispatcher batches, append latency, projection and relay lag, HTTP latency")
    async def metrics(request: Request) -> Response:
        body = await run_in_threadpool(ledger_of(request).metrics.exposition)
        return Response(body, media_type=METRICS_CONTENT_TYPE)

    return r


def health_report(ledger: Ledger) -> dict[str, Any]:
    """The status report; figures read from the stores come within ``health_budget_s`` or
    are left out (null), and a store known to be down is not asked."""
    parts = ledger.availability
    if parts.down(EVENT_STORE) and parts.down(READ_MODEL_DB):
        return _health(ledger, remote=False)  # nothing to read from the stores
    report = ledger.bounded("health", lambda: _health(ledger))
    return report if report is not None else _health(ledger, remote=False)


def _health(ledger: Ledger, remote: bool = True) -> dict[str, Any]:
    parts = ledger.availability
    store_ok = ledger.store is not None and parts.up(EVENT_STORE)
    models_ok = parts.up(READ_MODEL_DB)
    head = projected = None
    if remote:
        try:
            head = ledger.store.max_position() if store_ok and ledger.store else None
            projected = ledger.queries.read_model_position() if models_ok else None
        except UNAVAILABLE_ERRORS as e:
            parts.failed(unavailable_part(e) or EVENT_STORE, e)
            return _health(ledger, remote=False)
    oldest = ledger.journal.oldest_pending_received_at()
    accounts = ledger.auth.snapshot_status()
    down = [p for p, ok in ((EVENT_STORE, store_ok), (READ_MODEL_DB, models_ok),
                            ("accounts", accounts["reachable"])) if not ok]
    d = ledger.dispatcher
    return {
        "status": "degraded" if down else "ok",
        "down": down,
        "parts": {**parts.report(), "accounts": accounts},
        "store": {"kind": ledger.settings.store, "reachable": store_ok, "head_position": head},
        "journal": {
            "depth": ledger.journal.depth(),
            "oldest_pending_age_s": (datetime.now(UTC) - oldest).total_seconds()
            if oldest else None,
            "commands": ledger.journal.counts(),
        },
        "dispatcher": {
            "embedded": ledger.workers,
            "store_reachable": d.store_reachable if d else False,
            "last_error": d.last_error if d else "event store not connected",
        },
        "projector": {
            "source": ledger.settings.projection_source,
            "position": projected,
            "lag_events": (head - projected) if head is not None and projected is not None
            else None,
            "last_error": ledger.projector.last_error if ledger.projector else None,
            **kafka_projector_health(ledger),
        },
        "kafka": relay_health(ledger, remote and store_ok and models_ok),
        "results": _results_health(ledger, remote and models_ok),
        "downloader": ledger.downloader.report() if ledger.downloader else None,
        "processing_worker": ledger.processing_worker.report()
        if ledger.processing_worker else None,
        "object_store": ledger.object_store_status(),
        "request_audit": ledger.request_audit.report(),
        "processes": ledger.scaleout_report(),
    }


def _results_health(ledger: Ledger, remote: bool = True) -> dict[str, Any] | None:
    """The results process manager and scheduler (None until the store is connected)."""
    if ledger.results is None:
        return None
    if not remote:
        return {"last_error": "not read: the read-model database does not answer in time"}
    try:
        return ledger.results.report()
    except Exception as e:  # the read-model database is down: other sections say so
        return {"last_error": f"unavailable: {e}"}


def readiness_report(ledger: Ledger) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The failing checks (field, message) and every figure checked."""
    c = ledger.readiness()
    s = ledger.settings
    failing: list[tuple[str, str]] = []
    if not c["store_reachable"]:
        failing.append(("store_reachable", "the event store does not answer"))
    if not c["read_models_reachable"]:
        failing.append(("read_models_reachable", "the read-model database does not answer "
                        "(smart queries answer from the journal alone, or 503)"))
    if c["journal_depth"] > s.ready_max_journal_depth:
        failing.append(("journal_depth", f"{c['journal_depth']} commands pending "
                        f"(threshold {s.ready_max_journal_depth})"))
    if c["oldest_pending_age_s"] > s.ready_max_oldest_pending_s:
        failing.append(("oldest_pending_age_s", f"the oldest pending command is "
                        f"{c['oldest_pending_age_s']:.0f}s old "
                        f"(threshold {s.ready_max_oldest_pending_s:.0f}s)"))
    if (c["projector_lag_events"] or 0) > s.ready_max_projector_lag_events:
        failing.append(("projector_lag_events", f"the read models lag "
                        f"{c['projector_lag_events']} events "
                        f"(threshold {s.ready_max_projector_lag_events})"))
    if (c["projector_lag_s"] or 0) > s.ready_max_projector_lag_s:
        failing.append(("projector_lag_s", f"the read models lag {c['projector_lag_s']:.0f}s "
                        f"(threshold {s.ready_max_projector_lag_s:.0f}s)"))
    relay = c["relay"]
    if relay is not None and not relay["broker_reachable"]:
        failing.append(("relay.broker_reachable", "no Kafka bootstrap broker answers"))
    if relay is not None and relay["lag_s"] > s.ready_max_relay_lag_s:
        failing.append(("relay.lag_s", f"the relay lags {relay['lag_s']:.0f}s "
                        f"(threshold {s.ready_max_relay_lag_s:.0f}s)"))
    return failing, c


def kafka_projector_health(ledger: Ledger) -> dict[str, Any]:
    """With OBSLEDGER_PROJECTION_SOURCE=kafka: the group, and this process's member if any."""
    projector = ledger.projector
    if not isinstance(projector, KafkaProjector):
        return {}
    return {"kafka": {
        "group": projector.group,
        "member": projector.member if projector.running else None,
        "assigned_partitions": [f"{t}:{p}" for t, p in projector.assigned],
        "malformed_records": projector.malformed_records,
    }}


def relay_health(ledger: Ledger, remote: bool = True) -> dict[str, Any] | None:
    """The Kafka relay: broker reachability, lag (events, seconds), the sent (published)
    position and the verified one (proven present in Kafka), and the broker data losses it
    detected; None without Kafka. ``remote`` False: the stores are not asked (positions and
    lag stay null)."""
    settings = ledger.settings
    if not settings.kafka_bootstrap:
        return None
    relay = ledger.relay
    report: dict[str, Any] = {
        "bootstrap": settings.kafka_bootstrap,
        "relay_embedded": bool(relay is not None and relay.running),
        "broker_reachable": broker_reachable(settings.kafka_bootstrap_servers),
        "published_position": None, "lag": None,
        "verified_position": None, "verified_at": None, "unverified_positions": None,
        "data_losses": None, "last_data_loss": None,
        "last_error": relay.last_error if relay is not None else None,
    }
    if relay is None or ledger.store is None or not remote:
        return report
    try:  # the relay may run in its own process: its position is in the read-model database
        state = relay.read_state()
        position = state["sent_position"]
        report["published_position"] = position
        report.update(verified_position=state["verified_position"],
                      verified_at=state["verified_at"],
                      unverified_positions=max(0, position - state["verified_position"]),
                      data_losses=state["data_losses"], last_data_loss=state["last_loss"])
        report["lag"] = ledger.store.lag(position)
    except Exception as e:  # the store or read-model database is down: other sections say so
        report["last_error"] = report["last_error"] or f"lag unavailable: {e}"
    return report
