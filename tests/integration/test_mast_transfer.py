"""The resumable HTTP transfer against a hostile local server: each fault, a clear outcome."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from infra.mast_transfer import (
    FileChanged,
    RemoteInfo,
    TransferConfig,
    TransferError,
    fetch,
)
from tests.support.mast_server import MastTestServer

CHUNK = 64 * 1024
SIZE = 1_000_003  # not a multiple of the chunk


@pytest.fixture
def server() -> Iterator[MastTestServer]:
    s = MastTestServer()
    s.add("big.bin", os.urandom(SIZE))
    s.start()
    yield s
    s.stop()


def _config(**kw: Any) -> TransferConfig:
    values: dict[str, Any] = {"chunk_size": CHUNK, "checkpoint_bytes": 2 * CHUNK,
                              "checkpoint_s": 60.0, "retries": 3, "backoff_base_s": 0.01,
                              "backoff_max_s": 0.05, "read_timeout_s": 5.0}
    values.update(kw)
    return TransferConfig(**values)


class Calls:
    def __init__(self) -> None:
        self.started: list[RemoteInfo] = []
        self.checkpoints: list[int] = []

    async def on_started(self, info: RemoteInfo) -> None:
        self.started.append(info)

    async def on_checkpoint(self, done: int, speed: float | None) -> None:
        self.checkpoints.append(done)


def _mode(mode: str) -> dict[str, Any]:
    return {"mode": "chunked", "connections": 4} if mode == "parallel" else {"mode": mode}


def run(server: MastTestServer, partial: Path, offset: int = 0,
        known: RemoteInfo | None = None, **kw: Any) -> tuple[int, RemoteInfo, Calls]:
    calls = Calls()

    async def go() -> tuple[int, RemoteInfo]:
        async with aiohttp.ClientSession() as session:
            return await fetch(session, f"{server.url}/api/v0.1/Download/file?uri=mast:X/big.bin",
                               partial, offset, known, _config(**kw),
                               started=calls.on_started, checkpoint=calls.on_checkpoint)

    size, info = asyncio.run(go())
    return size, info, calls


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("mode", ["chunked", "stream"])
def test_whole_file_with_checkpoints_every_n_chunks(server: MastTestServer, tmp_path: Path,
                                                    mode: str) -> None:
    part = tmp_path / "big.bin.part"
    size, _info, calls = run(server, part, mode=mode)
    assert size == SIZE and part.read_bytes() == server.files["big.bin"]
    assert len(calls.started) == 1 and calls.started[0].size == SIZE
    assert calls.started[0].etag
    # every 2 chunks, never per chunk; increasing; each within the file
    assert calls.checkpoints == sorted(calls.checkpoints)
    assert len(calls.checkpoints) <= SIZE // (2 * CHUNK) + 1
    assert all(b - a >= 2 * CHUNK for a, b in zip(calls.checkpoints, calls.checkpoints[1:],
                                                  strict=False))
    if mode == "chunked":
        assert len(server.served_from("big.bin")) == -(-SIZE // CHUNK)


def test_resume_truncates_the_partial_to_the_checkpoint(server: MastTestServer,
                                                        tmp_path: Path) -> None:
    data = server.files["big.bin"]
    part = tmp_path / "big.bin.part"
    part.write_bytes(data[:300_000] + b"garbage written after the checkpoint")
    _, info, _ = run(server, part)  # learn the validators
    part.write_bytes(data[:300_000] + b"garbage written after the checkpoint")
    _size, _, calls = run(server, part, offset=300_000, known=info)
    assert part.read_bytes() == data
    assert calls.started == []  # a resumed file is not started again
    assert server.served_from("big.bin")[-1] >= 300_000


def test_200_answer_to_a_range_request_does_not_corrupt(server: MastTestServer,
                                                        tmp_path: Path) -> None:
    data = server.files["big.bin"]
    part = tmp_path / "big.bin.part"
    _, info, _ = run(server, part)
    part.write_bytes(data[:400_000])
    server.faults["big.bin"] = {"ignore_range": True}
    run(server, part, offset=400_000, known=info)
    assert sha(part.read_bytes()) == sha(data)


@pytest.mark.parametrize("mode", ["chunked", "stream"])
def test_missing_content_length(server: MastTestServer, tmp_path: Path, mode: str) -> None:
    server.faults["big.bin"] = {"no_length": True}
    part = tmp_path / "big.bin.part"
    size, _, _ = run(server, part, mode=mode)
    assert size == SIZE and part.read_bytes() == server.files["big.bin"]


@pytest.mark.parametrize("fault", ["truncate", "reset"])
@pytest.mark.parametrize("mode", ["chunked", "stream", "parallel"])
def test_truncated_body_and_reset_mid_chunk_are_retried(server: MastTestServer, tmp_path: Path,
                                                        fault: str, mode: str) -> None:
    # parallel: the first chunk, then parts; the faults hit the first parts asked at once
    server.faults["big.bin"] = {fault: 2 if mode != "parallel" else 3, "cut_at": 40_000}
    part = tmp_path / "big.bin.part"
    _size, _, _ = run(server, part, **_mode(mode))
    assert sha(part.read_bytes()) == sha(server.files["big.bin"])
    # what arrived before the cut was kept: little is sent twice
    assert server.sent["big.bin"] <= SIZE + 2 * CHUNK


def test_5xx_storm_fails_after_the_retries(server: MastTestServer, tmp_path: Path) -> None:
    server.faults["big.bin"] = {"fail": 100, "fail_status": 503}
    with pytest.raises(TransferError, match=r"HTTP 503 \(after 3 retries\)"):
        run(server, tmp_path / "big.bin.part")
    assert len(server.requests) == 4  # the first try and 3 retries


def test_a_few_5xx_are_ridden_out(server: MastTestServer, tmp_path: Path) -> None:
    server.faults["big.bin"] = {"fail": 3, "fail_status": 502}
    part = tmp_path / "big.bin.part"
    run(server, part)
    assert part.read_bytes() == server.files["big.bin"]


def test_changed_file_on_resume_is_detected(server: MastTestServer, tmp_path: Path) -> None:
    part = tmp_path / "big.bin.part"
    _, info, _ = run(server, part)
    part.write_bytes(server.files["big.bin"][:200_000])
    server.add("big.bin", os.urandom(SIZE), modified=1_800_000_000.0)
    with pytest.raises(FileChanged, match="ETag changed"):
        run(server, part, offset=200_000, known=info)


def test_client_error_fails_at_once(server: MastTestServer, tmp_path: Path) -> None:
    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            await fetch(session, f"{server.url}/api/v0.1/Download/file?uri=mast:X/nope.fits",
                        tmp_path / "nope.part", 0, None, _config(),
                        started=Calls().on_started, checkpoint=Calls().on_checkpoint)

    with pytest.raises(TransferError, match="HTTP 404"):
        asyncio.run(go())
    assert len(server.requests) == 1


def test_unreachable_server_fails_after_retries(tmp_path: Path) -> None:
    from tests.support.processes import free_port

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            await fetch(session, f"http://127.0.0.1:{free_port()}/x", tmp_path / "x.part", 0,
                        None, _config(), started=Calls().on_started,
                        checkpoint=Calls().on_checkpoint)

    with pytest.raises(TransferError, match="after 3 retries"):
        asyncio.run(go())


def run_watched(server: MastTestServer, partial: Path, offset: int = 0,
                known: RemoteInfo | None = None, **kw: Any,
                ) -> tuple[int, Calls, str, list[int]]:
    """``run`` with the file's sha256 computed while writing and the live positions."""
    calls = Calls()
    digest = hashlib.sha256()
    positions: list[int] = []

    async def go() -> int:
        async with aiohttp.ClientSession() as session:
            size, _ = await fetch(
                session, f"{server.url}/api/v0.1/Download/file?uri=mast:X/big.bin", partial,
                offset, known, _config(**kw), started=calls.on_started,
                checkpoint=calls.on_checkpoint, progress=positions.append, digest=digest)
            return size

    return asyncio.run(go()), calls, digest.hexdigest(), positions


