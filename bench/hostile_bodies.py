"""Large request bodies against a live ``obsledger serve``: does the event loop stay free?

Six clients at once each send one 30 MB body while a probe asks ``GET /health`` every 20 ms;
the server's resident memory is sampled as often. Three cases:

- ``unauth``: malformed JSON to ``POST /raw_data_files/bulk`` without a token — answered 401
  before the body is read (the regular stack and the plain lane authenticate first);
- ``unauth_lane``: the same to ``POST /executed_obs_units/start`` (a plain-lane route);
- ``auth``: with a token, a valid JSON bulk registration of ~100,000 files whose last file is
  invalid — read, parsed and validated (in a worker thread: larger than 64 KiB), then 422, so
  nothing is journaled.

Figures per case: ``<case>_health_p50_ms``, ``<case>_health_max_ms`` (the probe's latency
while the bodies are sent), ``<case>_answer_max_ms`` (the slowest of the six answers),
``<case>_rss_growth_mb`` (peak resident memory over the idle server's); and
``idle_health_max_ms``, the probe alone.

Usage: ``python -m bench.hostile_bodies [--clients 6] [--megabytes 30] [--pg-host H ...]``
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Server, bench, bench_parser, note, served


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def bulk_body(megabytes: int) -> bytes:
    """Valid JSON of about ``megabytes`` MB: files to register, the last one invalid."""
    one = {"name": "", "relative_path": "", "size": 16_793_280,
           "checksum": {"algorithm": "md5", "value": "0f343b0931126a20f133d67c2b018a3b"},
           "instrument": "HARPS", "file_type": "raw_science",
           "created_at": "2026-11-21T23:15:00Z"}
    size = len(json.dumps(one)) + 100
    files = []
    for i in range(megabytes * 1_000_000 // size):
        name = f"HARPS.2026-11-21T23:15:00.{i:07d}.fits"
        files.append({**one, "name": name, "relative_path": f"2026-11-21/{name}"})
    files[-1]["size"] = -1
    return json.dumps({"files": files}).encode()


async def send(port: int, path: str, body: bytes, token: str | None) -> tuple[int, float]:
    """POST ``body``, stopping as soon as an answer arrives: (status, seconds)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (f"POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n")
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    writer.write((head + "\r\n").encode())
    answer = asyncio.ensure_future(reader.readline())
    try:
        for i in range(0, len(body), 1 << 20):
            if answer.done():
                break
            writer.write(body[i:i + (1 << 20)])
            await writer.drain()
    except (ConnectionError, OSError):
        pass  # the server answered and closed: stop sending
    try:
        line = await answer
    except (ConnectionError, OSError):  # reset by the server before the answer was read
        line = b""
    seconds = time.perf_counter() - started
    writer.close()
    return int(line.split()[1]) if line else 0, seconds


async def probe_once(port: int) -> float:
    """Milliseconds to a full answer of ``GET /health``."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    await writer.drain()
    await reader.read()
    writer.close()
    return (time.perf_counter() - started) * 1000


async def probe(port: int, stop: asyncio.Event, latencies: list[float]) -> None:
    while not stop.is_set():
        latencies.append(await probe_once(port))
        await asyncio.sleep(0.02)


async def sample(pid: int, stop: asyncio.Event, rss: list[float]) -> None:
    """The server's resident memory every 20 ms (apart from the probe, which may wait)."""
    while not stop.is_set():
        rss.append(_rss_mb(pid))
        await asyncio.sleep(0.02)


async def case(server: Server, name: str, path: str, body: bytes, token: str | None,
               clients: int, expected: int) -> None:
    idle = _rss_mb(server.proc.pid)
    stop = asyncio.Event()
    latencies: list[float] = []
    rss: list[float] = []
    watching = asyncio.gather(probe(server.port, stop, latencies),
                              sample(server.proc.pid, stop, rss))
    await asyncio.sleep(0.2)
    answers = await asyncio.gather(*(send(server.port, path, body, token)
                                     for _ in range(clients)))
    await asyncio.sleep(0.2)
    stop.set()
    await watching
    statuses = sorted({status for status, _ in answers})
    note(f"{name}: {clients} x {len(body) / 1e6:.1f} MB to {path} answered {statuses} "
         "(0: the connection was reset before the answer was read)")
    if statuses != [expected]:
        note(f"{name}: expected {expected}")
    bench(f"{name}_health_p50_ms", statistics.median(latencies))
    bench(f"{name}_health_max_ms", max(latencies))
    bench(f"{name}_answer_max_ms", max(seconds for _, seconds in answers) * 1000)
    bench(f"{name}_rss_growth_mb", max(rss) - idle)


async def run(server: Server, token: str, clients: int, megabytes: int) -> None:
    for _ in range(3):  # warm up: the first /health checks every dependency once
        await probe_once(server.port)
    latencies: list[float] = []
    stop = asyncio.Event()
    watching = asyncio.ensure_future(probe(server.port, stop, latencies))
    await asyncio.sleep(2)
    stop.set()
    await watching
    bench("idle_health_p50_ms", statistics.median(latencies))
    bench("idle_health_max_ms", max(latencies))
    malformed = b'{"files": [' + b"x" * (megabytes * 1_000_000)
    await case(server, "unauth", "/raw_data_files/bulk", malformed, None, clients, 401)
    await case(server, "unauth_lane", "/executed_obs_units/start", malformed, None, clients,
               401)
    await case(server, "auth", "/raw_data_files/bulk", bulk_body(megabytes), token, clients,
               422)


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--megabytes", type=int, default=30)
    args = parser.parse_args()
    with served(args, "bench_bodies", max_bulk_files=1_000_000) as ledger:
        asyncio.run(run(ledger.server, ledger.token, args.clients, args.megabytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
