"""What Prometheus and Grafana read: the metrics' names and types (Prometheus' conventions),
the gauges operators watch, and the dashboard and alert rules under ``deploy/`` checked against
a real scrape of a running server (and, with Debian's ``promtool``, the rules' syntax and
their unit tests)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

import bootstrap.ledger
from api.app import create_app
from infra.metrics import build_version
from infra.settings import Settings
from tests.conftest import REQUIRE_SERVICES, ROOT, ServerProcess, grant
from tests.http.test_api import T0, applied, file_spec, stage

DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "rules" / "obsledger.rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "tests" / "obsledger.rules.test.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "obsledger.json"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"

Families = dict[str, Any]  # family name → Metric (prometheus_client.parser)


def families(text: str) -> Families:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fams: Families) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in fams.values() for s in f.samples}


def scrape(c: TestClient | httpx.Client) -> Families:
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    return families(r.text)


# -- the metrics themselves ------------------------------------------------------------------
def test_files_registered_are_counted_by_file_not_by_command(client: TestClient) -> None:
    """A bulk registration of 3 files counts 3 files (and their bytes) once it is applied; its
    replay (same Idempotency-Key) and a refused duplicate count nothing."""
    bulk = {"files": [file_spec("a.fits", 10), file_spec("b.fits", 20), file_spec("c.fits", 30)]}
    key = {"Idempotency-Key": "bulk-night-1"}
    applied(client.post("/raw_data_files/bulk?wait=true", json=bulk, headers=key))
    applied(client.post("/raw_data_files/bulk?wait=true", json=bulk, headers=key))  # replay
    r = client.post("/raw_data_files?wait=true", json=file_spec("a.fits", 10))
    assert r.status_code == 409, r.text  # the same file again: refused by the store
    applied(client.post("/raw_data_package?wait=true", json={
        "name": "PKG", "files": [file_spec("d.fits", 40)]}))
    m = samples(scrape(client))
    assert m[("obsledger_raw_data_files_registered_total", ())] == 4
    assert m[("obsledger_raw_data_registered_bytes_total", ())] == 100
    bulk_type = (("command_type", "raw_data_file.register_bulk"),)
    assert m[("obsledger_commands_applied_total", bulk_type)] == 1


def test_metric_names_and_types_follow_prometheus_conventions(client: TestClient) -> None:
    applied(client.post("/executed_obs_units/start?wait=true", json={
        "obs_unit_id": "OU-1", "instrument": "HARPS", "start_time": T0.isoformat()}))
    fams = scrape(client)
    name_re = re.compile(r"^[a-z][a-z0-9_]*$")
    for name, f in fams.items():
        assert name_re.match(name), name
        if f.type == "counter":  # the parser names a counter's family without `_total`
            assert {s.name for s in f.samples} <= {f"{name}_total", f"{name}_created"}, name
        else:
            assert not any(s.name.endswith("_total") for s in f.samples), (name, f.type)
        if name.startswith("obsledger_"):
            assert f.documentation, f"{name} has no HELP"
    # ever-growing counts are counters, state is a gauge
    assert fams["obsledger_request_audit_dropped"].type == "counter"
    assert fams["obsledger_request_audit_refused"].type == "counter"
    assert fams["obsledger_request_audit_pending"].type == "gauge"
    for gauge in ("obsledger_journal_depth", "obsledger_projection_lag_events",
                  "obsledger_executed_obs_units", "obsledger_audit_chain_lag_events"):
        assert fams[gauge].type == "gauge", gauge
    # what this process is, and the process metrics of prometheus_client's collectors
    [build] = fams["obsledger_build_info"].samples
    assert build.name == "obsledger_build_info" and build.value == 1
    assert build.labels["version"] == build_version() and build.labels["store"] in (
        "sqlite", "postgres") and build.labels["commit"]
    for name in ("process_cpu_seconds", "process_resident_memory_bytes",
                 "process_open_fds", "process_start_time_seconds", "python_info",
                 "python_gc_collections"):
        assert name in fams, name


def test_status_gauges_projection_and_chain_lag(settings: Settings,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Executed obs units and staging requests by status (every status present, 0 when no
    row has it), the projection lag once, and the audit chain's lag until its keeper runs."""
    monkeypatch.setattr(bootstrap.ledger, "STATUS_COUNTS_MAX_AGE_S", 0.0)
    s = settings.model_copy(update={"embedded_audit_chain": False})
    with TestClient(create_app(s), headers=grant(s)) as c:
        units = [applied(c.post("/executed_obs_units/start?wait=true", json={
            "obs_unit_id": f"OU-{i}", "instrument": "HARPS", "start_time": T0.isoformat()}))
            ["ids"]["executed_obs_unit_id"] for i in range(3)]
        applied(c.put(f"/executed_obs_units/{units[0]}/finish?wait=true",
                      json={"status": "success"}))
        pkg = applied(c.post("/raw_data_package?wait=true", json={
            "name": "PKG", "files": [file_spec("x.fits", 5)]}))["ids"]["raw_data_package_id"]
        applied(c.put(f"/raw_data_package/{pkg}/finalize?wait=true"))
        stage(c, pkg)
        pos = applied(c.post("/executed_obs_units/start?wait=true", json={
            "obs_unit_id": "OU-9", "instrument": "HARPS"}))["position"]
        assert c.get(f"/executed_obs_units/OU-9?min_position={pos}").status_code == 200
        m = samples(scrape(c))
        units_by = {k[1][0][1]: v for k, v in m.items() if k[0] == "obsledger_executed_obs_units"}
        assert units_by == {"running": 3, "success": 1, "failed": 0, "aborted": 0}
        staging_by = {k[1][0][1]: v for k, v in m.items()
                      if k[0] == "obsledger_staging_requests"}
        assert staging_by == {"pending": 1, "in_progress": 0, "completed": 0, "failed": 0,
                              "cancelled": 0}
        assert m[("obsledger_projection_lag_events", ())] == 0
        head = m[("obsledger_event_store_head_position", ())]
        # nobody keeps the chain in this process: it lags the whole log
        assert m[("obsledger_audit_chain_lag_events", ())] == head > 0
        assert m[("obsledger_audit_chain_lag_seconds", ())] >= 0
        ledger = c.app.state.ledger  # type: ignore[attr-defined]
        ledger.chain.catch_up()
        m = samples(scrape(c))
        assert m[("obsledger_audit_chain_lag_events", ())] == 0
        assert m[("obsledger_audit_chain_lag_seconds", ())] == 0


