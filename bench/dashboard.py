"""The night view on PostgreSQL: the dashboard in Debian's headless Chromium, the live stream.

An ``obsledger serve`` process (embedded dispatcher and projector) on a fresh PostgreSQL
database is filled over HTTP with ``--executions`` executed obs units, ``--packages``
raw data packages and ``--files`` raw data files (bulk commands of 5,000), then:

- ``page_ready_ms``: from navigation start to the page's first complete render (summary
  loaded and drawn, stream open), signed in, median of 5 reloads (target ≤ 1,000 ms);
- ``ack_to_screen_p95_ms``: commands sent at ``--rate`` per second for ``--seconds``; from
  each 202 to its row first drawn on the page (the page notes when), 95th percentile
  (target ≤ 1,000 ms);
- ``stream_events_per_s``: change messages one SSE client (this process, httpx) receives
  per second during a bulk load of ``--load-files`` files; ``projection_events_per_s``: the
  projector's rate in the same run (its position, from ``GET /health``, over the same
  load); ``stream_ratio``: the log positions the stream covered per second over those the
  projector covered per second (target ≥ 0.9).

Usage: ``python -m bench.dashboard [--files N] [--executions N] [--packages N] [--rate R]
[--seconds S] [--load-files N] [--pg-host H ...]`` (needs ``make chromium``).
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import bench, bench_parser, note, served

VIEWER, VIEWER_PASSWORD = "bench-night-watch", "amber telescope dome shutter 4412"
BULK = 5000


def _files(n: int, prefix: str) -> list[dict[str, Any]]:
    return [{"name": f"{prefix}-{i:06d}.fits", "instrument": "HARPS",
             "relative_path": f"night/{prefix}-{i:06d}.fits", "size": 2_000_000 + i,
             "checksum": {"algorithm": "sha256", "value": f"{i:064x}"},
             "file_type": "science", "created_at": "2026-12-04T01:00:00Z"} for i in range(n)]


async def _post_all(url: str, auth: dict[str, str], requests: list[tuple[str, Any]],
                    concurrency: int = 32) -> None:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=auth, limits=limits, timeout=120) as c:
        sem = asyncio.Semaphore(concurrency)

        async def one(path: str, body: Any) -> None:
            async with sem:
                r = await c.post(path, json=body)
                if r.status_code != 202:
                    raise SystemExit(f"{path}: {r.status_code} {r.text[:200]}")

        await asyncio.gather(*(one(p, b) for p, b in requests))


def _health(url: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/health", timeout=10).json()
    return body


def _settled(url: str, timeout: float = 900) -> None:
    """Until every command is applied and the read models show the log's head."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = _health(url)
        if h["journal"]["depth"] == 0 and h["projector"]["lag_events"] == 0:
            return
        time.sleep(0.2)
    raise SystemExit("the server did not settle")


def fill(url: str, auth: dict[str, str], files: int, executions: int, packages: int) -> None:
    t = time.perf_counter()
    asyncio.run(_post_all(url, auth, [("/executed_obs_units/start", {
        "obs_unit_id": f"OU-2026-{i:04d}", "instrument": "HARPS"}) for i in range(executions)]))
    asyncio.run(_post_all(url, auth, [("/raw_data_package", {
        "name": f"pkg-{i:03d}", "files": _files(10, f"pkg{i:03d}")}) for i in range(packages)]))
    rest = files - 10 * packages
    bulks = [_files(min(BULK, rest - i), f"fill{i // BULK:03d}") for i in range(0, rest, BULK)]
    asyncio.run(_post_all(url, auth, [("/raw_data_files/bulk", {"files": b}) for b in bulks],
                          concurrency=2))
    _settled(url)
    note(f"filled {executions} executions, {packages} packages, {files} files in "
         f"{time.perf_counter() - t:.1f} s")


def _viewer(url: str, admin_password: str) -> None:
    token = httpx.post(f"{url}/auth/token", data={
        "username": "admin", "password": admin_password}).json()["access_token"]
    httpx.post(f"{url}/auth/register", json={
        "username": VIEWER, "password": VIEWER_PASSWORD, "roles": ["viewer"]},
        headers={"Authorization": f"Bearer {token}"}).raise_for_status()


