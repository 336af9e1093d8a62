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

from api.cli_common import (
    add_worker_command,
    cli_actor,
    connected_ledger,
    human_bytes,
    positive_int,
    print_json,
    print_table,
    run_worker,
    store_problem,
    unreachable,
)
from domain.downloads import JobStatus
from infra.settings import Settings

FINAL = {"completed", "failed", "cancelled", "paused"}
#: Every status a download job can be in.
JOB_STATUSES = {s.value for s in JobStatus}


def _downloader(args: argparse.Namespace, settings: Settings) -> int:
    if not args.once:  # until SIGINT/SIGTERM; a dispatcher elsewhere applies its commands
        return run_worker(args, settings, "downloader", lambda d: "")
    # --once: self-sufficient, with this process's dispatcher and projector
    ledger = connected_ledger(settings.model_copy(update={
        "embedded_downloader": True, "embedded_projector": True,
        "embedded_results_automation": False, "embedded_audit_chain": False,
        "embedded_relay": False}), workers=True)
    if ledger is None:
        return 2
    try:
        if ledger.downloader is None:
            return unreachable(settings)
        ledger.start_workers()
        print(ledger.downloader.wait_idle(timeout=args.timeout))
        return 0
    finally:
        ledger.stop()


def _ledger(settings: Settings, here: bool, reads: bool) -> Any:
    """A ledger to submit commands to (its journal: accepted while the event store is down)
    and, with ``reads``, read the downloads from; with ``here``, one running the dispatcher,
    projector and downloader too. None (after one line) when ``here`` or ``reads`` and the
    database does not answer."""
    problem = store_problem(settings) if here or reads else None
    if problem is not None:
        unreachable(settings, problem)
        return None
    from bootstrap.ledger import Ledger

    ledger = Ledger(settings, workers=here)
    if here:
        ledger.start_workers()
    return ledger


def _submit(ledger: Any, command_type: str, body: Any, path: dict[str, Any] | None = None,
            key: str | None = None) -> dict[str, Any]:
    sub = asyncio.run(ledger.commands.submit(command_type, body, path=path, actor=cli_actor(),
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


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What makes the command line's arguments unusable (the HTTP API's rules), or None."""
    from pydantic import ValidationError

    from api.deps import HEADER_VALUE
    from commands.downloads import CancelDownloadRequest

    key = getattr(args, "idempotency_key", None)
    if key is not None and not HEADER_VALUE.match(key):
        return "--idempotency-key: 1-200 characters of letters, digits and ._:@/+=-"
    job_id = getattr(args, "job_id", None)
    if job_id is not None:
        try:
            UUID(job_id)
        except ValueError:
            return f"{job_id!r} is not a job id (a UUID)"
    if getattr(args, "reason", None) is not None:
        try:
            CancelDownloadRequest(reason=args.reason)
        except ValidationError as e:
            return _option_errors(e)
    return None


def _download(args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError

    from api.deps import NoBody
    from commands.downloads import (
        CancelDownloadRequest,
        ProductFilters,
        ProductRef,
        RequestDownload,
        StartDownloadRequest,
    )
    from infra.mast_archive import ArchiveError
    from queries.mast_search import resolve_files

    here = getattr(args, "here", False)
    problem = _argument_problem(args)
    if problem is not None:  # refused before anything is opened
        print(f"obsledger download {args.action}: {problem}", file=sys.stderr)
        return 2
    ledger = _ledger(settings, here, reads=args.action in ("list", "progress")
                     or getattr(args, "follow", False))
    if ledger is None:
        return 2
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
                files = resolve_files(ledger, request)
            except ValidationError as e:  # the HTTP API's rules, named by option
                print(f"obsledger download start: {_option_errors(e)}", file=sys.stderr)
                return 2
            except (ValueError, ArchiveError) as e:
                print(f"obsledger download start: {e}", file=sys.stderr)
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
                          else NoBody())
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
            if args.format == "json":
                print_json(items)
            else:
                print_table(LIST_COLUMNS, (
                    (j["id"], j["status"], f"{j['files_completed']}/{j['file_count']}",
                     f"{human_bytes(j['bytes_done'])} / {human_bytes(j['bytes_total'])}",
                     j["destination"] or ".") for j in items))
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


#: ``download list``'s table: (header, justification).
LIST_COLUMNS = (("job", "left"), ("status", "left"), ("files", "right"), ("bytes", "right"),
                ("destination", "left"))

#: The command line's option of each field of the download request (for messages).
_OPTION = {"products": "--uri", "data_uri": "--uri", "obs_id": "--obs-id",
           "product_type": "--product-type", "extension": "--extension",
           "destination": "--destination", "chunk_size": "--chunk-size", "reason": "--reason"}


def _option_errors(e: Any) -> str:
    """A pydantic ValidationError as ``--option: message; …`` (no documentation URL)."""
    from api.errors import field_errors

    parts = []
    for x in field_errors(e.errors()):
        names = [n for n in str(x["field"]).split(".") if not n.isdigit()]
        option = next((_OPTION[n] for n in reversed(names) if n in _OPTION), None)
        parts.append(f"{option or x['field'] or 'request'}: {x['message']}")
    return "; ".join(parts)


def add_download_commands(sub: Any) -> None:
    add_worker_command(sub, "downloader", _downloader, "run the MAST downloader: fetch "
                       "requested download jobs, resuming from their checkpoints",
                       "run the active jobs until none is left, then exit", timeout=3600.0)

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
    s.add_argument("--chunk-size", type=positive_int,
                   help="bytes per Range request (default: OBSLEDGER_DOWNLOAD_CHUNK_BYTES)")
    s.add_argument("--no-register", action="store_true",
                   help="do not register FITS files as raw data files")
    s.add_argument("--idempotency-key", help="the same key again returns the first answer "
                   "instead of starting a second job")
    s.add_argument("--follow", action="store_true", help="show progress bars until it ends")
    s.add_argument("--here", action="store_true", help="run the dispatcher, projector and "
                   "downloader in this process (no API running); implies --follow")
    s.add_argument("--quiet", action="store_true", help="no progress bars")
    for name in ("pause", "resume", "cancel"):
        c = actions.add_parser(name, help=f"{name} a job")
        c.add_argument("job_id", help="the download job's id (a UUID)")
        if name == "cancel":
            c.add_argument("--reason", help="why, recorded on the job")
    c = actions.add_parser("progress", help="a job's progress (JSON), or bars with --follow")
    c.add_argument("job_id", help="the download job's id (a UUID)")
    c.add_argument("--follow", action="store_true", help="progress bars until the job ends")
    c.add_argument("--quiet", action="store_true", help="with --follow: no progress bars")
    c = actions.add_parser("list", help="download jobs, newest first")
    c.add_argument("--status", choices=sorted(JOB_STATUSES), help="only jobs in this status")
    c.add_argument("--limit", type=positive_int, default=50,
                   help="at most this many jobs (default: %(default)s)")
    c.add_argument("--format", choices=["table", "json"], default="table",
                   help="a table (default) or a JSON array (for scripts)")
    p.set_defaults(func=_download)
