"""``obsledger``: serve the API, run the dispatcher or projector alone, rebuild read models."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
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


#: How long a command-line worker keeps trying to reach the event store before giving up.
CONNECT_TIMEOUT_S = 30.0


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
        worker = getattr(ledger, role) if ledger.connect(CONNECT_TIMEOUT_S) else None
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
    from infra.audit_chain import AnchorLog, verify
    from infra.progress import position_bar

    def work(ledger: Any) -> int:
        with position_bar("verifying", ledger.store.max_position(), args.quiet) as advance:
            result = verify(ledger.store, ledger.engine, AnchorLog(settings.anchors_file),
                            progress=advance)
        print(orjson.dumps(result.as_json()).decode())
        return 0 if result.ok else 1

    return _with_ledger(settings, work)


def _with_ledger(settings: Settings, work: Callable[[Any], int]) -> int:
    """Run ``work(ledger)`` on a ledger without workers whose event store answers."""
    from api.runtime import Ledger

    ledger = Ledger(settings, workers=False)
    try:
        if not ledger.connect(CONNECT_TIMEOUT_S) or ledger.projector is None:
            print("event store unreachable", file=sys.stderr)
            return 2
        return work(ledger)
    finally:
        ledger.stop()


def _out(args: argparse.Namespace) -> Any:
    return open(args.output, "w", encoding="utf-8") if args.output else sys.stdout


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from infra.progress import position_bar
    from queries.audit import EventFilter, replay

    f = EventFilter(
        aggregate_id=args.aggregate_id, aggregate_type=args.aggregate_type,
        event_type=args.event_type, actor=args.actor, command_id=args.command_id,
        correlation_id=args.correlation_id, from_position=args.from_position,
        to_position=args.to_position, recorded_from=args.recorded_from,
        recorded_to=args.recorded_to, observed_from=args.observed_from,
        observed_to=args.observed_to)

    def work(ledger: Any) -> int:
        store = ledger.store
        out = _out(args)
        quiet = args.quiet or not args.output  # the bar only beside a file
        try:
            with position_bar("replaying", store.max_position(), quiet) as advance:
                _write_replay(args, replay(store, f), out, advance)
        finally:
            if out is not sys.stdout:
                out.close()
        return 0

    return _with_ledger(settings, work)


def _write_replay(args: argparse.Namespace, events: Any, out: Any,
                  advance: Callable[..., None]) -> None:
    if args.format == "table":
        print(f"{'position':>9}  {'recorded at (UTC)':<26}  {'event':<34}  "
              f"{'actor':<16}  aggregate", file=out)
    for e in events:
        if args.format == "jsonl":
            out.write(orjson.dumps(e.as_json()).decode() + "\n")
        else:
            recorded = e.recorded_at.isoformat() if e.recorded_at else ""
            print(f"{e.position:>9}  {recorded[:26]:<26}  {e.event_type:<34}  "
                  f"{(e.actor or '')[:16]:<16}  {e.aggregate_id}", file=out)
        advance(e.position)


def _state(args: argparse.Namespace, settings: Settings) -> int:
    from queries.audit import state_at

    def work(ledger: Any) -> int:
        state, events = state_at(ledger.store, args.aggregate_id, version=args.version,
                                 recorded_at=args.recorded_at, observed_at=args.observed_at)
        if state is None:
            print(f"no events of {args.aggregate_id} by then", file=sys.stderr)
            return 1
        print(orjson.dumps({"state": state, "events": [e.as_json() for e in events]},
                           option=orjson.OPT_INDENT_2).decode())
        return 0

    return _with_ledger(settings, work)


def _trail(args: argparse.Namespace, settings: Settings) -> int:
    from queries.audit import trail

    def work(ledger: Any) -> int:
        rows = trail(ledger.store, args.entity_id)
        if not rows:
            print(f"nothing touched {args.entity_id}", file=sys.stderr)
            return 1
        for row in rows:
            print(orjson.dumps(row).decode())
        return 0

    return _with_ledger(settings, work)


def _check_projections(args: argparse.Namespace, settings: Settings) -> int:
    from infra.progress import position_bar

    def work(ledger: Any) -> int:
        with position_bar("building", ledger.store.max_position(), args.quiet) as advance:
            position, report = ledger.projector.check(advance)
        bad = {m: r for m, r in report.items() if r["missing"] or r["extra"] or r["different"]}
        print(orjson.dumps({"ok": not bad, "position": position, "read_models": {
            m: {"rows": r["rows"], **{k: len(r[k]) for k in ("missing", "extra", "different")},
                "examples": (r["missing"] + r["extra"] + r["different"])[:10]}
            for m, r in report.items()}}, option=orjson.OPT_INDENT_2).decode())
        return 1 if bad else 0

    return _with_ledger(settings, work)


def _rebuild(args: argparse.Namespace, settings: Settings) -> int:
    from infra.progress import position_bar
    from projections.tables import READ_MODELS

    if bool(args.models) == bool(args.all):
        print(f"name the read models to rebuild, or --all (known: {', '.join(READ_MODELS)})",
              file=sys.stderr)
        return 2
    unknown = sorted(set(args.models) - set(READ_MODELS))
    if unknown:
        print(f"unknown read model(s): {', '.join(unknown)} (known: {', '.join(READ_MODELS)})",
              file=sys.stderr)
        return 2

    def work(ledger: Any) -> int:
        models = None if args.all else args.models
        with position_bar("rebuilding", ledger.store.max_position(), args.quiet) as advance:
            pos = ledger.projector.rebuild(advance, models=models)
        names = "every read model" if args.all else ", ".join(args.models)
        print(f"rebuilt {names} from the log and switched at position {pos}")
        return 0

    return _with_ledger(settings, work)


def _export(args: argparse.Namespace, settings: Settings) -> int:
    from infra.backup import export_log
    from infra.progress import position_bar

    def work(ledger: Any) -> int:
        store = ledger.store
        target: Any = (open(args.out, "wb") if args.out  # noqa: SIM115
                       else contextlib.nullcontext(sys.stdout.buffer))
        with target as out, position_bar("exporting", store.max_position(),
                                         args.quiet) as advance:
            summary = export_log(store, out, progress=advance)
            out.flush()
        if args.out:
            print(f"exported {summary.count} events up to position {summary.last_position}, "
                  f"chain head {summary.head}", file=sys.stderr)
        return 0

    return _with_ledger(settings, work)


def _import(args: argparse.Namespace, settings: Settings) -> int:
    import os

    from infra.audit_chain import AnchorLog
    from infra.backup import BadExport, ImportRefused, import_log
    from infra.progress import position_bar

    def work(ledger: Any) -> int:
        total = None
        try:
            with open(args.file, "rb") as f:  # the trailer names the last position
                f.seek(max(0, os.path.getsize(args.file) - 4096))
                total = int(orjson.loads(f.read().splitlines()[-1]).get("last_position"))
        except (OSError, ValueError, TypeError, IndexError, orjson.JSONDecodeError):
            pass
        try:
            with open(args.file, "rb") as f, \
                    position_bar("importing", total, args.quiet) as advance:
                summary = import_log(ledger.store, ledger.engine,
                                     AnchorLog(settings.anchors_file), f, progress=advance)
        except ImportRefused as e:
            print(f"import refused: {e}", file=sys.stderr)
            return 2
        except BadExport as e:
            print(f"import failed, nothing imported: {e}", file=sys.stderr)
            print(orjson.dumps({"ok": False, "line": e.line, "error": e.message}).decode())
            return 1
        print(orjson.dumps({"ok": True, "events": summary.count,
                            "last_position": summary.last_position,
                            "head": summary.head}).decode())
        return 0

    return _with_ledger(settings, work)


def _utc_time(text: str) -> datetime:
    value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _service_token(args: argparse.Namespace, settings: Settings) -> int:
    """Issue an API token for a service account straight in the accounts database (for
    provisioning telescope automation without an admin token)."""
    from infra.accounts import AccountExists, issue_service_token

    settings.prepare_dirs()
    try:
        token = issue_service_token(settings.read_model_database_url,
                                    settings.signing_secret(), args.name, args.role,
                                    token_name=args.token_name, created_by="obsledger-cli")
    except AccountExists as e:
        print(e, file=sys.stderr)
        return 1
    print(token)
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

    p = sub.add_parser("replay", help="stream the event log, filtered, as a table or JSON "
                       "Lines (auditors)")
    for flag in ("aggregate-id", "aggregate-type", "event-type", "actor", "command-id",
                 "correlation-id"):
        p.add_argument(f"--{flag}")
    p.add_argument("--from-position", type=int, default=0, help="after this position")
    p.add_argument("--to-position", type=int, help="up to this position")
    for flag in ("recorded-from", "recorded-to", "observed-from", "observed-to"):
        p.add_argument(f"--{flag}", type=_utc_time, help="ISO 8601 (UTC if no offset)")
    p.add_argument("--format", choices=["table", "jsonl"], default="table")
    p.add_argument("--output", help="a file instead of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown only with "
                   "--output, on a terminal)")
    p.set_defaults(func=_replay)

    p = sub.add_parser("state", help="an aggregate as it was: --version N, --recorded-at T "
                       "(what the system knew), --observed-at T (what had happened)")
    p.add_argument("aggregate_id")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--version", type=int)
    when.add_argument("--recorded-at", type=_utc_time)
    when.add_argument("--observed-at", type=_utc_time)
    p.set_defaults(func=_state)

    p = sub.add_parser("trail", help="every command and event that touched an entity, with "
                       "actor, command and changes, oldest first (JSON Lines)")
    p.add_argument("entity_id")
    p.set_defaults(func=_trail)

    p = sub.add_parser("check-projections", help="compare every live read model with a "
                       "fresh build from the log (exit 1 on a difference)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_check_projections)

    p = sub.add_parser("rebuild", help="rebuild read models from the log into fresh tables "
                       "while the live ones serve, then switch atomically")
    p.add_argument("models", nargs="*", metavar="read-model",
                   help="executed_obs_units, raw_data_files, raw_data_packages, "
                   "staging_requests, observation_results, observation_result_tasks, "
                   "processing_runs")
    p.add_argument("--all", action="store_true", help="every read model")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_rebuild)

    p = sub.add_parser("service-token", help="issue an API token for a service account "
                       "(created with the --role roles if missing) and print it")
    p.add_argument("name", help="service account name, e.g. telescope-automation")
    p.add_argument("--role", action="append", required=True,
                   choices=["automation", "operator", "viewer", "auditor", "admin"])
    p.add_argument("--token-name", default="cli", help="what the token is for")
    p.set_defaults(func=_service_token)

    p = sub.add_parser("export", help="write the whole event log with its audit chain links "
                       "as JSON Lines (obsledger.export.v1)")
    p.add_argument("--out", help="a file instead of stdout")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="load an export into an EMPTY store, verifying its "
                       "chain (exit 1 naming the first bad line; nothing imported)")
    p.add_argument("file")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_import)

    from api.download_cli import add_download_commands  # downloader, download …

    add_download_commands(sub)
    from api.processing_cli import add_processing_commands  # worker

    add_processing_commands(sub)

    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_format, getattr(logging, settings.log_level))
    return int(args.func(args, settings))


if __name__ == "__main__":
    sys.exit(main())
