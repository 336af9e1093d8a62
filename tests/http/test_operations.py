"""What operators run on: Prometheus metrics after a known workload, and readiness that
follows the event store (through a TCP proxy that can cut PostgreSQL off)."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.app import create_app
from infra.logs import CommandContextFilter, json_formatter
from tests.conftest import PG_HOST, PG_PORT, grant, make_settings
from tests.http.test_api import T0, applied
from tests.support.tcp_proxy import TcpProxy


def scrape(c: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_a_scrape_after_a_known_workload(client: TestClient) -> None:
    for i in range(3):
        applied(client.post("/executed_obs_units/start?wait=true", json={
            "obs_unit_id": f"OU-{i}", "instrument": "HARPS", "start_time": T0.isoformat()}))
    rid = applied(client.post("/observation_results/materialize?wait=true", json={
        "observation_id": 1, "request_id": 1}))["ids"]["observation_result_ids"][0]
    applied(client.post(f"/observation_results/{rid}/dispatch?wait=true", json={}))
    r = client.post(f"/observation_results/{rid}/dispatch?wait=true", json={})
    assert r.status_code == 409  # journaled, then refused by the domain
    assert client.get("/raw_data_files/not-a-uuid").status_code == 422

    m = scrape(client)

    def value(name: str, **labels: str) -> float:
        return m.get((name, tuple(sorted(labels.items()))), 0.0)

    start = {"command_type": "executed_obs_unit.start"}
    dispatch = {"command_type": "observation_result.dispatch"}
    assert value("obsledger_commands_accepted_total", **start) == 3
    assert value("obsledger_commands_applied_total", **start) == 3
    assert value("obsledger_commands_accepted_total", **dispatch) == 2
    assert value("obsledger_commands_applied_total", **dispatch) == 1
    assert value("obsledger_commands_rejected_total", reason_code="conflict", **dispatch) == 1
    assert value("obsledger_journal_depth") == 0
    assert value("obsledger_event_store_up") == 1
    assert value("obsledger_dispatch_batch_commands_count") >= 1
    assert value("obsledger_event_store_append_seconds_count") >= 5
    assert value("obsledger_http_request_duration_seconds_count", method="POST",
                 route="/executed_obs_units/start", status="200") == 3
    assert value("obsledger_http_request_duration_seconds_count", method="POST",
                 route="/observation_results/{id}/dispatch", status="409") == 1
    assert value("obsledger_http_request_duration_seconds_count", method="GET",
                 route="/raw_data_files/{id}", status="422") == 1
    # one position for every read model: one series, no read_model label
    lag = {k[1]: v for k, v in m.items() if k[0] == "obsledger_projection_lag_events"}
    assert list(lag) == [()] and lag[()] >= 0

    ready = client.get("/ready")
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    assert checks["store_reachable"] is True and checks["journal_depth"] == 0
    assert checks["relay"] is None and checks["downloader"]["running"] is True


def test_ready_fails_over_a_threshold(settings: Any) -> None:
    s = settings.model_copy(update={"ready_max_journal_depth": 0, "embedded_workers": False})
    with TestClient(create_app(s), headers=grant(s)) as c:
        r = c.post("/executed_obs_units/start", json={"obs_unit_id": "OU", "instrument": "H"})
        assert r.status_code == 202
        ready = c.get("/ready")
        assert ready.status_code == 503
        body = ready.json()
        assert body["status_code"] == 503 and body["ready"] is False
        assert [e["field"] for e in body["errors"]] == ["journal_depth"]
        assert body["checks"]["journal_depth"] == 1


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(PG_HOST, PG_PORT)
    yield proxy
    proxy.close()


def test_ready_follows_the_event_store(tmp_path: Path, pg_database: Callable[[], str],
                                       pg_proxy: TcpProxy) -> None:
    s = make_settings(tmp_path, "postgres", pg_database(), postgres_host=pg_proxy.host,
                      postgres_port=pg_proxy.port, postgres_connect_timeout=2,
                      dispatch_retry_max_s=1.0)

    def ready_status(c: TestClient, want: int) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:
            r = c.get("/ready")
            if r.status_code == want or time.monotonic() > deadline:
                assert r.status_code == want, r.text
                return r.json()  # type: ignore[no-any-return]
            time.sleep(0.2)

    with TestClient(create_app(s), headers=grant(s)) as c:
        ready_status(c, 200)
        pg_proxy.cut()
        try:
            body = ready_status(c, 503)
            assert body["errors"][0]["field"] == "store_reachable"
            assert scrape(c)[("obsledger_event_store_up", ())] == 0
            # commands are still accepted while not ready
            r = c.post("/executed_obs_units/start", json={"obs_unit_id": "OU-X",
                                                          "instrument": "HARPS"})
            assert r.status_code == 202
        finally:
            pg_proxy.restore()
        body = ready_status(c, 200)
        assert body["checks"]["store_reachable"] is True


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The root logger also writes JSON lines here (as `obsledger` processes do)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(CommandContextFilter())
    handler.setFormatter(json_formatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(level)


def test_log_lines_are_json_with_the_command_and_correlation_ids(
        client: TestClient, json_log: io.StringIO) -> None:
    rid = applied(client.post("/observation_results/materialize?wait=true", json={
        "observation_id": 3, "request_id": 3}))["ids"]["observation_result_ids"][0]
    applied(client.post(f"/observation_results/{rid}/dispatch?wait=true", json={}))
    r = client.post(f"/observation_results/{rid}/dispatch?wait=true", json={},
                    headers={"Idempotency-Key": "dispatch-again-1",
                             "X-Correlation-ID": "night-2026-11-21"})
    assert r.status_code == 409
    lines = [json.loads(line) for line in json_log.getvalue().splitlines() if line.strip()]
    assert lines and all({"time", "level", "logger", "message", "command_id",
                          "correlation_id"} <= set(line) for line in lines)
    rejected = [line for line in lines if "rejected" in line["message"]]
    assert rejected, lines
    assert rejected[-1]["command_id"] == "dispatch-again-1"
    assert rejected[-1]["correlation_id"] == "night-2026-11-21"
    assert rejected[-1]["logger"] == "obsledger.dispatcher"


def test_workers_starting_together_on_a_fresh_database(tmp_path: Path,
                                                       pg_database: Callable[[], str]) -> None:
    """Several processes creating the same tables at once ('tuple concurrently updated')
    wait a moment and connect, instead of exiting."""
    import subprocess
    import sys

    from tests.conftest import ROOT, settings_env

    env = settings_env(make_settings(tmp_path, "postgres", pg_database()))
    procs = [subprocess.Popen([sys.executable, "-m", "api.cli", "project", "--once"], env=env,
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(4)]
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        assert "read models at position 0" in out


def test_store_figures_are_read_within_a_budget() -> None:
    """``Bounded``: a call that hangs (a store waiting on its pool) costs the first caller
    the budget, and later callers nothing, until it returns; then figures are fresh again."""
    from infra.availability import Bounded

    release = threading.Event()
    calls: list[int] = []

    def figures() -> int:
        calls.append(1)
        release.wait(10)
        return len(calls)

    bounded = Bounded(figures, budget_s=0.05, name="test-figures")
    t0 = time.monotonic()
    assert bounded() is None  # the store hangs: no figures, after the budget
    assert 0.04 <= time.monotonic() - t0 < 1
    t0 = time.monotonic()
    assert bounded() is None and time.monotonic() - t0 < 0.02  # still hanging: at once
    assert len(calls) == 1  # and not asked again meanwhile
    release.set()
    deadline = time.monotonic() + 5
    while (value := bounded()) is None:  # the hung call ends; the next one is fresh
        assert time.monotonic() < deadline
    assert value == 2 and len(calls) == 2
