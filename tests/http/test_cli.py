"""``obsledger`` as a person types it: one clear line instead of a traceback, help on every
option, tables a person reads and JSON a script parses, the actor of commands given here, the
event store or the port unreachable said once and plainly."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from api.cli import build_parser
from api.cli_common import cli_actor
from bootstrap.ledger import Ledger
from commands.raw_data import BulkRegisterRawDataFilesRequest, RawDataFileSpec
from infra.settings import Settings
from tests.conftest import ROOT, make_settings, settings_env
from tests.support.processes import free_port

LONG_ACTOR = "service:telescope-automation-of-the-3.6m-dome"


def cli(settings: Settings, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=settings_env(settings),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _files(ledger: Ledger, count: int, actor: str = LONG_ACTOR) -> str:
    """Register ``count`` raw data files in one command (one event each); its command id."""
    request = BulkRegisterRawDataFilesRequest(files=[RawDataFileSpec(
        name=f"HARPS.2026-11-21T23:{i // 60:02d}:{i % 60:02d}.fits",
        relative_path=f"2026-11-21/HARPS.{i}.fits", size=16_793_280,
        checksum={"algorithm": "md5", "value": f"{i:032x}"}, instrument="HARPS",
        file_type="raw_science") for i in range(count)])
    body = asyncio.run(ledger.commands.submit("raw_data_file.register_bulk", request,
                                              actor=actor, correlation_id=None,
                                              idempotency_key=None)).body
    assert ledger.dispatcher is not None and ledger.projector is not None
    ledger.dispatcher.drain(timeout=60)
    ledger.projector.catch_up()
    return str(body["command_id"])


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, "sqlite")


def _no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout, done.stderr


def test_version_and_help_on_every_option() -> None:
    parser = build_parser()
    undocumented = []

    def walk(p: argparse.ArgumentParser, path: str) -> None:
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                undocumented.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(parser, "obsledger")
    assert undocumented == []
    done = subprocess.run([sys.executable, "-m", "api.cli", "--version"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("obsledger 0."), done.stderr


@pytest.mark.parametrize("args", [
    ("state", "OU-2026-0412"), ("trail", "night-1121-ou-0412-start"),
    ("download", "progress", "OU-2026-0412"), ("download", "pause", "x"),
    ("download", "cancel", "not-a-job", "--reason", "clouds"),
    ("replay", "--recorded-from", "yesterday evening"), ("state", "--observed-at", "61000.5x",
                                                          "6d3f1c9e-0000-4000-8000-000000000000"),
    ("download", "start", "--uri", "bad"), ("download", "start", "--chunk-size", "0"),
    ("download", "list", "--status", "lost"),
])
def test_bad_arguments_are_one_clear_line(sqlite_settings: Settings, args: tuple[str, ...],
                                          ) -> None:
    done = cli(sqlite_settings, *args)
    _no_traceback(done)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("obsledger"), done.stderr
    for leak in ("_utc_time", "_entity_id", "pydantic", "errors.pydantic.dev", "type="):
        assert leak not in done.stderr
    if "--recorded-from" in args:
        assert "is not a time" in last and "ISO 8601" in last
    if "--uri" in args:
        assert last == "obsledger download start: --uri: String should have at least 6 characters"


def test_unreachable_event_store_is_one_line_naming_host_and_port(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    settings = make_settings(tmp_path, "postgres", "obsledger", postgres_port=port)
    for args in (("project", "--once"), ("replay",), ("download", "list"),
                 ("worker", "--once"), ("downloader", "--once")):
        done = cli(settings, *args)
        _no_traceback(done)
        assert done.returncode == 2
        [line] = done.stderr.strip().splitlines()  # not JSON warnings, one plain line
        assert line.startswith("obsledger: the event store does not answer: PostgreSQL at "
                               f"127.0.0.1:{port} (database obsledger"), line


def test_a_port_in_use_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "sqlite")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = cli(settings, "serve", "--port", str(port), timeout=60)
    _no_traceback(done)
    assert done.returncode == 2
    assert done.stderr.strip() == (f"obsledger serve: cannot listen on 127.0.0.1:{port}: "
                                   "the port is already in use")
    assert "API on" not in done.stdout
    assert not (settings.data_dir / "admin-password").exists()
    assert not (settings.data_dir / "journal.sqlite3").exists()


def test_service_token_refuses_other_roles_of_an_existing_account(
        sqlite_settings: Settings) -> None:
    first = cli(sqlite_settings, "service-token", "dome-pc", "--role", "automation")
    assert first.returncode == 0 and first.stdout.count(".") == 2, first.stderr  # a JWT
    again = cli(sqlite_settings, "service-token", "dome-pc", "--role", "automation")
    assert again.returncode == 0 and again.stdout != first.stdout
    other = cli(sqlite_settings, "service-token", "dome-pc", "--role", "operator")
    _no_traceback(other)
    assert other.returncode == 1 and other.stdout == ""
    assert "exists with the roles automation" in other.stderr
    assert "not operator: no token issued" in other.stderr


def test_replay_table_and_json_keep_the_whole_actor_and_the_command_id(
        ledger: Ledger) -> None:
    command_id = _files(ledger, 3)
    table = cli(ledger.settings, "replay", "--event-type", "RawDataFile.Registered")
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.strip().splitlines()
    assert header.split() == ["position", "recorded", "at", "(UTC)", "event", "actor",
                              "command", "id", "aggregate"]
    assert len(rows) == 3
    assert all(LONG_ACTOR in row and command_id in row for row in rows)
    as_json = cli(ledger.settings, "replay", "--format", "json")
    assert as_json.returncode == 0, as_json.stderr
    events = orjson.loads(as_json.stdout)
    registered = [e for e in events if e["event_type"] == "RawDataFile.Registered"]
    assert [e["actor"] for e in registered] == [LONG_ACTOR] * 3
    assert {e["command_id"] for e in registered} == {command_id}
    empty = cli(ledger.settings, "replay", "--format", "json", "--actor", "nobody")
    assert orjson.loads(empty.stdout) == []


def test_export_into_a_closed_pipe_ends_quietly(ledger: Ledger) -> None:
    _files(ledger, 600)  # far more than a pipe holds
    proc = subprocess.Popen([sys.executable, "-m", "api.cli", "export", "--quiet"],
                            env=settings_env(ledger.settings), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()  # `obsledger export | head -1`
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141  # 128 + SIGPIPE, as a shell reports a writer whose reader left
    assert orjson.loads(first)["format"] == "obsledger.export.v1"
    assert err == ""


def test_project_and_results_once_and_check_projections_report_progress(
        ledger: Ledger) -> None:
    """The progress bars' sources: the positions reached and the read models compared."""
    assert ledger.projector is not None and ledger.results is not None
    _files(ledger, 2)
    asyncio.run(ledger.commands.submit("raw_data_file.register_bulk",
                                       BulkRegisterRawDataFilesRequest(files=[RawDataFileSpec(
                                           name="late.fits", relative_path="late.fits",
                                           size=1, checksum={"algorithm": "md5",
                                                             "value": "0" * 32},
                                           instrument="HARPS", file_type="raw_science")]),
                                       actor="night", correlation_id=None,
                                       idempotency_key=None))
    assert ledger.dispatcher is not None
    ledger.dispatcher.drain(timeout=60)
    head = ledger.projector.store.max_position()
    reached: list[int] = []
    assert ledger.projector.catch_up(progress=reached.append) == head
    assert reached and reached[-1] == head
    handled: list[int] = []
    ledger.results.catch_up(progress=handled.append)
    assert handled and handled[-1] == head
    compared: list[str] = []
    ledger.projector.check(compared=compared.append)
    from projections.tables import READ_MODELS

    assert compared == list(READ_MODELS)
    done = cli(ledger.settings, "project", "--once")
    assert done.returncode == 0 and done.stdout.strip() == f"read models at position {head}"


def test_cli_actor_names_the_person() -> None:
    assert cli_actor() == f"cli:{getpass.getuser()}@{socket.gethostname()}"
