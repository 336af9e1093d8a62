"""``obsledger worker``: a processing worker process (claims processing jobs, runs them with
leases). Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
from typing import Any

from api.cli_common import connected_ledger, run_until_signal, run_worker, unreachable
from infra.heartbeat import heartbeat_path
from infra.settings import Settings


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    if not args.once and not args.with_dispatcher:
        # until SIGINT/SIGTERM; the API's dispatcher applies its commands (same journal)
        return run_worker(args, settings, "processing_worker", lambda w: "")
    # a dispatcher of this process's journal beside the worker (and with --once a projector:
    # self-sufficient); nothing else
    ledger = connected_ledger(settings.model_copy(update={
        "embedded_processing_worker": True, "embedded_projector": args.once,
        "embedded_downloader": False, "embedded_results_automation": False,
        "embedded_audit_chain": False, "embedded_relay": False}), workers=True)
    if ledger is None:
        return 2
    try:
        if ledger.processing_worker is None:
            return unreachable(settings)
        if args.once:
            ledger.start_workers()
            print(ledger.processing_worker.wait_idle(timeout=args.timeout))
        else:
            run_until_signal(_Started(ledger), heartbeat_path(settings.data_dir, "worker"))
        return 0
    finally:
        ledger.stop()


class _Started:
    """The ledger's workers as one thing to start and stop (``_run_until_signal``)."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def start(self) -> None:
        self.ledger.start_workers()

    def stop(self) -> None:
        if self.ledger.processing_worker is not None:
            self.ledger.processing_worker.stop()


def add_processing_commands(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a processing worker: claim ingest, process and "
                       "catalog jobs (leases renewed while they run) and run them")
    p.add_argument("--once", action="store_true",
                   help="run the jobs waiting now until none is left, then exit")
    p.add_argument("--with-dispatcher", action="store_true",
                   help="also apply this process's journal (a worker on its own host or "
                   "container, whose journal no API process dispatches)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="with --once: give up after this many seconds (default: %(default)s)")
    p.set_defaults(func=_worker)
