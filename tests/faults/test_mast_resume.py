"""``obsledger downloader`` killed with SIGKILL mid-file and started again: the job resumes
from its last checkpoint (the partial truncated to it), the final bytes equal the source, at
most one checkpoint's worth is fetched twice, and a completed file is not fetched again.
SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.cli_common import cli_actor, human_bytes
from tests.conftest import ROOT, CliProcess, grant, settings_env
from tests.http.test_mast_downloads import FITS_DIR, download_settings, product, start, wait_status
from tests.support.mast_server import MastTestServer

CHUNK = 64 * 1024
CHECKPOINT_CHUNKS = 4
CHECKPOINT_BYTES = CHUNK * CHECKPOINT_CHUNKS
BIG = 6 * 1024 * 1024 + 123

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[MastTestServer]:
    s = MastTestServer()
    s.add("test0.fits", (FITS_DIR / "test0.fits").read_bytes())
    s.add("big.bin", os.urandom(BIG))
    s.faults["big.bin"] = {"delay": 0.04}  # ~4 s for the file: time to kill it mid-way
    s.start()
    yield s
    s.stop()


def _checkpoint(client: TestClient, job_id: str) -> int:
    """The big file's recorded checkpoint, once every journaled command is applied."""
    ledger = client.app.state.ledger  # type: ignore[attr-defined]
    deadline = time.monotonic() + 20
    while ledger.journal.depth() and time.monotonic() < deadline:
        time.sleep(0.05)
    job = ledger.store.get(uuid.UUID(job_id))
    return int(next(f for f in job.files if f["filename"] == "big.bin")["bytes_done"])


@pytest.mark.parametrize("mode", ["chunked", "parallel", "stream"])
def test_sigkill_mid_file_resumes_from_the_checkpoint(
        tmp_path: Path, store_kind: str, pg_database_if_needed: str | None,
        server: MastTestServer, mode: str) -> None:
    """chunked: one Range request at a time; parallel: 4 at once per file, parts written in
    order (the partial is a contiguous prefix: the kill loses the parts held in memory, never
    more than one checkpoint on disk); stream: one request for the rest of the file."""
    settings = download_settings(
        tmp_path, store_kind, pg_database_if_needed, server,
        download_checkpoint_chunks=CHECKPOINT_CHUNKS, download_checkpoint_s=60.0,
        download_connections_per_file=4 if mode == "parallel" else 1,
        embedded_downloader=False)
    partial = settings.download_dir / "kill/big.bin.part"
    final = settings.download_dir / "kill/big.bin"
    with TestClient(create_app(settings), headers=grant(settings)) as client:
        job_id = start(client, [product("test0.fits"), product("big.bin", BIG)],
                       destination="kill", chunked=mode != "stream", register_files=False)
        first = CliProcess(settings, "downloader")
        try:
            deadline = time.monotonic() + 30
            done = 0
            while time.monotonic() < deadline:
                body: dict[str, Any] = client.get(f"/mast/download/progress/{job_id}").json()
                big = next(f for f in body["files"] if f["filename"] == "big.bin")
                done = big["bytes_done"]
                if done >= 3 * CHECKPOINT_BYTES and body["files_completed"] == 1:
                    break
                time.sleep(0.02)
            # mid-file: past a few checkpoints, with more than two checkpoints' worth still to come
            # (a loaded machine polls slowly: the exact point does not matter)
            assert CHECKPOINT_BYTES <= done < BIG - 2 * CHECKPOINT_BYTES, body
            first.kill()
        finally:
            first.stop()
        if mode == "parallel":
            assert server.peak["big.bin"] >= 2  # the killed run fetched parts at once
        on_disk = partial.stat().st_size
        checkpoint = _checkpoint(client, job_id)
        assert 0 < checkpoint <= on_disk
        assert on_disk - checkpoint <= CHECKPOINT_BYTES  # at most one checkpoint's worth
        server.wait_idle("big.bin")  # the killed downloader's answer has stopped
        served_before = len(server.requests)
        sent_before = server.sent["big.bin"]
        server.faults["big.bin"] = {}
        second = CliProcess(settings, "downloader")
        try:
            job = wait_status(client, job_id, {"completed"}, timeout=60)
        finally:
            second.stop()
        assert hashlib.sha256(final.read_bytes()).hexdigest() == hashlib.sha256(
            server.files["big.bin"]).hexdigest()
        assert job["files"][1]["sha256"] == hashlib.sha256(server.files["big.bin"]).hexdigest()
        assert not partial.exists()
        after = server.requests[served_before:]
        assert all(name == "big.bin" for name, _, _ in after)  # the complete file: not again
        first_range = after[0][1]
        assert first_range is not None and first_range.startswith(f"bytes={checkpoint}-")
        # after the restart exactly the bytes from the checkpoint on were fetched
        assert server.sent["big.bin"] - sent_before == BIG - checkpoint
        refetched = on_disk - checkpoint
        assert refetched <= CHECKPOINT_BYTES
        assert job["files"][1]["restarts"] == 0


def test_download_command_line(tmp_path: Path, server: MastTestServer) -> None:
    """``obsledger download start --here`` (progress bars on stderr), ``list``, ``progress``,
    and ``obsledger downloader --once``."""
    settings = download_settings(tmp_path, "sqlite", None, server)
    env = settings_env(settings)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)

    r = cli("download", "start", "--uri", "mast:HST/product/test0.fits", "--destination",
            "cli", "--chunked", "--here")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("completed: 1/1 files")
    assert "test0.fits" in r.stderr  # the tqdm bar of the file
    assert (settings.download_dir / "cli/test0.fits").read_bytes() == server.files["test0.fits"]
    job_id = r.stdout.splitlines()[0].split('"download_job_id":"')[1][:36]
    r = cli("download", "list")
    assert r.returncode == 0 and job_id in r.stdout and "completed" in r.stdout
    header, row = r.stdout.strip().splitlines()
    assert header.split() == ["job", "status", "files", "bytes", "destination"]
    size = human_bytes(len(server.files["test0.fits"]))
    assert row.split() == [job_id, "completed", "1/1", *f"{size} / {size}".split(), "cli"]
    r = cli("download", "list", "--format", "json")
    [listed] = orjson.loads(r.stdout)
    assert listed["id"] == job_id and listed["bytes_done"] == len(server.files["test0.fits"])
    # the command given here names the person who gave it
    r = cli("replay", "--format", "json", "--event-type", "DownloadJob.Requested")
    assert [e["actor"] for e in orjson.loads(r.stdout)] == [cli_actor()]
    r = cli("download", "progress", job_id)
    assert r.returncode == 0 and '"status": "completed"' in r.stdout
    r = cli("download", "pause", job_id)
    assert r.returncode == 1 and "completed" in r.stderr
    r = cli("download", "start", "--uri", "mast:HST/product/test0.fits", "--destination",
            "../escape")
    assert r.returncode == 2 and "must not contain '..'" in r.stderr
    # a job left for the worker: 'obsledger downloader --once' runs it and exits
    server.faults["big.bin"] = {}
    r = cli("download", "start", "--uri", "mast:HST/product/big.bin", "--destination", "cli2")
    assert r.returncode == 0, r.stderr
    r = cli("dispatch", "--drain")
    assert r.returncode == 0, r.stderr
    r = cli("project", "--once")
    assert r.returncode == 0, r.stderr
    r = cli("downloader", "--once")
    assert r.returncode == 0 and "downloader idle" in r.stdout, r.stderr
    assert (settings.download_dir / "cli2/big.bin").stat().st_size == BIG
