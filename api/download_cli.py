"""``obsledger downloader`` (the MAST download worker) and ``obsledger download …`` (start,
follow with progress bars, pause, resume, cancel, list). Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any
from uuid import UUID

import orjson

from infra.settings import Settings

FINAL = {"completed", "failed", "cancelled", "paused"}


def _downloader(args: argparse.Namespace, settings: Settings) -> int:
    from api.cli import CONNECT_TIMEOUT_S, _run_worker

    if not args.once:  # until SIGINT/SIGTERM; a dispatcher elsewhere applies its commands
        return _run_worker(args, settings, "downloader", lambda d: "")
    from api.runtime import Ledger

    # --once: self-sufficient, with this process's dispatcher and projector
    ledger = Ledger(settings.model_copy(update={
        "embedded_downloader": True, "embedded_projector": True,
        "embedded_results_automation": False, "embedded_audit_chain": False,
        "embedded_relay": False}), workers=True)
    try:
        if not ledger.connect(CONNECT_TIMEOUT_S) or ledger.downloader is None:
            print("event store unreachable", file=sys.stderr)
            return 2
        ledger.start_workers()
        print(ledger.downloader.wait_idle(timeout=args.timeout))
        return 0
    finally:
        ledger.stop()


def _ledger(settings: Settings, here: bool) -> Any:
    from api.runtime import Ledger

    ledger = Ledger(settings, workers=here)
    if here:
        ledger.start_workers()
    return ledger


def _submit(ledger: Any, command_type: str, body: Any, path: dict[str, Any] | None = None,
            key: str | None = None) -> dict[str, Any]:
    sub = asyncio.run(ledger.commands.submit(command_type, body, path=path, actor="cli",
                                             correlation_id=None, idempotency_key=key))
    return dict(sub.body)


def follow(ledger: Any, job_id: str, timeout: float | None = None,
           quiet: bool = False) -> dict[str, Any] | None:
    """Progress bars (tqdm) until the job completes, fails, is paused or cancelled."""
    from tqdm import tqdm

    bars: dict[int, Any] = {}
    total_bar: Any = None
    deadline = None if timeout is None else time.monotonic() + timeout
    job: dict[str, Any] | None = None
    try:
        while deadline is None or time.monotonic() < deadline:
            job = ledger.downloads.job(job_id)
            if job is None:
                time.sleep(0.2)
                continue
            if not quiet:
                if total_bar is None:
                    total_bar = tqdm(total=job["bytes_total"], unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=f"job {job_id[:8]}",
                                     position=0, leave=True)
                total_bar.total = job["bytes_total"]
                total_bar.n = job["bytes_done"]
                total_bar.set_postfix_str(job["status"])
                total_bar.refresh()
                for f in job["files"]:
                    bar = bars.get(f["index"])
                    if bar is None:
                        bar = bars[f["index"]] = tqdm(
                            total=f["size"], unit="B", unit_scale=True, unit_divisor=1024,
                            desc=f["filename"][:30], position=f["index"] + 1, leave=True)
                    bar.total = f["size"]
                    bar.n = f["bytes_done"]
                    bar.set_postfix_str(f["status"])
                    bar.refresh()
            if job["status"] in FINAL and not job["pending"]:
                break
            time.sleep(0.5)
    finally:
        for bar in [total_bar, *bars.values()]:
            if bar is not None:
                bar.close()
    return job


def _download(args: argparse.Namespace, settings: Settings) -> int:
    from api.mast import _NoBody, _resolve_files
    from commands.downloads import (
        CancelDownloadRequest,
        ProductFilters,
        ProductRef,
        RequestDownload,
        StartDownloadRequest,
    )
    from infra.mast_archive import ArchiveError

    here = getattr(args, "here", False)
    ledger = _ledger(settings, here)
    try:
        if args.action == "start":
            try:
                request = StartDownloadRequest(
                    products=[ProductRef(data_uri=u) for u in args.uri] or None,
                    obs_id=args.obs_id,
                    filters=ProductFilters(product_type=args.product_type or None,
                                           extension=args.extension or None),
                    destination=args.destination, chunk_size=args.chunk_size,
                    register_files=not args.no_register)
                files = _resolve_files(ledger, request)
            except (ValueError, ArchiveError) as e:
                print(f"obsledger download: {e}", file=sys.stderr)
                return 2
            command = RequestDownload.model_construct(
                id=None, files=files, destination=request.destination,
                mode="chunked" if args.chunked else "stream",
                chunk_size=request.chunk_size or settings.download_chunk_bytes,
                register_files=request.register_files)
            body = _submit(ledger, "download_job.request", command, key=args.idempotency_key)
            job_id = body["ids"]["download_job_id"]
            print(orjson.dumps(body).decode(), flush=True)
            if not args.follow and not here:
                return 0
        elif args.action in ("pause", "resume", "cancel"):
            job_id = str(UUID(args.job_id))
            model: Any = (CancelDownloadRequest(reason=args.reason) if args.action == "cancel"
                          else _NoBody())
            try:
                body = _submit(ledger, f"download_job.{args.action}", model, {"id": job_id})
            except Exception as e:  # refused at once: unknown or final job
                print(f"obsledger download {args.action}: {e}", file=sys.stderr)
                return 1
            print(orjson.dumps(body).decode())
            return 0
        elif args.action == "list":
            _, _, items = ledger.downloads.list_jobs(
                (args.status,) if args.status else None, args.limit, 0)
            for j in items:
                print(f"{j['id']}  {j['status']:<10} {j['files_completed']}/{j['file_count']} "
                      f"files  {j['bytes_done']}/{j['bytes_total']} B  {j['destination']}")
            return 0
        else:  # progress
            job_id = str(UUID(args.job_id))
            if not args.follow:
                job = ledger.downloads.job(job_id)
                if job is None:
                    print(f"no download job {job_id}", file=sys.stderr)
                    return 1
                print(orjson.dumps(job, option=orjson.OPT_INDENT_2).decode())
                return 0
        job = follow(ledger, job_id, quiet=getattr(args, "quiet", False))
        if job is None:
            return 1
        print(f"{job['status']}: {job['files_completed']}/{job['file_count']} files, "
              f"{job['bytes_done']} bytes" + (f" ({job['reason']})" if job["reason"] else ""))
        return 0 if job["status"] == "completed" else 1
    finally:
        ledger.stop()


def add_download_commands(sub: Any) -> None:
    p = sub.add_parser("downloader", help="run the MAST downloader: fetch requested download "
                       "jobs, resuming from their checkpoints")
    p.add_argument("--once", action="store_true",
                   help="run the active jobs until none is left, then exit")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.set_defaults(func=_downloader)

    p = sub.add_parser("download", help="MAST downloads: start (with progress bars), "
                       "progress, pause, resume, cancel, list")
    actions = p.add_subparsers(dest="action", required=True)
    s = actions.add_parser("start", help="start a download job")
    s.add_argument("--uri", action="append", default=[], help="a product's dataURI "
                   "(mast:HST/product/…); repeat for more")
    s.add_argument("--obs-id", help="or: the products of this observation")
    s.add_argument("--product-type", action="append", help="with --obs-id: e.g. SCIENCE")
    s.add_argument("--extension", action="append", help="with --obs-id: e.g. fits")
    s.add_argument("--destination", default="", help="below OBSLEDGER_DOWNLOAD_ROOT")
    s.add_argument("--chunked", action="store_true", help="Range requests of --chunk-size")
    s.add_argument("--chunk-size", type=int)
    s.add_argument("--no-register", action="store_true",
                   help="do not register FITS files as raw data files")
    s.add_argument("--idempotency-key")
    s.add_argument("--follow", action="store_true", help="show progress bars until it ends")
    s.add_argument("--here", action="store_true", help="run the dispatcher, projector and "
                   "downloader in this process (no API running); implies --follow")
    s.add_argument("--quiet", action="store_true")
    for name in ("pause", "resume", "cancel"):
        c = actions.add_parser(name, help=f"{name} a job")
        c.add_argument("job_id")
        if name == "cancel":
            c.add_argument("--reason")
    c = actions.add_parser("progress", help="a job's progress (JSON), or bars with --follow")
    c.add_argument("job_id")
    c.add_argument("--follow", action="store_true")
    c.add_argument("--quiet", action="store_true")
    c = actions.add_parser("list", help="download jobs, newest first")
    c.add_argument("--status")
    c.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=_download)
