"""MAST downloads against a local server (issue: MAST archive), on PostgreSQL.

1. A local download server (aiohttp ``FileResponse``: Range, ETag, sendfile) in its own
   process serves, under MAST's download URL, the real FITS files of the astropy, astroquery
   and ccdproc wheels and ``--files`` random files of ``--mb`` MB; a second one the same FITS
   files and ``--files`` of ``--wan-mb`` MB over a long-haul link (``--wan-delay-ms`` before
   every answer, bodies paced to ``--wan-mb-per-s`` per connection).
2. ``astroquery_mb_per_s``: astroquery's ``Observations.download_file`` (HEAD, streamed GET)
   one file after another, as ``download_products`` does.
3. ``download_mb_per_s``: the same files as one chunked download job (5 MB Range requests, up
   to 4 at once per file, 3 files at a time, checkpoints), through the journal, dispatcher and
   event store, from the request to the job's completion in the read model.
   ``download_vs_astroquery`` = 3. / 2.; ``wan_download_vs_astroquery`` the same over the
   long-haul link.
   ``plain_mb_per_s``: one plain aiohttp GET per file, all at once, written to disk;
   ``download_ratio`` = 3. / plain (a retired target, printed as information).
4. A job of one file; ``obsledger downloader`` (its own process) is killed with SIGKILL once
   the partial file passes 50 %, then started again. ``refetched_bytes_after_kill`` is the
   partial's length at the kill minus the recorded checkpoint it resumed from;
   ``checkpoint_bytes`` the configured checkpoint interval (chunk size x chunks). The result's
   sha256 is checked against the source.

Plain GETs, astroquery and download jobs alternate in ``--rounds`` rounds (5), then
astroquery and jobs over the long-haul link in ``--wan-rounds`` (2); the figures are medians
over the rounds (one round's ratio swings by ±0.3 on a shared 2-core machine).

Usage: ``python -m bench.downloads [--files 3] [--mb 200] [--wan-mb 40] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    ROOT,
    bench,
    bench_parser,
    free_port,
    make_settings,
    note,
    pg_from_args,
    settings_env,
    temp_database,
    temp_dir,
)

MB = 1024 * 1024


def serve(directory: str, port: int, delay_ms: float = 0, mb_per_s: float = 0) -> int:
    """The download server: ``/api/v0.1/Download/file?uri=mast:…/<name>`` → the file.

    With ``delay_ms`` and ``mb_per_s``, a long-haul link: every answer (HEAD included) waits
    ``delay_ms`` before it starts, and its body is paced to ``mb_per_s`` (HTTP/1.1 answers on
    one connection follow one another, so that caps every connection). Range requests get 206
    with Content-Range, as ``FileResponse`` answers them."""
    from aiohttp import web

    root = Path(directory)
    rate = mb_per_s * MB

    async def download(request: web.Request) -> web.StreamResponse:
        name = request.query.get("uri", "").rsplit("/", 1)[-1]
        path = root / name
        if not name or not path.is_file():
            raise web.HTTPNotFound()
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        if not rate:
            return web.FileResponse(path, chunk_size=256 * 1024)
        return await paced(request, path)

    async def paced(request: web.Request, path: Path) -> web.StreamResponse:
        st = path.stat()
        size = st.st_size
        rng = request.http_range  # bytes=a-b → slice(a, b + 1); bytes=-n → slice(-n, None)
        start, stop = rng.start or 0, size if rng.stop is None else min(rng.stop, size)
        if start < 0:
            start = max(0, size + start)
        ranged = "Range" in request.headers
        if ranged and start >= size:
            raise web.HTTPRequestRangeNotSatisfiable(headers={"Content-Range": f"*/{size}"})
        headers = {"Accept-Ranges": "bytes", "Content-Length": str(stop - start),
                   "Content-Type": "application/octet-stream",
                   "ETag": f'"{st.st_mtime_ns:x}-{size:x}"'}
        if ranged:
            headers["Content-Range"] = f"bytes {start}-{stop - 1}/{size}"
        resp = web.StreamResponse(status=206 if ranged else 200, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        loop = asyncio.get_running_loop()
        began, sent = loop.time(), 0
        with open(path, "rb") as f:
            f.seek(start)
            while sent < stop - start:
                block = f.read(min(64 * 1024, stop - start - sent))
                await resp.write(block)
                sent += len(block)
                ahead = sent / rate - (loop.time() - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/api/v0.1/Download/file", download)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
    return 0


class FileServer:
    def __init__(self, directory: Path, delay_ms: float = 0, mb_per_s: float = 0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(directory),
                                      str(self.port), str(delay_ms), str(mb_per_s)], cwd=ROOT)
        import socket

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise SystemExit("the download server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def url_of(server: FileServer, name: str) -> str:
    return f"{server.url}/api/v0.1/Download/file?uri=mast:BENCH/product/{name}"


async def plain_get(urls: list[str], out: Path) -> None:
    import aiohttp

    async def one(session: aiohttp.ClientSession, url: str, i: int) -> None:
        async with session.get(url) as resp:
            resp.raise_for_status()
            with open(out / f"plain-{i}", "wb") as f:
                async for block in resp.content.iter_chunked(256 * 1024):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, u, i) for i, u in enumerate(urls)))


def submit_job(ledger: Any, server: FileServer, names: list[str], sizes: dict[str, int],
               destination: str, mode: Any = "chunked") -> str:
    from commands.downloads import DownloadCommand, DownloadFileSpec, RequestDownload

    command = RequestDownload.model_construct(
        id=None, destination=destination, mode=mode,
        chunk_size=ledger.settings.download_chunk_bytes, register_files=False,
        files=[DownloadFileSpec(url=url_of(server, n), filename=n, size=sizes[n],
                                data_uri=f"mast:BENCH/product/{n}") for n in names])
    sub = asyncio.run(ledger.commands.submit(DownloadCommand.DOWNLOAD_JOB_REQUEST, command,
                                             actor="bench", correlation_id=None,
                                             idempotency_key=None))
    return str(sub.body["ids"]["download_job_id"])


def wait_job(ledger: Any, job_id: str, statuses: set[str], timeout: float = 3600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = ledger.downloads.job(job_id)
        if job is not None and job["status"] in statuses and not job["pending"]:
            return job
        time.sleep(0.05)
    raise SystemExit(f"job {job_id} did not reach {statuses}")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(8 * MB):
            h.update(data)
    return h.hexdigest()


def real_fits_files() -> list[Path]:
    """FITS files shipped in the astropy, astroquery and ccdproc wheels (real headers and
    data: a SAAO CCD frame, survey cut-outs, compressed images)."""
    import astropy
    import astroquery
    import ccdproc

    found: list[Path] = []
    for package in (ccdproc, astroquery, astropy):
        found += sorted(p for p in Path(package.__file__).parent.rglob("*.fits")
                        if p.stat().st_size >= 100_000)
    return found


def astroquery_download(server: FileServer, names: list[str], out: Path) -> None:
    """What an astronomer runs: ``Observations.download_file`` (HEAD, then a streamed GET,
    as ``download_products`` does for each product), one file after another."""
    from astroquery.mast import Observations

    base_url = f"{server.url}/api/v0.1/Download/file"
    for n in names:
        status, msg, _ = Observations.download_file(f"mast:BENCH/product/{n}",
                                                    local_path=str(out / n),
                                                    base_url=base_url, cache=False)
        if status != "COMPLETE":
            raise SystemExit(f"astroquery: {n}: {status} {msg}")


def timed_job(ledger: Any, server: FileServer, names: list[str], sizes: dict[str, int],
              destination: str, mode: Any) -> float:
    """Seconds from the job's request to its completion in the read model."""
    t = time.perf_counter()
    job_id = submit_job(ledger, server, names, sizes, destination, mode)
    job = wait_job(ledger, job_id, {"completed", "failed"})
    elapsed = time.perf_counter() - t
    if job["status"] != "completed":
        raise SystemExit(f"the job failed: {job['reason']}")
    for n in names:
        (ledger.settings.download_dir / destination / n).unlink()
    return elapsed


