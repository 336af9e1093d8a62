"""Rebuild under load: ``obsledger rebuild`` (every read model, then some) while commands keep
arriving over HTTP and a dashboard keeps querying; no query fails, no command is refused, and
afterwards the switched read models equal a fresh build (``check-projections`` clean)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import inspect, select

from bootstrap.ledger import Ledger
from infra.settings import Settings
from projections.tables import READ_MODELS
from tests.conftest import ROOT, ServerProcess, grant, settings_env
from tests.integration.test_integration import file_spec


@pytest.fixture
def server(settings: Settings) -> Iterator[ServerProcess]:
    s = ServerProcess(settings)
    yield s
    s.stop()


def cli(settings: Settings, *args: str, page_size: int = 1000,
        ) -> subprocess.CompletedProcess[str]:
    env = {**settings_env(settings), "OBSLEDGER_PROJECTION_PAGE_SIZE": str(page_size)}
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


class Load:
    """A writer starting obs units and registering files, and a reader hammering two list
    endpoints, each in its own thread, until stopped."""

    def __init__(self, url: str, auth: dict[str, str]) -> None:
        self.url = url
        self.auth = auth
        self.stop = threading.Event()
        self.reads = 0
        self.writes = 0
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self._write, daemon=True),
                        threading.Thread(target=self._read, daemon=True)]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=30)

    def _write(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.auth) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                try:
                    r = c.post("/executed_obs_units/start",
                               json={"obs_unit_id": f"LOAD-{i}", "instrument": "HARPS"})
                    ok = r.status_code == 202
                    if i % 5 == 0:
                        r = c.post("/raw_data_files/bulk", json={"files": [
                            file_spec(f"load-{i}-{k}.fits", k) for k in range(20)]})
                        ok = ok and r.status_code == 202
                    if not ok:
                        self.failures.append(f"write {r.status_code} {r.text[:200]}")
                    self.writes += 1
                except httpx.HTTPError as e:
                    self.failures.append(f"write {e!r}")
                time.sleep(0.01)

    def _read(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30, headers=self.auth) as c:
            while not self.stop.is_set():
                for path in ("/executed_obs_units?limit=50&instrument=HARPS",
                             "/raw_data_files?limit=50&instrument=HARPS"):
                    try:
                        r = c.get(path)
                        if r.status_code != 200:
                            self.failures.append(f"read {path} {r.status_code} {r.text[:200]}")
                        self.reads += 1
                    except httpx.HTTPError as e:
                        self.failures.append(f"read {path} {e!r}")


def test_rebuild_under_load(settings: Settings, server: ServerProcess) -> None:
    auth = grant(settings)
    with httpx.Client(base_url=server.url, timeout=60, headers=auth) as c:
        for b in range(10):  # ~2,000 events before the rebuilds start
            r = c.post("/raw_data_files/bulk", json={"files": [
                file_spec(f"pre-{b}-{k}.fits", k) for k in range(200)]})
            assert r.status_code == 202, r.text
        r = c.post("/executed_obs_units/start?wait=true",
                   json={"obs_unit_id": "PRE", "instrument": "HARPS"})
        assert r.status_code == 200, r.text
        before = r.json()["position"]
    with Load(server.url, auth) as load:
        time.sleep(0.5)
        done = cli(settings, "rebuild", "--all", "--quiet", page_size=50)
        assert done.returncode == 0, done.stderr
        assert "rebuilt every read model" in done.stdout
        done = cli(settings, "rebuild", "raw_data_files", "executed_obs_units", "--quiet",
                   page_size=50)
        assert done.returncode == 0, done.stderr
        time.sleep(0.5)
    assert not load.failures, load.failures[:5]
    assert load.reads > 20 and load.writes > 10

    with httpx.Client(base_url=server.url, timeout=60, headers=auth) as c:  # all applied
        r = c.post("/executed_obs_units/start?wait=true",
                   json={"obs_unit_id": "LAST", "instrument": "HARPS"})
        assert r.status_code == 200, r.text
        last = r.json()["position"]
        assert last > before
        r = c.get(f"/executed_obs_units/LAST?min_position={last}")
        assert r.status_code == 200 and r.json()["executions"][0]["pending"] is False
    done = cli(settings, "check-projections")
    assert done.returncode == 0, done.stdout
    report = orjson.loads(done.stdout)
    assert report["ok"] and report["position"] >= last
    assert report["read_models"]["executed_obs_units"]["rows"] == load.writes + 2


def test_rebuild_arguments(settings: Settings) -> None:
    bad = cli(settings, "rebuild")
    assert bad.returncode == 2 and "--all" in bad.stderr
    bad = cli(settings, "rebuild", "nonsense")
    assert bad.returncode == 2 and "unknown read model" in bad.stderr


def test_rebuild_one_read_model(ledger: Ledger) -> None:
    """Only the named model is replaced, at the live position; the others are untouched."""
    from tests.integration.test_audit import _result_history

    _, rid = _result_history(ledger)
    projector = ledger.projector
    assert projector is not None and ledger.store is not None
    position = projector.catch_up()
    mark = "?" if ledger.store.kind == "sqlite" else "%s"
    with ledger.engine.begin() as conn:  # both read models edited behind the projector
        conn.exec_driver_sql(f"UPDATE observation_results SET assets_revision = 99 "
                             f"WHERE id = {mark}", (rid,))
        conn.exec_driver_sql("DELETE FROM executed_obs_units")
    with pytest.raises(ValueError, match="unknown read model"):
        projector.rebuild(models=["nonsense"])
    assert projector.rebuild(models=["observation_results"]) == position
    assert projector.read_position() == position
    _, report = projector.check()
    assert not report["observation_results"]["different"]
    assert report["executed_obs_units"]["missing"]  # not named: still broken
    with ledger.engine.connect() as conn:
        names = set(inspect(conn).get_table_names())
    assert not [n for n in names if "_r" in n and n.rsplit("_", 1)[0] in READ_MODELS]
    projector.rebuild(models=["executed_obs_units"])
    _, report = projector.check()
    assert all(not (r["missing"] or r["extra"] or r["different"]) for r in report.values())


def _varied_history(ledger: Ledger) -> None:
    """Results, obs units, files, packages grown by a counter (an expression update) and
    staging requests, projected live."""
    from uuid import uuid4

    from domain.staging import StagingRequest
    from tests.integration.test_audit import _result_history
    from tests.unit.test_domain import complete_package, make_file, make_package, prov, start_unit

    store, projector = ledger.store, ledger.projector
    assert store is not None and projector is not None
    _result_history(ledger)
    events: list[Any] = []
    for i in range(30):
        unit = start_unit(obs_unit_id=f"OU-{i}", metadata={"airmass": 1 + i / 10, "n": [i]})
        files = [make_file(f"u{i}-{k}.fits", 100 + k, executed_obs_unit_id=unit.id)
                 for k in range(3)]
        package = make_package(files[:2], executed_obs_unit_id=unit.id)
        package.add_files([files[2]], 10**12, prov())
        events += [*unit.collect_events(), *package.collect_events(),
                   *(e for f in files for e in f.collect_events())]
    for i in range(15):
        package = complete_package()
        req = StagingRequest.request(staging_id=uuid4(), packages=[package],
                                     destination="archive:/stage", provenance=prov())
        req.report_progress("in_progress", 10, 1, None, prov())
        if i % 2:
            req.cancel("enough", prov())
        events += [*package.collect_events(), *req.collect_events()]
    store.save(*events)
    projector.catch_up()


def test_a_fresh_build_equals_the_live_projection(ledger: Ledger) -> None:
    """The rebuild's path (levels, executemany, COPY on PostgreSQL, indexes after the fill)
    gives the same rows as the live projector's page-by-page statements."""
    from tests.conftest import read_model_rows

    store, projector = ledger.store, ledger.projector
    assert store is not None and projector is not None
    _varied_history(ledger)
    live = read_model_rows(ledger.engine)
    fresh, position = projector.build_fresh()
    try:
        assert position == store.max_position()
        built = read_model_rows(ledger.engine, fresh)
    finally:
        projector.drop(fresh)
    assert {m: len(r) for m, r in built.items()} == {m: len(r) for m, r in live.items()}
    assert built == live
    assert len(live["executed_obs_units"]) == 31 and len(live["staging_requests"]) == 15


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rebuild pages of 7 events (with a projector page of 7), decoder processes however
    short the log."""
    import projections.parallel_decode
    import projections.projector

    monkeypatch.setattr(projections.projector, "REBUILD_PAGE", 7)
    monkeypatch.setattr(projections.parallel_decode, "MIN_EVENTS", 0)


@pytest.mark.usefixtures("small_pages")
def test_decoder_processes_build_the_same_tables(ledger: Ledger) -> None:
    """Decoding in 2 or 3 processes gives the tables decoding in the rebuilding process
    gives, and the live ones: every read model, some of them, and a whole rebuild."""
    from tests.conftest import read_model_rows

    projector = ledger.projector
    assert projector is not None and ledger.store is not None
    _varied_history(ledger)
    live = read_model_rows(ledger.engine)
    projector.page_size = 7
    built: dict[int, Any] = {}
    for workers in (1, 2, 3):
        projector.rebuild_workers = workers
        fresh, position = projector.build_fresh()
        try:
            assert position == ledger.store.max_position()
            built[workers] = read_model_rows(ledger.engine, fresh)
        finally:
            projector.drop(fresh)
    assert built[2] == built[1] == live
    assert built[3] == live
    projector.rebuild_workers = 2
    some = ["raw_data_packages", "staging_requests"]
    fresh, _ = projector.build_fresh(models=some)
    try:
        with ledger.engine.connect() as conn:
            rows = {m: [dict(r) for r in conn.execute(select(t).order_by(t.c.id)).mappings()]
                    for m, t in zip(READ_MODELS, fresh.all(), strict=True) if m in some}
    finally:
        projector.drop(fresh)
    assert rows == {m: live[m] for m in some}
    assert projector.rebuild() == ledger.store.max_position()
    assert read_model_rows(ledger.engine) == live


@pytest.mark.usefixtures("small_pages")
def test_a_decoder_that_dies_fails_the_rebuild(ledger: Ledger) -> None:
    """A decoder process killed mid-build: the rebuild fails at once with a clear error (no
    wait), the fresh tables are dropped, the live ones untouched; the next rebuild works."""
    import multiprocessing
    import os
    import signal

    from projections.parallel_decode import DecoderDied
    from tests.conftest import read_model_rows

    projector = ledger.projector
    assert projector is not None and ledger.store is not None
    _varied_history(ledger)
    live = read_model_rows(ledger.engine)
    projector.page_size = 7
    projector.rebuild_workers = 2
    killed: list[int] = []

    def kill_a_decoder(_position: int, _head: int) -> None:
        if not killed:
            child = next(p for p in multiprocessing.active_children() if p.pid)
            assert child.pid is not None
            killed.append(child.pid)
            os.kill(child.pid, signal.SIGKILL)

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            projector.rebuild(kill_a_decoder)
        except BaseException as e:  # handed to the test
            outcome.append(e)

    t = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    t.start()
    t.join(60)
    assert not t.is_alive(), "the rebuild hangs after a decoder died"
    assert killed and len(outcome) == 1 and isinstance(outcome[0], DecoderDied), outcome
    assert "decoder process ended" in str(outcome[0])
    assert time.monotonic() - started < 30
    with ledger.engine.connect() as conn:
        names = set(inspect(conn).get_table_names())
    assert not [n for n in names if "_r" in n and n.rsplit("_", 1)[0] in READ_MODELS]
    assert read_model_rows(ledger.engine) == live
    assert projector.rebuild() == ledger.store.max_position()
    assert read_model_rows(ledger.engine) == live


def test_rebuild_workers_setting(settings: Settings) -> None:
    """OBSLEDGER_REBUILD_WORKERS reaches the projector; unset, a rebuild uses CPUs - 1."""
    import os

    from projections.parallel_decode import default_workers

    assert Settings(**{**settings.model_dump(), "rebuild_workers": 3}).rebuild_workers == 3
    with pytest.raises(ValueError):
        Settings(**{**settings.model_dump(), "rebuild_workers": 0})
    lg = Ledger(settings.model_copy(update={"rebuild_workers": 3}), workers=False)
    try:
        assert lg.projector is not None and lg.projector.rebuild_workers == 3
    finally:
        lg.stop()
    assert settings.rebuild_workers is None
    assert default_workers() == max(1, (os.cpu_count() or 1) - 1)