def test_parallel_parts_are_written_in_order_and_hashed(server: MastTestServer,
                                                        tmp_path: Path) -> None:
    data = server.files["big.bin"]
    server.faults["big.bin"] = {"delay": 0.002}  # answers last long enough to overlap
    part = tmp_path / "big.bin.part"
    size, calls, digest, positions = run_watched(server, part, connections=4)
    assert size == SIZE and part.read_bytes() == data and digest == sha(data)
    assert server.peak["big.bin"] >= 2  # parts of one file were fetched at once
    assert server.peak["big.bin"] <= 4
    # every chunk asked once, each from its own first byte
    assert sorted(server.served_from("big.bin")) == list(range(0, SIZE, CHUNK))
    assert server.sent["big.bin"] == SIZE
    # checkpoints: a contiguous prefix, increasing, never closer than the interval
    assert calls.checkpoints == sorted(calls.checkpoints) and calls.checkpoints[-1] <= SIZE
    assert all(b - a >= 2 * CHUNK for a, b in zip(calls.checkpoints, calls.checkpoints[1:],
                                                  strict=False))
    # live progress counts the parts received ahead of the written prefix, up to the end
    assert positions[-1] == SIZE and max(positions) == SIZE


def test_parallel_resume_from_a_checkpoint(server: MastTestServer, tmp_path: Path) -> None:
    """A partial cut at its checkpoint plus garbage (what a kill leaves): the parts start at
    the checkpoint, the garbage is gone, the hash covers the kept prefix."""
    data = server.files["big.bin"]
    part = tmp_path / "big.bin.part"
    _, info, _ = run(server, part)
    part.write_bytes(data[:4 * CHUNK] + b"bytes after the checkpoint, never recorded")
    requests_before = len(server.requests)
    sent_before = server.sent["big.bin"]
    size, calls, digest, _ = run_watched(server, part, offset=4 * CHUNK, known=info,
                                         connections=4)
    assert size == SIZE and part.read_bytes() == data and digest == sha(data)
    assert calls.started == []
    assert server.sent["big.bin"] - sent_before == SIZE - 4 * CHUNK  # nothing twice
    firsts = [int(r[1].split("=")[1].split("-")[0])
              for r in server.requests[requests_before:] if r[1]]
    assert min(firsts) == 4 * CHUNK


