"""``obsledger export`` / ``import``: a backup of the log with its chain round-trips byte for
byte into a fresh store (SQLite and PostgreSQL); a tampered file is refused at its first bad
line and nothing is imported; a non-empty store is refused."""

from __future__ import annotations

import base64
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from uuid import uuid4

import orjson
import pytest

from bootstrap.ledger import Ledger
from domain.staging import StagingRequest
from infra.audit_chain import AnchorLog, ChainKeeper, verify
from infra.settings import Settings
from tests.conftest import ROOT, make_settings, settings_env
from tests.integration.test_audit import _result_history
from tests.unit.test_domain import complete_package, prov


def cli(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "api.cli", *args], env=settings_env(settings),
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture
def fresh(tmp_path: Path, store_kind: str, request: pytest.FixtureRequest) -> Iterator[Ledger]:
    """A second, empty store of the same kind."""
    dbname = request.getfixturevalue("pg_database")() if store_kind == "postgres" else None
    lg = Ledger(make_settings(tmp_path / "restore", store_kind, dbname), workers=False)
    yield lg
    lg.stop()


def history(ledger: Ledger) -> None:
    """Commands through the dispatcher, and events saved directly (a staging request)."""
    _result_history(ledger)
    assert ledger.store is not None
    package = complete_package()
    req = StagingRequest.request(staging_id=uuid4(), packages=[package],
                                 destination="archive:/stage", provenance=prov())
    req.cancel("test", prov())
    ledger.store.save(*package.collect_events(), *req.collect_events())


def test_export_import_round_trips_byte_for_byte(ledger: Ledger, fresh: Ledger,
                                                 tmp_path: Path) -> None:
    history(ledger)
    assert ledger.store is not None and fresh.store is not None
    ChainKeeper(ledger.store, ledger.engine, AnchorLog(ledger.settings.anchors_file)).catch_up()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    done = cli(ledger.settings, "export", "--out", str(first), "--quiet")
    assert done.returncode == 0, done.stderr
    lines = first.read_bytes().splitlines()
    head = ledger.store.max_position()
    assert len(lines) == head + 2
    assert orjson.loads(lines[0])["format"] == "obsledger.export.v1"
    trailer = orjson.loads(lines[-1])
    with ledger.engine.connect() as conn:  # the links are the audit chain's
        chain_head = conn.exec_driver_sql(
            "SELECT link FROM audit_chain ORDER BY position DESC LIMIT 1").scalar()
    assert trailer == {"trailer": True, "count": head, "last_position": head,
                       "head": chain_head}

    done = cli(fresh.settings, "import", str(first), "--quiet")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"ok": True, "events": head, "last_position": head,
                                         "head": chain_head}
    done = cli(fresh.settings, "export", "--out", str(second), "--quiet")
    assert done.returncode == 0, done.stderr
    assert second.read_bytes() == first.read_bytes()

    # the restored store verifies (chain rows and an anchor written by the import) …
    anchors = AnchorLog(fresh.settings.anchors_file)
    assert anchors.read()[-1]["position"] == head
    result = verify(fresh.store, fresh.engine, anchors)
    assert result.ok and result.events == head and result.anchors_checked == 1
    # … its aggregates and read models are the original's …
    for n in ledger.store.select_notifications(0, 1000):
        assert fresh.store.get(n.originator_id) == ledger.store.get(n.originator_id)
    assert fresh.projector is not None and fresh.projector.catch_up() == head
    _, report = fresh.projector.check()
    assert all(not (r["missing"] or r["extra"] or r["different"]) for r in report.values())
    # … and new events follow the imported ones
    more = StagingRequest.request(staging_id=uuid4(), packages=[complete_package()],
                                  destination="d", provenance=prov())
    (recording,) = fresh.store.save(*more.collect_events())
    assert recording.notification.id == head + 1

    # export to stdout is the same file
    done = subprocess.run([sys.executable, "-m", "api.cli", "export", "--quiet"],
                          env=settings_env(ledger.settings), cwd=ROOT, capture_output=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == first.read_bytes()


def _tamper(path: Path, line: int) -> None:
    lines = path.read_bytes().splitlines(keepends=True)
    obj = orjson.loads(lines[line - 1])
    state = bytearray(base64.b64decode(obj["state"]))
    state[state.index(b'"actor":"') + 9] ^= 0x01  # one changed byte in the actor
    obj["state"] = base64.b64encode(bytes(state)).decode()
    lines[line - 1] = orjson.dumps(obj) + b"\n"
    path.write_bytes(b"".join(lines))


def test_a_tampered_export_is_refused_at_its_first_bad_line(ledger: Ledger, fresh: Ledger,
                                                            tmp_path: Path) -> None:
    history(ledger)
    assert fresh.store is not None
    path = tmp_path / "backup.jsonl"
    assert cli(ledger.settings, "export", "--out", str(path), "--quiet").returncode == 0
    good = path.read_bytes()
    _tamper(path, 7)  # the event at position 6
    _tamper(path, 9)
    done = cli(fresh.settings, "import", str(path), "--quiet")
    assert done.returncode == 1
    body = orjson.loads(done.stdout)
    assert body["ok"] is False and body["line"] == 7 and "position 6" in body["error"]
    assert "line 7" in done.stderr and "nothing imported" in done.stderr
    assert fresh.store.max_position() == 0
    assert AnchorLog(fresh.settings.anchors_file).read() == []

    lines = good.splitlines(keepends=True)
    for broken, line, words in (
            (lines[:4] + lines[5:], 5, "does not match"),         # a deleted event
            ([*lines[:4], lines[5], lines[4], *lines[6:]], 5, "does not match"),  # swapped
            ([*lines[:5], lines[4], *lines[5:]], 6, "does not follow"),  # duplicated
            (lines[:-1], len(lines), "truncated")):             # no trailer
        path.write_bytes(b"".join(broken))
        done = cli(fresh.settings, "import", str(path), "--quiet")
        assert done.returncode == 1, done.stderr
        body = orjson.loads(done.stdout)
        assert body["line"] == line and words in body["error"], body
        assert fresh.store.max_position() == 0

    path.write_bytes(good)  # the good file still imports; then a second import is refused
    assert cli(fresh.settings, "import", str(path), "--quiet").returncode == 0
    again = cli(fresh.settings, "import", str(path), "--quiet")
    assert again.returncode == 2 and "not empty" in again.stderr