def browser_figures(url: str, auth: dict[str, str], rate: float, seconds: float) -> None:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.goto(f"{url}/dashboard")
        page.fill("input[name=username]", VIEWER)
        page.fill("input[name=password]", VIEWER_PASSWORD)
        page.click("#sign-in button[type=submit]")
        page.wait_for_selector("body[data-ready=true]", timeout=60_000)
        ready = []
        for _ in range(5):
            page.reload()
            page.wait_for_selector("body[data-ready=true]", timeout=60_000)
            ready.append(float(page.evaluate("window.obsledgerDashboard.readyMs")))
        bench("page_ready_ms", statistics.median(ready))
        note(f"page ready (ms) over 5 reloads: {', '.join(f'{r:.0f}' for r in ready)}")
        page.wait_for_selector("#stream-state.ok", timeout=10_000)

        acked: dict[str, float] = {}
        failed: list[str] = []

        async def send() -> None:
            limits = httpx.Limits(max_connections=400)
            async with httpx.AsyncClient(base_url=url, headers=auth, timeout=60,
                                         limits=limits) as c:
                start = time.perf_counter()
                tasks = []

                async def one(key: str) -> None:
                    try:
                        r = await c.post("/executed_obs_units/start",
                                         headers={"Idempotency-Key": key},
                                         json={"obs_unit_id": "OU-ACK", "instrument": "HARPS"})
                    except httpx.HTTPError as e:
                        failed.append(f"{type(e).__name__}")
                        return
                    if r.status_code == 202:
                        acked[key] = time.time() * 1000
                    else:
                        failed.append(str(r.status_code))

                n = int(rate * seconds)
                for i in range(n):  # paced: command i leaves at i / rate
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(f"ack-{uuid.uuid4().hex[:12]}")))
                await asyncio.gather(*tasks)

        sender = threading.Thread(target=lambda: asyncio.run(send()))  # playwright's loop
        sender.start()                                                 # owns this thread
        sender.join()
        deadline = time.monotonic() + 30
        shown: dict[str, float] = {}
        while time.monotonic() < deadline:
            shown = page.evaluate("Object.fromEntries(window.obsledgerDashboard.shown)")
            if all(k in shown for k in acked):
                break
            time.sleep(0.2)
        delays = sorted(shown[k] - t for k, t in acked.items() if k in shown)
        missing = len(acked) - len(delays)
        p95 = delays[int(0.95 * (len(delays) - 1))] if delays else float("nan")
        bench("ack_to_screen_p95_ms", p95)
        note(f"{len(acked)} commands at {rate:.0f}/s: median {statistics.median(delays):.0f} ms,"
             f" max {delays[-1]:.0f} ms, {missing} never shown, {len(failed)} not acknowledged "
             f"({', '.join(sorted(set(failed)))})")
        browser.close()


def stream_figures(url: str, auth: dict[str, str], load_files: int) -> None:
    head = int(httpx.get(f"{url}/dashboard/summary", headers=auth, timeout=30)
               .json()["read_model_position"])
    received: list[tuple[float, int]] = []
    stop = threading.Event()

    def read() -> None:
        try:
            _read()
        except httpx.HTTPError:
            if not stop.is_set():  # cut at the end (the server stops): expected
                raise

    def _read() -> None:
        with httpx.Client(timeout=httpx.Timeout(10.0, read=None)) as c, c.stream(
                "GET", f"{url}/stream", headers=auth, params={"after": head}) as r:
            if r.status_code != 200:
                raise SystemExit(f"GET /stream: {r.status_code} {r.read()[:200]!r}")
            event, ident = "", ""
            for line in r.iter_lines():  # a message ends with a blank line
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("id:"):
                    ident = line[3:].strip()
                elif line == "":
                    if event == "change" and ident:
                        received.append((time.perf_counter(), int(ident)))
                    event, ident = "", ""
                if stop.is_set():
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.5)
    projected: list[tuple[float, int]] = []
    watching = threading.Event()

    def watch() -> None:  # the projector's position, every 50 ms
        while not watching.is_set():
            position = _health(url)["projector"]["position"]
            if position is not None:  # null: not read within /health's budget
                projected.append((time.perf_counter(), int(position)))
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    bulks = [_files(min(BULK, load_files - i), f"load{i // BULK:03d}-{uuid.uuid4().hex[:4]}")
             for i in range(0, load_files, BULK)]
    asyncio.run(_post_all(url, auth, [("/raw_data_files/bulk", {"files": b}) for b in bulks],
                          concurrency=2))
    _settled(url)
    final = _health(url)["projector"]["position"]
    deadline = time.monotonic() + 120
    while (not received or received[-1][1] < final - 2) and time.monotonic() < deadline:
        time.sleep(0.1)
    watching.set()
    stop.set()
    moving = [(t, p) for t, p in projected if p > head]
    first_move = next(t for t, p in projected if p > head)
    t_proj_end = next((t for t, p in projected if p >= final), projected[-1][0])
    before = max((t for t, p in projected if p <= head), default=first_move)
    proj_span = max(1e-3, t_proj_end - before)
    proj_rate = (final - head) / proj_span
    t0 = before
    stream_span = max(1e-3, received[-1][0] - t0)
    stream_rate = len(received) / (received[-1][0] - received[0][0])
    positions_rate = (received[-1][1] - head) / stream_span
    bench("stream_events_per_s", stream_rate)
    bench("projection_events_per_s", proj_rate)
    bench("stream_ratio", positions_rate / proj_rate)
    note(f"bulk load of {load_files} files: {len(received)} change messages; projector "
         f"{final - head} positions in {proj_span:.2f} s, stream up to {received[-1][1]} in "
         f"{stream_span:.2f} s (both from the last position sample before the load; "
         f"{len(moving)} samples)")


def main() -> None:
    parser = bench_parser(__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--executions", type=int, default=1000)
    parser.add_argument("--packages", type=int, default=100)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--load-files", type=int, default=50_000)
    args = parser.parse_args()
    with served(args, "bench_dashboard", embedded_results_automation=False,
                embedded_audit_chain=False) as ledger:
        data, server = ledger.settings.data_dir, ledger.server
        auth = {"Authorization": f"Bearer {ledger.token}"}
        deadline = time.monotonic() + 30
        while not (data / "admin-password").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        _viewer(server.url, (data / "admin-password").read_text().strip())
        fill(server.url, auth, args.files, args.executions, args.packages)
        browser_figures(server.url, auth, args.rate, args.seconds)
        stream_figures(server.url, auth, args.load_files)


if __name__ == "__main__":
    main()
