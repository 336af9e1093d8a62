"""``obsledger``: serve the API, run the dispatcher or projector alone, rebuild read models."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any
from uuid import UUID

import orjson
from pydantic import ValidationError

from api.cli_common import (
    cli_actor,
    positive_int,
    print_table,
    run_worker,
    utc_time,
    with_ledger,
)
from infra.heartbeat import HEARTBEAT_MAX_AGE_S, check_heartbeat, heartbeat_path
from infra.logs import configure_logging
from infra.settings import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api.app import create_app

    problem = _port_problem(args.host, args.port)
    if problem is not None:  # before anything is created (accounts, journal, stores)
        print(f"obsledger serve: {problem}", file=sys.stderr)
        return 2
    if args.no_workers:
        settings = settings.model_copy(update={"embedded_workers": False})
    # X-Forwarded-For/-Proto only from the configured proxies (uvicorn would believe any
    # process on 127.0.0.1 by default): the client address of rate limits and the audit log
    proxies = settings.trusted_proxies
    # uvicorn's loggers reach the root handler: the same JSON lines as everything else
    options: dict[str, Any] = dict(
        host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        log_config=None, proxy_headers=bool(proxies), forwarded_allow_ips=proxies or [])
    if args.workers > 1:
        # N processes on one socket (uvicorn restarts one that dies), each with its own
        # journal slot; they read these settings from the environment (api/scaleout.py)
        settings = settings.model_copy(update={"journal_slots": True})
        os.environ.update(settings.environment())
        print(f"obsledger: {settings.store} event store, {args.workers} API processes on "
              f"http://{args.host}:{args.port} (docs at /docs)", flush=True)
        uvicorn.run("api.scaleout:worker_app", factory=True, workers=args.workers,
                    **options)
        return 0
    app = create_app(settings)
    print(f"obsledger: {settings.store} event store, API on http://{args.host}:{args.port} "
          f"(docs at /docs)", flush=True)
    uvicorn.run(app, **options)
    return 0


def _port_problem(host: str, port: int) -> str | None:
    """Why the API could not listen on ``host:port`` (in use, not an address here), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        return f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            why = "the port is already in use" if e.errno in (98, 48) else e.strerror
            return f"cannot listen on {host}:{port}: {why}"
    return None


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    def drain(dispatcher: Any) -> str:
        dispatcher.drain(timeout=args.timeout)
        return f"journal drained; depth {dispatcher.journal.depth()}"

    return run_worker(args, settings, "dispatcher", drain)


def _project(args: argparse.Namespace, settings: Settings) -> int:
    from infra.progress import position_bar

    def once(projector: Any) -> str:
        with position_bar("projecting", projector.store.max_position(), args.quiet) as advance:
            position = projector.catch_up(timeout=args.timeout, progress=advance)
        return f"read models at position {position}"

    return run_worker(args, settings, "projector", once)


