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
from tests.mast_server import MastTestServer

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
@pytest.mark.parametrize("mode", ["chunked", "stream"])
def test_truncated_body_and_reset_mid_chunk_are_retried(server: MastTestServer, tmp_path: Path,
                                                        fault: str, mode: str) -> None:
    server.faults["big.bin"] = {fault: 2, "cut_at": 40_000}
    part = tmp_path / "big.bin.part"
    _size, _, _ = run(server, part, mode=mode)
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
    from tests.conftest import free_port

    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            await fetch(session, f"http://127.0.0.1:{free_port()}/x", tmp_path / "x.part", 0,
                        None, _config(), started=Calls().on_started,
                        checkpoint=Calls().on_checkpoint)

    with pytest.raises(TransferError, match="after 3 retries"):
        asyncio.run(go())