def test_status_counts_are_cached_briefly(client: TestClient,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Two scrapes within STATUS_COUNTS_MAX_AGE_S (5 s; a minute here, so that a slow
    machine does not matter) cost one query: the second shows the same counts even though a
    unit started between them."""
    assert bootstrap.ledger.STATUS_COUNTS_MAX_AGE_S == 5.0
    monkeypatch.setattr(bootstrap.ledger, "STATUS_COUNTS_MAX_AGE_S", 60.0)
    before = samples(scrape(client))[("obsledger_executed_obs_units", (("status", "running"),))]
    applied(client.post("/executed_obs_units/start?wait=true", json={
        "obs_unit_id": "OU-C", "instrument": "HARPS"}))
    after = samples(scrape(client))[("obsledger_executed_obs_units", (("status", "running"),))]
    assert before == after == 0


# -- what the dashboard and the alert rules use ---------------------------------------------
METRIC_RE = re.compile(r"\b((?:obsledger|process|python)_[a-z0-9_]+|up)\b")


def dashboard_exprs() -> list[str]:
    def panels(ps: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for p in ps:
            yield p
            yield from panels(p.get("panels", []))

    board = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(board["panels"]) for t in p.get("targets", [])]


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def used_metrics(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC_RE.findall(e)}


def test_dashboard_and_alerts_cover_what_operators_watch() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["uid"] == "obsledger" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in board["panels"]:
        if p["type"] != "row":
            assert p.get("datasource", {}).get("uid") == "prometheus", p["title"]
            assert p["targets"], p["title"]
    exprs = dashboard_exprs()
    used = used_metrics(exprs)
    for needed in ("obsledger_journal_depth", "obsledger_journal_oldest_pending_seconds",
                   "obsledger_projection_lag_seconds", "obsledger_relay_lag_seconds",
                   "obsledger_raw_data_files_registered_total",
                   "obsledger_executed_obs_units", "obsledger_staging_requests",
                   "obsledger_request_audit_dropped_total", "obsledger_audit_chain_lag_events"):
        assert needed in used, f"the dashboard does not show {needed}"
    alerts = {r["alert"]: r for r in rules() if "alert" in r}
    watched = {m for r in alerts.values() for m in used_metrics([r["expr"]])}
    for needed in ("obsledger_journal_depth", "obsledger_journal_oldest_pending_seconds",
                   "obsledger_projection_lag_seconds", "obsledger_relay_lag_seconds",
                   "obsledger_request_audit_dropped_total"):
        assert needed in watched, f"no alert on {needed}"
    for name, r in alerts.items():
        assert r["labels"]["severity"] in ("warning", "critical"), name
        assert r["annotations"]["summary"] and r["annotations"]["description"], name


def test_prometheus_scrapes_what_compose_runs() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    # every replica of the API service (Docker's DNS: one A record each)
    assert jobs["obsledger-api"]["dns_sd_configs"] == [
        {"names": ["api"], "type": "A", "port": 8000, "refresh_interval": "15s"}]
    assert jobs["obsledger-api"].get("metrics_path", "/metrics") == "/metrics"


@pytest.fixture
def kafka_server(settings: Settings, tmp_path: Path) -> Iterator[ServerProcess]:
    """``obsledger serve`` on a free port, relaying to a broker (noida-db), as compose runs
    it: every metric the dashboard and rules use is then in its scrape."""
    from tests.support.kafka_broker import KafkaBroker

    broker = KafkaBroker("noida", tmp_path)
    s = settings.model_copy(update={"kafka_bootstrap": broker.bootstrap,
                                    "kafka_topic_prefix": "mon", "kafka_partitions": 1})
    server = ServerProcess(s)
    try:
        yield server
    finally:
        server.stop()
        broker.close()


def test_every_metric_the_dashboard_and_rules_use_is_in_a_real_scrape(
        kafka_server: ServerProcess, settings: Settings) -> None:
    with httpx.Client(base_url=kafka_server.url, headers=grant(settings), timeout=30) as c:
        r = c.post("/raw_data_files/bulk?wait=true", json={"files": [file_spec("s.fits", 7)]})
        assert r.status_code == 200, r.text
        fams = scrape(c)
    # a sample, or a declared family (a labelled counter before its first increment)
    present = {s.name for f in fams.values() for s in f.samples} | {
        n + suffix for n, f in fams.items()
        for suffix in {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
        .get(f.type, ("",))}
    exprs = dashboard_exprs() + [r["expr"] for r in rules()]
    recorded = {r["record"] for r in rules() if "record" in r}
    missing = sorted(used_metrics(exprs) - present - recorded - {"up"})
    assert not missing, f"used by deploy/ but not exposed: {missing}"
    assert any(s.name == "obsledger_relay_lag_seconds" for s in fams[
        "obsledger_relay_lag_seconds"].samples)


# -- promtool (Debian's prometheus package; `make test` installs it) -------------------------
def promtool() -> str:
    """Debian's promtool: on the PATH, or where `make promtool` puts it (beside the venv's
    python)."""
    beside = Path(sys.executable).parent / "promtool"
    tool = shutil.which("promtool") or (str(beside) if beside.is_file() else None)
    if tool is None:
        msg = "promtool is not installed (make test takes it from Debian's prometheus package)"
        pytest.fail(msg) if REQUIRE_SERVICES else pytest.skip(msg)
    return str(tool)


def test_promtool_checks_the_config_and_rules() -> None:
    tool = promtool()
    r = subprocess.run([tool, "check", "rules", str(RULES)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    # the config names the rules by their path in the container: its syntax only
    r = subprocess.run([tool, "check", "config", "--syntax-only", str(PROMETHEUS_CONFIG)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_of_the_alerts() -> None:
    """Each alert fires on a series that should fire it, and not before its `for:`."""
    r = subprocess.run([promtool(), "test", "rules", str(RULE_TESTS)], capture_output=True,
                       text=True, timeout=120, cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Grafana's queries as recording rules, so that promtool parses their PromQL
    (Grafana's `$__rate_interval` replaced by a duration)."""
    exprs = [e.replace("$__rate_interval", "5m") for e in dashboard_exprs()]
    doc = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)]}]}
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(yaml.safe_dump(doc))
    r = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
