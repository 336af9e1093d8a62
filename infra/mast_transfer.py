"""Resumable HTTP downloads with aiohttp: Range requests, checkpoints, retries with backoff.

``fetch`` writes one file's bytes into its partial file from ``offset`` on, and calls back
at every checkpoint (after an fsync: a checkpoint never claims bytes that are not durable).
What a hostile server gets (``docs/ARCHITECTURE.md``, "MAST downloads"):

- a 200 (whole body) answer to a Range request: the first ``offset`` bytes of the body are
  skipped and the rest appended, so the partial file is never overwritten from byte 0;
- no Content-Length: the body is read to its end; with a Content-Range total or a size from
  the archive the end is checked, else the end of the body is the end of the file;
- a file that changed (ETag, Last-Modified or total size differ from the first answer):
  ``FileChanged`` (the caller restarts the file from 0 or fails the job);
- a truncated body, a connection reset, a timeout, a 5xx or 429: retried from the first byte
  not yet written, after ``base * 2**n`` seconds with full jitter, up to ``retries`` times in a
  row (bytes arriving reset the count); then ``TransferError``;
- any other 4xx: ``TransferError`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import random
import re
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

READ_BLOCK = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes \*/(\d+)$")


class TransferError(Exception):
    """The file cannot be fetched (after the retries, or at once for a client error)."""


class FileChanged(TransferError):
    """The server's file is not the one the partial file holds the beginning of."""


class _Retry(Exception):
    """A failure worth another try (5xx, truncated body, …)."""


@dataclass(frozen=True, slots=True)
class RemoteInfo:
    size: int | None
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True, slots=True)
class TransferConfig:
    chunk_size: int = 5 * 1024 * 1024
    mode: str = "chunked"  # or "stream": one request for the rest of the file
    checkpoint_bytes: int = 10 * 1024 * 1024
    checkpoint_s: float = 5.0
    retries: int = 3
    backoff_base_s: float = 1.0
    backoff_max_s: float = 30.0
    read_timeout_s: float = 60.0


Started = Callable[[RemoteInfo], Awaitable[None]]
Checkpoint = Callable[[int, float | None], Awaitable[None]]
Progress = Callable[[int], None]


class _Sink:
    """Writes the received bytes into the partial file and feeds the digest, in a thread of
    its own and in order, while the loop goes on receiving. The loop gathers blocks and hands
    over a megabyte at a time (one ``os.write`` and one digest update, both without the GIL);
    at most ``window`` hand-overs wait, so at most ``window * batch`` bytes are in memory.

    The thread takes its work from a ``SimpleQueue`` and reports back with
    ``call_soon_threadsafe``: a ``ThreadPoolExecutor`` per hand-over made the loop and the
    writer contend for the executor's locks and then for the GIL (up to a 5 ms switch
    interval each time), and writing from the loop itself kept it from receiving
    (bench/downloads.py, py-spy --gil)."""

    def __init__(self, fd: int, digest: Any | None, batch: int = 1024 * 1024,
                 window: int = 8) -> None:
        self.fd = fd
        self.digest = digest
        self.batch = batch
        self.window = window
        self.loop = asyncio.get_running_loop()
        self.work: queue.SimpleQueue[tuple[list[bytes], asyncio.Future[None] | None,
                                           Callable[[int], None] | None] | None] = (
            queue.SimpleQueue())
        self.gathered: list[bytes] = []
        self.gathered_bytes = 0
        self.in_flight = 0
        self.room = asyncio.Event()
        self.error: BaseException | None = None
        self._failed = False  # the thread's view: nothing more is written after a failure
        self.thread = threading.Thread(target=self._run, name="partial-writer", daemon=True)
        self.thread.start()

    async def add(self, data: bytes) -> None:
        self.gathered.append(data)
        self.gathered_bytes += len(data)
        if self.gathered_bytes >= self.batch:
            await self._hand_over()

    async def _hand_over(self, then: Callable[[int], None] | None = None) -> None:
        if not self.gathered and then is None:
            return
        while self.in_flight >= self.window:
            self.room.clear()
            await self.room.wait()
        self._raise()
        pieces, self.gathered, self.gathered_bytes = self.gathered, [], 0
        done: asyncio.Future[None] | None = self.loop.create_future() if then else None
        self.in_flight += 1
        self.work.put((pieces, done, then))
        if done is not None:
            await done
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.work.get()) is not None:
            pieces, done, then = item
            error: BaseException | None = None
            try:
                if self._failed:
                    raise OSError("an earlier write to the partial file failed")
                if pieces:
                    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    view = memoryview(data)
                    while view:  # a write may take less than it was given
                        view = view[os.write(self.fd, view):]
                    if self.digest is not None:
                        self.digest.update(data)
                if then is not None:
                    then(self.fd)
            except BaseException as e:
                self._failed = True
                error = e
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                self.loop.call_soon_threadsafe(self._written, done, error)

    def _written(self, done: asyncio.Future[None] | None, error: BaseException | None) -> None:
        self.in_flight -= 1
        self.room.set()
        if error is not None and self.error is None:
            self.error = error
        if done is not None and not done.done():
            done.set_result(None)

    async def sync(self, full: bool = False) -> None:
        """Every byte added is written, hashed and on disk (``fdatasync``; ``fsync`` when
        ``full``)."""
        await self._hand_over(os.fsync if full else os.fdatasync)

    def close(self) -> None:
        """Stop writing once what was handed over is written (bytes after the last sync may
        be lost: the next fetch truncates the partial file to its checkpoint)."""
        self.work.put(None)
        self.thread.join()


