"""MAST downloads against a local server (issue: MAST archive), on PostgreSQL.

1. A local download server (aiohttp ``FileResponse``: Range, ETag, sendfile) in its own
   process serves ``--files`` random files of ``--mb`` MB under MAST's download URL.
2. ``plain_mb_per_s``: one plain aiohttp GET per file, all at once, written to disk.
3. ``download_mb_per_s``: the same files as one chunked download job (5 MB Range requests, 3
   files at a time, checkpoints), through the journal, dispatcher and event store, from the
   request to the job's completion in the read model. ``download_ratio`` = 2. / 3.
4. A job of one file; ``obsledger downloader`` (its own process) is killed with SIGKILL once
   the partial file passes 50 %, then started again. ``refetched_bytes_after_kill`` is the
   partial's length at the kill minus the recorded checkpoint it resumed from;
   ``checkpoint_bytes`` the configured checkpoint interval (chunk size x chunks). The result's
   sha256 is checked against the source.

Plain GETs and download jobs alternate in ``--rounds`` paired rounds (5); the figures are
medians over the rounds (one round's ratio swings by ±0.3 on a shared 2-core machine).

Usage: ``python bench/downloads.py [--files 3] [--mb 200] [--rounds 5]``
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
    add_pg_args,
    bench,
    free_port,
    make_settings,
    note,
    pg_from_args,
    settings_env,
    temp_database,
    temp_dir,
)

MB = 1024 * 1024


def serve(directory: str, port: int) -> int:
    """The download server: ``/api/v0.1/Download/file?uri=mast:…/<name>`` → the file."""
    from aiohttp import web

    root = Path(directory)

    async def download(request: web.Request) -> web.StreamResponse:
        name = request.query.get("uri", "").rsplit("/", 1)[-1]
        path = root / name
        if not name or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path, chunk_size=256 * 1024)

    app = web.Application()
    app.router.add_get("/api/v0.1/Download/file", download)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)
    return 0


class FileServer:
    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve", str(directory),
                                      str(self.port)], cwd=ROOT)
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
    from commands.downloads import DownloadFileSpec, RequestDownload

    command = RequestDownload.model_construct(
        id=None, destination=destination, mode=mode,
        chunk_size=ledger.settings.download_chunk_bytes, register_files=False,
        files=[DownloadFileSpec(url=url_of(server, n), filename=n, size=sizes[n],
                                data_uri=f"mast:BENCH/product/{n}") for n in names])
    sub = asyncio.run(ledger.commands.submit("download_job.request", command, actor="bench",
                                             correlation_id=None, idempotency_key=None))
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


def run(args: argparse.Namespace, pg: Any, db: str, tmp: Path) -> None:
    from api.runtime import Ledger

    source = tmp / "source"
    source.mkdir()
    names = [f"bench{i}.fits.bin" for i in range(args.files)]
    for n in names:
        with open(source / n, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(MB))
    sizes = {n: (source / n).stat().st_size for n in names}
    total = sum(sizes.values())
    note(f"{args.files} files of {args.mb} MB")
    server = FileServer(source)
    out = tmp / "plain"
    out.mkdir()
    try:
        settings = make_settings(pg, db, tmp / "var", download_root=tmp / "downloads",
                                 embedded_audit_chain=False,
                                 embedded_results_automation=False, download_poll_s=0.05)
        ledger = Ledger(settings)
        ledger.start_workers()
        plains: list[float] = []
        downloads: list[float] = []
        try:
            for rnd in range(args.rounds):  # paired rounds: the machine's noise hits both
                t = time.perf_counter()
                asyncio.run(plain_get([url_of(server, n) for n in names], out))
                plains.append(total / MB / (time.perf_counter() - t))
                for p in out.iterdir():
                    p.unlink()
                t = time.perf_counter()
                job_id = submit_job(ledger, server, names, sizes, f"throughput-{rnd}",
                                    args.mode)
                job = wait_job(ledger, job_id, {"completed", "failed"})
                elapsed = time.perf_counter() - t
                if job["status"] != "completed":
                    raise SystemExit(f"the job failed: {job['reason']}")
                downloads.append(total / MB / elapsed)
                for n in names:
                    (settings.download_dir / f"throughput-{rnd}" / n).unlink()
                note(f"round {rnd + 1}: plain {plains[-1]:.0f} MB/s, download "
                     f"{downloads[-1]:.0f} MB/s, ratio {downloads[-1] / plains[-1]:.3f}")
        finally:
            ledger.stop()
        plain = statistics.median(plains)
        download = statistics.median(downloads)
        ratio = statistics.median(d / p for d, p in zip(downloads, plains, strict=True))

        # -- kill at 50 % ------------------------------------------------------------------
        kill_settings = settings.model_copy(update={"embedded_downloader": False})
        ledger = Ledger(kill_settings)
        ledger.start_workers()
        try:
            name = names[0]
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
    bench("download_mb_per_s", round(download, 1))
    bench("plain_mb_per_s", round(plain, 1))
    bench("download_ratio", round(ratio, 3))
    bench("refetched_bytes_after_kill", at_kill - checkpoint)
    bench("checkpoint_bytes", settings.download_chunk_bytes * settings.download_checkpoint_chunks)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--serve"]:
        return serve(argv[1], int(argv[2]))
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pg_args(p)
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--mb", type=int, default=200)
    p.add_argument("--mode", choices=["chunked", "stream"], default="chunked")
    p.add_argument("--rounds", type=int, default=5,
                   help="paired rounds of plain GET and download job (figures: medians)")
    args = p.parse_args(argv)
    pg = pg_from_args(args)
    with temp_database(pg, "obsledger_bench_downloads") as db, temp_dir(args.keep_dir) as tmp:
        run(args, pg, db, tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
