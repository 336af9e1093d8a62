"""``obsledger``: serve the API, run the dispatcher or projector alone, rebuild read models."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

import orjson

from infra.logs import configure_logging
from infra.settings import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api.app import create_app

    if args.no_workers:
        settings = settings.model_copy(update={"embedded_workers": False})
    app = create_app(settings)
    print(f"obsledger: {settings.store} event store, API on http://{args.host}:{args.port} "
          f"(docs at /docs)", flush=True)
    # uvicorn's loggers reach the root handler: the same JSON lines as everything else
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                access_log=args.access_log, log_config=None)
    return 0


def _run_until_signal(worker: Any) -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    worker.start()
    stop.wait()
    worker.stop()


def _run_worker(args: argparse.Namespace, settings: Settings, role: str,
                once: Callable[[Any], str]) -> int:
    """Run the ledger's ``role`` (dispatcher, projector, relay): ``once`` and exit with
    --drain/--once, else until SIGINT/SIGTERM."""
    from api.runtime import Ledger

    ledger = Ledger(settings, workers=False)
    try:
        worker = getattr(ledger, role)
        if worker is None:
            print("event store unreachable", file=sys.stderr)
            return 2
        if getattr(args, "once", False) or getattr(args, "drain", False):
            print(once(worker))
        else:
            _run_until_signal(worker)
        return 0
    finally:
        ledger.stop()


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    def drain(dispatcher: Any) -> str:
        dispatcher.drain(timeout=args.timeout)
        return f"journal drained; depth {dispatcher.journal.depth()}"

    return _run_worker(args, settings, "dispatcher", drain)


def _project(args: argparse.Namespace, settings: Settings) -> int:
    return _run_worker(args, settings, "projector", lambda projector: (
        f"read models at position {projector.catch_up(timeout=args.timeout)}"))


def _relay(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.kafka_bootstrap:
        print("OBSLEDGER_KAFKA_BOOTSTRAP is not set", file=sys.stderr)
        return 2
    return _run_worker(args, settings, "relay", lambda relay: (
        f"published up to position {relay.catch_up(timeout=args.timeout)}"))


def _results(args: argparse.Namespace, settings: Settings) -> int:
    return _run_worker(args, settings, "results", lambda results: results.catch_up())


def _chain(args: argparse.Namespace, settings: Settings) -> int:
    return _run_worker(args, settings, "chain", lambda chain: (
        f"chained up to position {chain.catch_up()}, head anchored"))


def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from api.runtime import Ledger
    from infra.audit_chain import AnchorLog, verify

    ledger = Ledger(settings, workers=False)
    try:
        if ledger.store is None:
            print("event store unreachable", file=sys.stderr)
            return 2

        def progress(position: int) -> None:
            if not args.quiet:
                print(f"\rverifying: position {position}", end="", file=sys.stderr, flush=True)

        result = verify(ledger.store, ledger.engine, AnchorLog(settings.anchors_file),
                        progress=progress)
        if not args.quiet:
            print(file=sys.stderr)
        print(orjson.dumps({
            "ok": result.ok, "events": result.events, "chained_head": result.chained_head,
            "anchors_checked": result.anchors_checked,
            "finding": None if result.finding is None else {
                "position": result.finding.position, "kind": result.finding.kind,
                "detail": result.finding.detail}}).decode())
        return 0 if result.ok else 1
    finally:
        ledger.stop()


def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from api.runtime import Ledger

    ledger = Ledger(settings, workers=False)
    if ledger.projector is None or ledger.store is None:
        print("event store unreachable", file=sys.stderr)
        return 2

    def progress(pos: int, head: int) -> None:
        if not args.quiet:
            print(f"\rrebuilding read models: {pos}/{head} events", end="", flush=True)

    pos = ledger.projector.rebuild(progress)
    print(f"\nread models rebuilt from the log and switched at position {pos}")
    ledger.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="obsledger", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP API (with the dispatcher and projector "
                       "inside, unless OBSLEDGER_EMBEDDED_WORKERS=false or --no-workers)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--no-workers", action="store_true")
    p.set_defaults(func=_serve)

    p = sub.add_parser("dispatch", help="apply journaled commands to the event store")
    p.add_argument("--drain", action="store_true", help="apply what is due, then exit")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=_dispatch)

    p = sub.add_parser("project", help="keep the read models up to date from the event log")
    p.add_argument("--once", action="store_true", help="catch up, then exit")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=_project)

    p = sub.add_parser("relay", help="publish every stored event to Kafka "
                       "(OBSLEDGER_KAFKA_BOOTSTRAP), resuming after the last flushed batch")
    p.add_argument("--once", action="store_true", help="publish up to the head, then exit")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=_relay)

    p = sub.add_parser("results", help="run the observation results' process manager (raw "
                       "data files → assets, finished executions → task outcomes) and the "
                       "scheduler (processing runs for results due a rebuild)")
    p.add_argument("--once", action="store_true",
                   help="handle what the read models show, start the runs due, then exit")
    p.set_defaults(func=_results)

    p = sub.add_parser("chain", help="extend the audit hash chain over new events and anchor "
                       "its head (anchors file, Kafka)")
    p.add_argument("--once", action="store_true", help="chain up to the head, then exit")
    p.set_defaults(func=_chain)

    p = sub.add_parser("verify", help="recompute the audit chain from the event log; report the "
                       "first modified, deleted or inserted event (exit 1)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_verify)

    p = sub.add_parser("rebuild", help="rebuild every read model from the log, then switch")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_rebuild)

    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_format, getattr(logging, settings.log_level))
    return int(args.func(args, settings))


if __name__ == "__main__":
    sys.exit(main())
