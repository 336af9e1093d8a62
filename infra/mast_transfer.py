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
- any other 4xx: ``TransferError`` at once;
- a redirect (301, 302, 303, 307, 308) is followed only to an allowed origin (scheme, host,
  port: the MAST base URL's and the configured download hosts), at most
  ``MAX_REDIRECTS`` times; anywhere else is ``TransferError`` at once, nothing fetched there.

With ``connections`` > 1 (chunked mode), once the server has answered a Range request with
206 and the file's total, the rest is asked as one-chunk parts on that many connections at
once; parts are written in order, so the partial file stays one contiguous prefix and a
checkpoint means what it means for one stream (``ranged_rest`` in ``fetch``; a part answered
200 falls back to one request at a time).

One partial file is written by one fetch at a time: the partial file is locked (``flock``) and
a second fetch of it, in any process, fails at once instead of writing into it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import random
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from yarl import URL

READ_BLOCK = 256 * 1024
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED = re.compile(r"^bytes \*/(\d+)$")
REDIRECTS = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
Origin = tuple[str, str, int]


class TransferError(Exception):
    """The file cannot be fetched (after the retries, or at once for a client error)."""


class FileChanged(TransferError):
    """The server's file is not the one the partial file holds the beginning of."""


class _Retry(Exception):
    """A failure worth another try (5xx, truncated body, …)."""


class _NoRanges(Exception):
    """A Range request was answered with the whole file: parts cannot be fetched apart."""


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
    #: Range requests of one file in flight at once (chunked mode, a server that honours
    #: Range): parts are fetched in parallel and written in order (``ranged_rest``)
    connections: int = 1
    #: where the file's URL and its redirects may lead (None: anywhere, for tests only)
    allowed_origins: frozenset[Origin] | None = None


def url_origin(url: URL) -> Origin:
    return ((url.scheme or "").lower(), (url.host or "").lower(), url.port or 0)


def _check_origin(url: URL, config: TransferConfig, what: str) -> None:
    if config.allowed_origins is not None and url_origin(url) not in config.allowed_origins:
        raise TransferError(f"{what} {url.scheme}://{url.host}:{url.port} is not an allowed "
                            "download host (OBSLEDGER_MAST_BASE_URL, "
                            "OBSLEDGER_MAST_DOWNLOAD_HOSTS); nothing fetched from it")


@contextlib.asynccontextmanager
async def _get(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               timeout: aiohttp.ClientTimeout, config: TransferConfig,
               ) -> AsyncIterator[aiohttp.ClientResponse]:
    """GET ``url``, following redirects only to allowed origins; a server error or a 429
    raises ``_Retry``."""
    target = URL(url)
    _check_origin(target, config, "the file's URL")
    for _ in range(MAX_REDIRECTS + 1):
        resp = await session.get(target, headers=headers, timeout=timeout,
                                 allow_redirects=False)
        location = resp.headers.get("Location")
        if resp.status not in REDIRECTS or not location:
            try:
                if resp.status >= 500 or resp.status == 429:
                    raise _Retry(f"HTTP {resp.status}")
                yield resp
            finally:
                resp.release()
            return
        resp.release()
        try:
            target = resp.url.join(URL(location))
        except ValueError as e:
            raise TransferError(f"HTTP {resp.status} to an invalid Location") from e
        _check_origin(target, config, f"HTTP {resp.status}: a redirect to")
    raise TransferError(f"more than {MAX_REDIRECTS} redirects")


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


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


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


async def _after_failure(error: BaseException, failures: int, config: TransferConfig) -> int:
    """One more failed attempt in a row (``failures`` before it; 0 when the attempt made
    progress): TransferError past ``config.retries``, else the back-off sleep, and the new
    count."""
    failures += 1
    if failures > config.retries:
        reason = str(error) or type(error).__name__
        raise TransferError(f"{reason} (after {config.retries} retries)") from error
    await asyncio.sleep(backoff_delay(failures, config.backoff_base_s, config.backoff_max_s))
    return failures


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


async def _fetch_part(session: aiohttp.ClientSession, url: str, start: int, end: int,
                      known: RemoteInfo, config: TransferConfig,
                      timeout: aiohttp.ClientTimeout, received: Callable[[int], None],
                      ) -> list[bytes]:
    """Bytes ``start``..``end`` (inclusive) of the file, as the blocks that arrived, with the
    same retries as a sequential request (from the first byte of the part not yet received;
    bytes arriving reset the count). A 200 answer is ``_NoRanges``; a file that changed,
    ``FileChanged``; ``received(n)`` is told of every block."""
    blocks: list[bytes] = []
    have, length, failures = 0, end - start + 1, 0
    while have < length:
        first = start + have
        headers = {"Accept-Encoding": "identity", "Range": f"bytes={first}-{end}"}
        progressed = False
        try:
            async with _get(session, url, headers, timeout, config) as resp:
                if resp.status == 200:
                    raise _NoRanges()
                if resp.status == 416:
                    raise FileChanged(f"HTTP 416 for a range from byte {first} "
                                      f"({resp.headers.get('Content-Range', 'no size')})")
                if resp.status != 206:
                    raise TransferError(f"HTTP {resp.status} {resp.reason or ''}".strip())
                m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
                if m is None or int(m.group(1)) != first:
                    raise _Retry(f"206 with a Content-Range not starting at byte {first}: "
                                 f"{resp.headers.get('Content-Range')}")
                why = _changed(known, _remote(resp, None if m.group(3) == "*"
                                              else int(m.group(3))))
                if why is not None:
                    raise FileChanged(why)
                async for block in resp.content.iter_chunked(READ_BLOCK):
                    if have + len(block) > length:  # more than asked: the rest is another's
                        block = block[:length - have]
                    blocks.append(block)
                    have += len(block)
                    progressed = True
                    received(len(block))
                    if have == length:
                        break
                if have < length:
                    raise _Retry(f"truncated body: {have} of {length} bytes")
        except (_Retry, aiohttp.ClientError, TimeoutError) as e:
            failures = await _after_failure(e, 0 if progressed else failures, config)
    return blocks


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
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise TransferError(f"{partial.name} is being written by another download") from None
    except BaseException:
        os.close(fd)
        raise
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

        async def take(block: bytes) -> None:
            """Append ``block`` at ``pos``: written and hashed in order, checkpointed."""
            nonlocal pos
            while block:  # never past a checkpoint boundary unrecorded
                piece = block[:ckpt_pos + config.checkpoint_bytes - pos]
                block = block[len(piece):]
                pos += len(piece)  # first: a cancelled add has taken the piece already
                await sink.add(piece)
                await maybe_checkpoint()

        async def ranged_rest(end: int, known: RemoteInfo) -> bool:
            """Bytes ``pos``..``end`` - 1 as ``config.connections`` Range requests at once,
            each of one chunk; a part that arrives is kept in memory until every part before
            it is written, then appended in order (the partial file stays one contiguous
            prefix, hashed while written, checkpointed as in a sequential fetch). The parts
            asked lie within ``connections`` chunks from ``pos``: at most that much is held
            in memory (and lost by a kill, besides the bytes after the checkpoint on disk).
            False: a part was
            answered with the whole file (no Range), the parts kept are dropped and the rest
            is fetched sequentially from ``pos``."""
            chunk = config.chunk_size
            ahead_limit = config.connections * chunk
            parts: dict[int, list[bytes]] = {}
            next_start = pos
            got = pos  # the prefix and every byte received since: the live position
            moved = asyncio.Condition()
            appending = asyncio.Lock()

            def received(n: int) -> None:
                nonlocal got
                got += n
                if progress is not None:
                    progress(got)

            async def append_ready() -> None:
                async with appending:
                    while pos in parts:
                        for block in parts.pop(pos):
                            await take(block)
                async with moved:
                    moved.notify_all()

            def may_go_on() -> bool:  # the end, or the next part is not too far ahead
                return next_start >= end or next_start - pos < ahead_limit

            async def connection() -> None:
                nonlocal next_start
                while True:
                    async with moved:
                        await moved.wait_for(may_go_on)
                        if next_start >= end:
                            return
                        start = next_start
                        next_start = stop = min(start + chunk, end)
                    parts[start] = await _fetch_part(session, url, start, stop - 1, known,
                                                     config, timeout, received)
                    await append_ready()

            tasks = [asyncio.create_task(connection()) for _ in range(config.connections)]
            try:
                for finished in asyncio.as_completed(tasks):
                    await finished
            except _NoRanges:
                return False
            finally:
                await _cancel_all(tasks)
            return True

        ranges_honoured = False  # a 206 answered this fetch: parts may be fetched apart
        while total is None or pos < total:
            if (ranges_honoured and config.connections > 1 and config.mode == "chunked"
                    and total is not None and known is not None):
                if await ranged_rest(total, known):
                    break
                ranges_honoured = False  # the server ignores Range: one request at a time
                continue
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
                async with _get(session, url, headers, timeout, config) as resp:
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
                        ranges_honoured = True
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
                        await take(block)
                        received += len(block)
                        progressed = True
                        if progress is not None:
                            progress(pos)
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
                failures = await _after_failure(e, 0 if progressed else failures, config)
        await sink.sync(full=True)
        assert known is not None
        return pos, known
    finally:
        sink.close()  # before the descriptor goes: no write may reach a reused one
        os.close(fd)