def clear(directory: Path) -> None:
    for p in directory.iterdir():
        p.unlink()


def run(args: argparse.Namespace, pg: Any, db: str, tmp: Path) -> None:
    import shutil

    from astroquery import log as astroquery_log

    from bootstrap.ledger import Ledger

    astroquery_log.setLevel("WARNING")  # its progress bars then go to a string, not stdout
    source = tmp / "source"
    source.mkdir()
    fits = []
    for path in real_fits_files():
        name = f"{path.parent.parent.name}-{path.name}"  # e.g. magpis-image.fits
        if name not in fits:
            shutil.copyfile(path, source / name)
            fits.append(name)
    names = [f"bench{i}.fits.bin" for i in range(args.files)]
    for n in names:
        with open(source / n, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(MB))
    wan_names = [f"wan{i}.fits.bin" for i in range(args.files)]
    for n in wan_names:
        with open(source / n, "wb") as f:
            for _ in range(args.wan_mb):
                f.write(os.urandom(MB))
    local = fits + names
    wan = fits + wan_names
    sizes = {p.name: p.stat().st_size for p in source.iterdir()}
    total = sum(sizes[n] for n in local) / MB
    wan_total = sum(sizes[n] for n in wan) / MB
    note(f"localhost: {len(fits)} real FITS files from the astropy/astroquery/ccdproc wheels "
         f"({sum(sizes[n] for n in fits) / MB:.1f} MB) and {args.files} random files of "
         f"{args.mb} MB; the long-haul link: the same FITS files and {args.files} of "
         f"{args.wan_mb} MB, {args.wan_delay_ms:g} ms before every answer, "
         f"{args.wan_mb_per_s:g} MB/s per connection")
    server = FileServer(source)
    far = FileServer(source, args.wan_delay_ms, args.wan_mb_per_s)
    out = tmp / "plain"
    out.mkdir()
    try:
        settings = make_settings(pg, db, tmp / "var", download_root=tmp / "downloads",
                                 embedded_audit_chain=False,
                                 embedded_results_automation=False, download_poll_s=0.05,
                                 mast_download_hosts=f"{server.url},{far.url}")
        ledger = Ledger(settings)
        ledger.start_workers()
        plains: list[float] = []
        astroqueries: list[float] = []
        downloads: list[float] = []
        wan_astroqueries: list[float] = []
        wan_downloads: list[float] = []
        try:
            def astroquery_then_job(source: FileServer, names: list[str], mb: float,
                                    label: str) -> tuple[float, float]:
                """MB/s of astroquery, then of a download job, fetching ``names``."""
                t = time.perf_counter()
                astroquery_download(source, names, out)
                astroquery = mb / (time.perf_counter() - t)
                clear(out)
                return astroquery, mb / timed_job(ledger, source, names, sizes, label,
                                                  args.mode)

            for rnd in range(args.rounds):  # paired rounds: the machine's noise hits all
                t = time.perf_counter()
                asyncio.run(plain_get([url_of(server, n) for n in local], out))
                plains.append(total / (time.perf_counter() - t))
                clear(out)
                aq, job = astroquery_then_job(server, local, total, f"throughput-{rnd}")
                astroqueries.append(aq)
                downloads.append(job)
                note(f"round {rnd + 1}: plain {plains[-1]:.0f} MB/s, astroquery "
                     f"{aq:.0f} MB/s, download {job:.0f} MB/s")
            for rnd in range(args.wan_rounds):
                aq, job = astroquery_then_job(far, wan, wan_total, f"wan-{rnd}")
                wan_astroqueries.append(aq)
                wan_downloads.append(job)
                note(f"long-haul round {rnd + 1}: astroquery {aq:.1f} MB/s, download "
                     f"{job:.1f} MB/s")
        finally:
            ledger.stop()

        def ratio(a: list[float], b: list[float]) -> float:
            return round(statistics.median(x / y for x, y in zip(a, b, strict=True)), 3)

        figures = {
            "astroquery_mb_per_s": round(statistics.median(astroqueries), 1),
            "download_mb_per_s": round(statistics.median(downloads), 1),
            "download_vs_astroquery": ratio(downloads, astroqueries),
            "wan_astroquery_mb_per_s": round(statistics.median(wan_astroqueries), 1),
            "wan_download_mb_per_s": round(statistics.median(wan_downloads), 1),
            "wan_download_vs_astroquery": ratio(wan_downloads, wan_astroqueries),
            "plain_mb_per_s": round(statistics.median(plains), 1),
            "download_ratio": ratio(downloads, plains),  # retired target: information
        }

        # -- kill at 50 % ------------------------------------------------------------------
        kill_settings = settings.model_copy(update={"embedded_downloader": False})
        ledger = Ledger(kill_settings)
        ledger.start_workers()
        try:
            name = max(names, key=lambda n: sizes[n])
            job_id = submit_job(ledger, server, [name], sizes, "kill")
            partial = kill_settings.download_dir / "kill" / (name + ".part")
            env = {**settings_env(kill_settings)}
            proc = subprocess.Popen([sys.executable, "-m", "api.cli", "downloader"], env=env,
                                    cwd=ROOT)
            while not partial.exists() or partial.stat().st_size < sizes[name] // 2:
                if proc.poll() is not None:
                    raise SystemExit("the downloader exited")
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            at_kill = partial.stat().st_size
            deadline = time.monotonic() + 60
            while ledger.journal.depth() and time.monotonic() < deadline:
                time.sleep(0.05)
            aggregate: Any = ledger.store.get(uuid.UUID(job_id))  # type: ignore[union-attr]
            checkpoint = int(aggregate.files[0]["bytes_done"])
            note(f"killed at {at_kill} bytes ({100 * at_kill / sizes[name]:.1f} %), "
                 f"checkpoint {checkpoint}")
            proc = subprocess.Popen([sys.executable, "-m", "api.cli", "downloader"], env=env,
                                    cwd=ROOT)
            try:
                done = wait_job(ledger, job_id, {"completed", "failed"})
            finally:
                proc.terminate()
                proc.wait(20)
            final = kill_settings.download_dir / "kill" / name
            same = done["status"] == "completed" and sha256(final) == sha256(source / name)
            note(f"after the restart: {done['status']}, sha256 "
                 f"{'equals' if same else 'DIFFERS FROM'} the source")
        finally:
            ledger.stop()
    finally:
        server.stop()
        far.stop()
    for figure, value in figures.items():
        bench(figure, value)
    bench("refetched_bytes_after_kill", at_kill - checkpoint)
    bench("checkpoint_bytes", settings.download_chunk_bytes * settings.download_checkpoint_chunks)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1], int(argv[2]), float(argv[3]), float(argv[4]))
    p = bench_parser(__doc__)
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--mode", choices=["chunked", "stream"], default="chunked")
    p.add_argument("--rounds", type=int, default=5,
                   help="rounds of plain GET, astroquery and download job (figures: medians)")
    p.add_argument("--wan-mb", type=int, default=40,
                   help="MB of each random file over the long-haul link")
    p.add_argument("--wan-rounds", type=int, default=2)
    p.add_argument("--wan-delay-ms", type=float, default=50)
    p.add_argument("--wan-mb-per-s", type=float, default=20)
    args = p.parse_args(argv)
    pg = pg_from_args(args)
    with temp_database(pg, "obsledger_bench_downloads") as db, temp_dir(args.keep_dir) as tmp:
        run(args, pg, db, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