def _relay(args: argparse.Namespace, settings: Settings) -> int:
    if not settings.kafka_bootstrap:
        print("OBSLEDGER_KAFKA_BOOTSTRAP is not set", file=sys.stderr)
        return 2
    from kafka.errors import KafkaError

    try:
        return run_worker(args, settings, "relay", lambda relay: (
            f"published and verified up to position {relay.catch_up(timeout=args.timeout)}"))
    except (KafkaError, TimeoutError) as e:  # --once: the broker does not answer
        print(f"relay: Kafka does not answer: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


def _results(args: argparse.Namespace, settings: Settings) -> int:
    from infra.progress import position_bar

    def once(results: Any) -> str:
        with position_bar("handling events", results.process_manager.store.max_position(),
                          args.quiet) as advance:
            return str(results.catch_up(progress=advance))

    return run_worker(args, settings, "results", once)


def _chain(args: argparse.Namespace, settings: Settings) -> int:
    return run_worker(args, settings, "chain", lambda chain: (
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

    return with_ledger(settings, work)


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

    return with_ledger(settings, work)


#: The replay table's columns (header, justification).
REPLAY_COLUMNS = (("position", "right"), ("recorded at (UTC)", "left"), ("event", "left"),
                  ("actor", "left"), ("command id", "left"), ("aggregate", "left"))
#: Rows rendered per table block: the log may be long, memory stays bounded.
REPLAY_TABLE_ROWS = 1000


def _write_replay(args: argparse.Namespace, events: Any, out: Any,
                  advance: Callable[..., None]) -> None:
    if args.format == "table":
        rows: list[tuple[Any, ...]] = []
        for e in events:
            rows.append((e.position, e.recorded_at.isoformat() if e.recorded_at else "",
                         e.event_type, e.actor or "", e.command_id or "", e.aggregate_id))
            advance(e.position)
            if len(rows) == REPLAY_TABLE_ROWS:
                print_table(REPLAY_COLUMNS, rows, out)
                rows = []
        if rows:
            print_table(REPLAY_COLUMNS, rows, out)
        return
    first = True
    if args.format == "json":
        out.write("[")
    for e in events:
        line = orjson.dumps(e.as_json()).decode()
        if args.format == "json":
            out.write(("\n" if first else ",\n") + line)
            first = False
        else:
            out.write(line + "\n")
        advance(e.position)
    if args.format == "json":
        out.write("\n]\n")


def _state(args: argparse.Namespace, settings: Settings) -> int:
    from queries.audit import state_at

    def work(ledger: Any) -> int:
        found = state_at(ledger.store, args.aggregate_id, version=args.version,
                         recorded_at=args.recorded_at, observed_at=args.observed_at)
        if found.state is None and found.incomplete is None:
            print(f"no events of {args.aggregate_id} by then", file=sys.stderr)
            return 1
        answer = {"state": found.state or {}, "events": [e.as_json() for e in found.events]}
        if found.incomplete is not None:
            answer["incomplete"] = found.incomplete
            print(f"incomplete: {found.incomplete}", file=sys.stderr)
        print(orjson.dumps(answer, option=orjson.OPT_INDENT_2).decode())
        return 0

    return with_ledger(settings, work)


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

    return with_ledger(settings, work)


def _check_projections(args: argparse.Namespace, settings: Settings) -> int:
    from infra.progress import position_bar

    def work(ledger: Any) -> int:
        from projections.tables import READ_MODELS

        with position_bar("building", ledger.store.max_position(), args.quiet) as advance, \
                position_bar("comparing", len(READ_MODELS), args.quiet,
                             unit="model") as compared:
            done: list[str] = []

            def one_more(model: str) -> None:
                done.append(model)
                compared(len(done))

            position, report = ledger.projector.check(advance, one_more)
        bad = {m: r for m, r in report.items() if r["missing"] or r["extra"] or r["different"]}
        print(orjson.dumps({"ok": not bad, "position": position, "read_models": {
            m: {"rows": r["rows"], **{k: len(r[k]) for k in ("missing", "extra", "different")},
                "examples": (r["missing"] + r["extra"] + r["different"])[:10]}
            for m, r in report.items()}}, option=orjson.OPT_INDENT_2).decode())
        return 1 if bad else 0

    return with_ledger(settings, work)


def _check_kafka(args: argparse.Namespace, settings: Settings) -> int:
    from infra.kafka_consumer import KafkaCheck, KafkaCheckFailed
    from infra.progress import position_bar

    if not settings.kafka_bootstrap:
        print("OBSLEDGER_KAFKA_BOOTSTRAP is not set", file=sys.stderr)
        return 2

    from infra.kafka_relay import broker_reachable

    def work(ledger: Any) -> int:
        if not broker_reachable(settings.kafka_bootstrap_servers, timeout=3.0):
            print(f"check-kafka: Kafka does not answer: no bootstrap broker of "
                  f"{settings.kafka_bootstrap} accepts a connection", file=sys.stderr)
            return 2
        through = ledger.relay.read_position()  # later events may not be published yet
        try:
            with position_bar("reading the log", through, args.quiet) as advance, \
                    position_bar("reading Kafka", None, args.quiet) as records:
                check = KafkaCheck(ledger.store, settings, through, advance, records)
                report = check.run()
            if args.repair:
                report["repaired"] = {"republished": check.repair()}
        except KafkaCheckFailed as e:
            print(f"check-kafka: {e}", file=sys.stderr)
            return 2
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
        return 0 if report["ok"] else 1

    return with_ledger(settings, work)


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

    return with_ledger(settings, work)


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

    return with_ledger(settings, work)


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

    return with_ledger(settings, work)


#: The long-running commands without HTTP that write a heartbeat for ``obsledger probe``.
HEARTBEAT_COMMANDS = ("dispatch", "project", "relay", "results", "chain", "downloader",
                      "worker")


def _probe(args: argparse.Namespace, settings: Settings) -> int:
    """A container healthcheck: exit 0 when healthy, 1 (one line saying why) when not."""
    if (args.command_name is None) == (args.url is None):
        print("name a command (" + ", ".join(HEARTBEAT_COMMANDS) + ") or give --url",
              file=sys.stderr)
        return 2
    if args.url is not None:
        return _probe_url(args.url, args.timeout)
    ok, why = check_heartbeat(heartbeat_path(settings.data_dir, args.command_name),
                              args.max_age)
    print(why if ok else f"unhealthy: {why}")
    return 0 if ok else 1


def _probe_url(url: str, timeout: float) -> int:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(url, timeout=timeout) as r:
            status = int(r.status)
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:  # refused, timed out, not a URL
        print(f"unhealthy: GET {url}: {e}")
        return 1
    healthy = 200 <= status < 300
    print(f"{'ok' if healthy else 'unhealthy'}: GET {url} answered {status}")
    return 0 if healthy else 1


def _entity_id(text: str) -> str:
    """An aggregate (entity) id: a UUID, as the event store holds it."""
    try:
        return str(UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id (a UUID)") from None


def _service_token(args: argparse.Namespace, settings: Settings) -> int:
    """Issue an API token for a service account straight in the accounts database (for
    provisioning telescope automation without an admin token)."""
    from infra.accounts import AccountExists, issue_service_token

    settings.prepare_dirs()
    try:
        token = issue_service_token(settings.read_model_database_url,
                                    settings.signing_secret(), args.name, args.role,
                                    token_name=args.token_name, created_by=cli_actor(),
                                    cache=settings.accounts_cache_file, same_roles=True)
    except AccountExists as e:
        print(e, file=sys.stderr)
        return 1
    print(token)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command and option of ``obsledger``."""
    parser = argparse.ArgumentParser(prog="obsledger", description=__doc__)
    parser.add_argument("--version", action="version", version=f"obsledger {_version()}",
                        help="print the version and exit")
    parser.add_argument("--traceback", action="store_true",
                        help="on an unexpected error, print the Python traceback (a bug "
                        "report) instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the HTTP API (with the dispatcher and projector "
                       "inside, unless OBSLEDGER_EMBEDDED_WORKERS=false or --no-workers)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 for every one)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: %(default)s)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every HTTP request (default: on)")
    p.add_argument("--no-workers", action="store_true",
                   help="no dispatcher, projector or other worker inside the API: they run "
                   "as their own processes")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="API processes on the one port (default: %(default)s); more than "
                   "one: each has its own journal slot and one leads the single workers "
                   "(docs/OPERATIONS.md)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("dispatch", help="apply journaled commands to the event store")
    p.add_argument("--drain", action="store_true", help="apply what is due, then exit")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="with --drain: give up after this many seconds (default: %(default)s)")
    p.set_defaults(func=_dispatch)

    p = sub.add_parser("project", help="keep the read models up to date from the event log")
    p.add_argument("--once", action="store_true", help="catch up, then exit")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="with --once: give up after this many seconds (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar with --once")
    p.set_defaults(func=_project)

    p = sub.add_parser("relay", help="publish every stored event to Kafka "
                       "(OBSLEDGER_KAFKA_BOOTSTRAP), resuming after the last flushed batch")
    p.add_argument("--once", action="store_true", help="publish up to the head, then exit")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="with --once: give up after this many seconds (default: %(default)s)")
    p.set_defaults(func=_relay)

    p = sub.add_parser("results", help="run the observation results' process manager (raw "
                       "data files → assets, finished executions → task outcomes) and the "
                       "scheduler (processing runs for results due a rebuild)")
    p.add_argument("--once", action="store_true",
                   help="handle what the read models show, start the runs due, then exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar with --once")
    p.set_defaults(func=_results)

    p = sub.add_parser("chain", help="extend the audit hash chain over new events and anchor "
                       "its head (anchors file, Kafka)")
    p.add_argument("--once", action="store_true", help="chain up to the head, then exit")
    p.set_defaults(func=_chain)

    p = sub.add_parser("verify", help="recompute the audit chain from the event log; report the "
                       "first modified, deleted or inserted event (exit 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_verify)

    p = sub.add_parser("replay", help="stream the event log, filtered, as a table or JSON "
                       "Lines (auditors)")
    for flag, what in (("aggregate-id", "of this aggregate (entity) id"),
                       ("aggregate-type", "of this aggregate type, e.g. ExecutedObsUnit"),
                       ("event-type", "of this event type, e.g. ExecutedObsUnit.Started"),
                       ("actor", "recorded for this actor, e.g. service:telescope-automation"),
                       ("command-id", "applied by this command"),
                       ("correlation-id", "of this correlation id")):
        p.add_argument(f"--{flag}", help=f"only events {what}")
    p.add_argument("--from-position", type=int, default=0, help="after this position")
    p.add_argument("--to-position", type=int, help="up to this position")
    for flag in ("recorded-from", "recorded-to", "observed-from", "observed-to"):
        p.add_argument(f"--{flag}", type=utc_time, help="ISO 8601 (UTC if no offset)")
    p.add_argument("--format", choices=["table", "json", "jsonl"], default="table",
                   help="a table (default), one JSON array, or JSON Lines")
    p.add_argument("--output", help="a file instead of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar (shown only with "
                   "--output, on a terminal)")
    p.set_defaults(func=_replay)

    p = sub.add_parser("state", help="an aggregate as it was: --version N, --recorded-at T "
                       "(what the system knew), --observed-at T (what had happened); every "
                       "bound given holds")
    p.add_argument("aggregate_id", type=_entity_id, help="the aggregate's id (a UUID)")
    p.add_argument("--version", type=positive_int, help="as of this version")
    p.add_argument("--recorded-at", type=utc_time,
                   help="as the system knew it then (ISO 8601, UTC if no offset)")
    p.add_argument("--observed-at", type=utc_time,
                   help="as it had happened by then (ISO 8601, UTC if no offset)")
    p.set_defaults(func=_state)

    p = sub.add_parser("trail", help="every command and event that touched an entity, with "
                       "actor, command and changes, oldest first (JSON Lines)")
    p.add_argument("entity_id", type=_entity_id, help="the entity's id (a UUID)")
    p.set_defaults(func=_trail)

    p = sub.add_parser("check-projections", help="compare every live read model with a "
                       "fresh build from the log (exit 1 on a difference)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_check_projections)

    p = sub.add_parser("check-kafka", help="read every Kafka topic back and compare it with "
                       "the event log up to the relay's sent position: missing events, payload "
                       "or key mismatches, per-aggregate order (exit 1 on a difference, 2 when "
                       "the store or Kafka does not answer)")
    p.add_argument("--repair", action="store_true", help="re-publish, in log order, every "
                   "event a consumer following docs/KAFKA.md's rule does not get (the exit "
                   "code still says what was found)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_check_kafka)

    p = sub.add_parser("rebuild", help="rebuild read models from the log into fresh tables "
                       "while the live ones serve, then switch atomically")
    p.add_argument("models", nargs="*", metavar="read-model",
                   help="executed_obs_units, raw_data_files, raw_data_packages, "
                   "staging_requests, observation_results, observation_result_tasks, "
                   "processing_runs")
    p.add_argument("--all", action="store_true", help="every read model")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_rebuild)

    p = sub.add_parser("service-token", help="issue an API token for a service account "
                       "(created with the --role roles if missing) and print it")
    p.add_argument("name", help="service account name, e.g. telescope-automation")
    p.add_argument("--role", action="append", required=True,
                   choices=["automation", "operator", "viewer", "auditor", "admin"],
                   help="a role of the account (repeat for more); an existing account must "
                   "have exactly these roles")
    p.add_argument("--token-name", default="cli", help="what the token is for")
    p.set_defaults(func=_service_token)

    p = sub.add_parser("export", help="write the whole event log with its audit chain links "
                       "as JSON Lines (obsledger.export.v1)")
    p.add_argument("--out", help="a file instead of stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_export)

    p = sub.add_parser("import", help="load an export into an EMPTY store, verifying its "
                       "chain (exit 1 naming the first bad line; nothing imported)")
    p.add_argument("file", help="an export (obsledger export)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_import)

    p = sub.add_parser("probe", help="container healthcheck: exit 0 when the process is "
                       "healthy, 1 with one line saying why not (docs/OPERATIONS.md)")
    p.add_argument("command_name", nargs="?", choices=HEARTBEAT_COMMANDS, metavar="command",
                   help="check the heartbeat of this command's process on this host "
                   "(<data_dir>/heartbeats/<command>.json): one of "
                   + ", ".join(HEARTBEAT_COMMANDS))
    p.add_argument("--url", help="instead, GET this URL (e.g. http://127.0.0.1:8000/health): "
                   "healthy when it answers 2xx")
    p.add_argument("--max-age", type=float, default=HEARTBEAT_MAX_AGE_S,
                   help="seconds after which a heartbeat is stale")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for --url")
    p.set_defaults(func=_probe)

    from api.download_cli import add_download_commands  # downloader, download …

    add_download_commands(sub)
    from api.processing_cli import add_processing_commands  # worker

    add_processing_commands(sub)
    from api.migrate_cli import add_migrate_command  # migrate

    add_migrate_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # every file an obsledger process makes is for its user only (the data directory holds
    # password hashes, the request audit, every command): SQLite's -wal/-shm, anchors, logs
    os.umask(0o077)
    try:
        settings = Settings()
    except ValidationError as e:  # one line per problem, no traceback
        for error in e.errors():
            where = ".".join(str(p) for p in error.get("loc", ()))
            name = f"OBSLEDGER_{where.upper()}: " if where else ""
            print(f"obsledger: configuration refused: {name}"
                  f"{str(error.get('msg', '')).removeprefix('Value error, ')}", file=sys.stderr)
        return 2
    configure_logging(settings.log_format, getattr(logging, settings.log_level))
    try:
        return int(args.func(args, settings))
    except BrokenPipeError:  # `obsledger export | head`: the reader has what it wanted
        _quiet_stdout()
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:
        print(f"obsledger {args.command}: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except Exception as e:
        if args.traceback:
            raise
        from sqlalchemy.exc import OperationalError

        if isinstance(e, OperationalError):  # the read-model database, e.g. PostgreSQL down
            print(f"obsledger {args.command}: the database does not answer: "
                  f"{' '.join(str(e.orig).split())}",
                  file=sys.stderr)
            return 2
        print(f"obsledger {args.command}: {type(e).__name__}: {' '.join(str(e).split())} "
              "(--traceback for details)", file=sys.stderr)
        return 1


def _version() -> str:
    try:
        return version("obsledger")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush does not raise again
    on the closed pipe (Python's documented way, "Note on SIGPIPE")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