def _hash_prefix(fd: int, length: int, digest: Any) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    left = length
    while left:
        data = os.read(fd, min(left, 4 * 1024 * 1024))
        if not data:
            raise OSError(f"the partial file ended {left} bytes before its checkpoint")
        digest.update(data)
        left -= len(data)


def partial_length(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
    return random.uniform(0, min(cap, base * 2 ** (attempt - 1)))


def _remote(resp: aiohttp.ClientResponse, size: int | None) -> RemoteInfo:
    return RemoteInfo(size=size, etag=resp.headers.get("ETag"),
                      last_modified=resp.headers.get("Last-Modified"))


def _changed(known: RemoteInfo, now: RemoteInfo) -> str | None:
    if known.etag and now.etag and known.etag != now.etag:
        return f"ETag changed from {known.etag} to {now.etag}"
    if known.last_modified and now.last_modified and known.last_modified != now.last_modified:
        return f"Last-Modified changed from {known.last_modified} to {now.last_modified}"
    if known.size is not None and now.size is not None and known.size != now.size:
        return f"size changed from {known.size} to {now.size} bytes"
    return None


async def fetch(session: aiohttp.ClientSession, url: str, partial: Path, offset: int,
                known: RemoteInfo | None, config: TransferConfig, *,
                started: Started, checkpoint: Checkpoint,
                progress: Progress | None = None,
                digest: Any | None = None) -> tuple[int, RemoteInfo]:
    """Fetch ``url`` into ``partial`` from ``offset`` (bytes already there and checkpointed;
    the file is truncated to it) to the end. ``known`` is what the server said when the file
    was started (None: not started; ``started`` is called with the first answer).
    ``digest`` (a hashlib object) is fed the whole file: the kept prefix, then every byte
    written. Returns the file's size and the server's description of it."""
    partial.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
    loop = asyncio.get_running_loop()
    sink = _Sink(fd, digest)
    try:
        os.ftruncate(fd, offset)
        if digest is not None and offset:
            await loop.run_in_executor(None, _hash_prefix, fd, offset, digest)
        os.lseek(fd, offset, os.SEEK_SET)
        pos = offset
        total = known.size if known is not None else None
        failures = 0
        ckpt_pos, ckpt_t = pos, time.monotonic()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=config.read_timeout_s,
                                        sock_read=config.read_timeout_s)

        async def maybe_checkpoint(force: bool = False) -> None:
            nonlocal ckpt_pos, ckpt_t
            now = time.monotonic()
            if pos == ckpt_pos or not (force or pos - ckpt_pos >= config.checkpoint_bytes
                                       or now - ckpt_t >= config.checkpoint_s):
                return
            await sink.sync()
            speed = (pos - ckpt_pos) / (now - ckpt_t) if now > ckpt_t else None
            await checkpoint(pos, round(speed, 1) if speed is not None else None)
            ckpt_pos, ckpt_t = pos, now

        while total is None or pos < total:
            headers = {"Accept-Encoding": "identity"}
            asked_end: int | None = None
            if config.mode == "chunked":
                asked_end = pos + config.chunk_size - 1
                if total is not None:
                    asked_end = min(asked_end, total - 1)
                headers["Range"] = f"bytes={pos}-{asked_end}"
            elif pos > 0:
                headers["Range"] = f"bytes={pos}-"
            progressed = False
            try:
                async with session.get(url, headers=headers, timeout=timeout,
                                       allow_redirects=True) as resp:
                    if resp.status >= 500 or resp.status == 429:
                        raise _Retry(f"HTTP {resp.status}")
                    if resp.status == 416:
                        m = _UNSATISFIED.match(resp.headers.get("Content-Range", ""))
                        if m and int(m.group(1)) == pos:  # nothing after pos: the end
                            total = pos
                            if known is None:  # an empty file
                                known = _remote(resp, 0)
                                await started(known)
                            break
                        raise FileChanged(f"HTTP 416 for a range from byte {pos} "
                                          f"({resp.headers.get('Content-Range', 'no size')})")
                    if resp.status not in (200, 206):
                        raise TransferError(f"HTTP {resp.status} {resp.reason or ''}".strip())
                    skip = 0
                    part_length: int | None
                    if resp.status == 206:
                        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                        if m is None or int(m.group(1)) != pos:
                            raise _Retry("206 with a Content-Range not starting at byte "
                                         f"{pos}: {resp.headers.get('Content-Range')}")
                        remote_total = None if m.group(3) == "*" else int(m.group(3))
                        part_length = int(m.group(2)) - pos + 1
                    else:  # 200: the whole file, whatever was asked
                        skip = pos
                        remote_total = resp.content_length
                        part_length = (remote_total - pos if remote_total is not None
                                       else None)
                    info = _remote(resp, remote_total)
                    if known is None:
                        known = info
                        await started(info)
                    else:
                        why = _changed(known, info)
                        if why is not None:
                            raise FileChanged(why)
                    if total is None:
                        total = remote_total
                    received = 0
                    async for block in resp.content.iter_chunked(READ_BLOCK):
                        if skip:
                            if len(block) <= skip:
                                skip -= len(block)
                                continue
                            block = block[skip:]
                            skip = 0
                        if total is not None and pos + len(block) > total:
                            raise FileChanged(f"the server sent more than {total} bytes")
                        while block:  # never past a checkpoint boundary unrecorded
                            piece = block[:ckpt_pos + config.checkpoint_bytes - pos]
                            block = block[len(piece):]
                            await sink.add(piece)
                            pos += len(piece)
                            received += len(piece)
                            progressed = True
                            if progress is not None:
                                progress(pos)
                            await maybe_checkpoint()
                    if skip:
                        raise _Retry("the body ended before the bytes already on disk")
                    if part_length is not None and received < part_length:
                        raise _Retry(f"truncated body: {received} of {part_length} bytes")
                    if resp.status == 200 or config.mode == "stream":
                        if total is None:
                            total = pos  # no length anywhere: the end of the body is the end
                        if pos < total:
                            raise _Retry(f"the body ended at byte {pos} of {total}")
                        break
                    if total is None and asked_end is not None and pos <= asked_end:
                        total = pos  # a short part without a total: the end of the file
                failures = 0
            except (_Retry, aiohttp.ClientError, TimeoutError) as e:
                if progressed:
                    failures = 0
                failures += 1
                reason = str(e) or type(e).__name__
                if failures > config.retries:
                    raise TransferError(f"{reason} (after {config.retries} retries)") from e
                await asyncio.sleep(backoff_delay(failures, config.backoff_base_s,
                                                  config.backoff_max_s))
        await sink.sync(full=True)
        assert known is not None
        return pos, known
    finally:
        sink.close()  # before the descriptor goes: no write may reach a reused one
        os.close(fd)
