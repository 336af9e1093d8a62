"""The auditors' commands: ``obsledger verify`` (the hash chain), ``replay`` (the event
log, filtered), ``state`` (an aggregate as it was), ``trail`` (what touched an entity).
Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any
from uuid import UUID

import orjson

from api.cli_common import add_log_command, positive_int, print_table, utc_time, with_ledger
from infra.settings import Settings


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


def _entity_id(text: str) -> str:
    """An aggregate (entity) id: a UUID, as the event store holds it."""
    try:
        return str(UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an id (a UUID)") from None


def add_audit_commands(sub: Any) -> None:
    """``verify``, ``replay``, ``state``, ``trail``."""
    add_log_command(sub, "verify", _verify, "recompute the audit chain from the event log; "
                    "report the first modified, deleted or inserted event (exit 1)")
    add_log_command(sub, "replay", _replay, "stream the event log, filtered, as a table or JSON "
                    "Lines (auditors)", _replay_options,
                    quiet="no progress bar (shown only with --output, on a terminal)")

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


def _replay_options(p: argparse.ArgumentParser) -> None:
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