@pytest.mark.parametrize("honoured", [0, 1])
def test_parallel_falls_back_to_one_stream_when_range_is_ignored(
        server: MastTestServer, tmp_path: Path, honoured: int) -> None:
    """A server that ignores Range from the start (0), or after the first part (1): one
    request at a time from the first byte not written, the whole body's head skipped."""
    data = server.files["big.bin"]
    server.faults["big.bin"] = {"ignore_range_after": honoured}
    part = tmp_path / "big.bin.part"
    size, _calls, digest, _ = run_watched(server, part, connections=4)
    assert size == SIZE and part.read_bytes() == data and digest == sha(data)
    statuses = [status for name, _, status in server.requests if name == "big.bin"]
    assert statuses[:honoured] == [206] * honoured
    assert statuses[-1] == 200  # the rest as one whole-file answer, its head skipped
    if honoured == 0:
        assert statuses == [200]  # no parallel parts for a server without Range
    else:  # at most one 200 per connection before falling back, then the one stream
        assert len(statuses) <= honoured + 4 + 1


def test_parallel_file_changed_between_parts(server: MastTestServer, tmp_path: Path) -> None:
    part = tmp_path / "big.bin.part"
    _, info, _ = run(server, part)
    part.write_bytes(server.files["big.bin"][:CHUNK])
    server.add("big.bin", os.urandom(SIZE), modified=1_800_000_000.0)
    with pytest.raises(FileChanged, match="ETag changed"):
        run_watched(server, part, offset=CHUNK, known=info, connections=4)
