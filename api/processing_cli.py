"""``obsledger worker``: a processing worker process (claims processing jobs, runs them with
leases). Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from infra.settings import Settings


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    from api.cli import CONNECT_TIMEOUT_S, _run_worker

    if not args.once:  # until SIGINT/SIGTERM; a dispatcher elsewhere applies its commands
        return _run_worker(args, settings, "processing_worker", lambda w: "")
    from api.runtime import Ledger

    # --once: self-sufficient, with this process's dispatcher and projector
    ledger = Ledger(settings.model_copy(update={
        "embedded_processing_worker": True, "embedded_projector": True,
        "embedded_downloader": False, "embedded_results_automation": False,
        "embedded_audit_chain": False, "embedded_relay": False}), workers=True)
    try:
        if not ledger.connect(CONNECT_TIMEOUT_S) or ledger.processing_worker is None:
            print("event store unreachable", file=sys.stderr)
            return 2
        ledger.start_workers()
        print(ledger.processing_worker.wait_idle(timeout=args.timeout))
        return 0
    finally:
        ledger.stop()


def add_processing_commands(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a processing worker: claim ingest, process and "
                       "catalog jobs (leases renewed while they run) and run them")
    p.add_argument("--once", action="store_true",
                   help="run the jobs waiting now until none is left, then exit")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.set_defaults(func=_worker)
