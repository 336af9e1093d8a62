"""The background workers as processes of their own: ``obsledger dispatch``, ``project``,
``relay``, ``results``, ``chain`` (each until SIGINT/SIGTERM, or once). Added to
``api.cli``'s parser."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from api.cli_common import add_worker_command, run_worker
from infra.settings import Settings


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


def add_worker_commands(sub: Any) -> None:
    """``dispatch``, ``project``, ``relay``, ``results``, ``chain``."""
    add_worker_command(sub, "dispatch", _dispatch, "apply journaled commands to the event store",
                       "apply what is due, then exit", flag="--drain", timeout=600.0)
    add_worker_command(sub, "project", _project,
                       "keep the read models up to date from the event log",
                       "catch up, then exit", timeout=600.0, quiet=True)
    add_worker_command(sub, "relay", _relay, "publish every stored event to Kafka "
                       "(OBSLEDGER_KAFKA_BOOTSTRAP), resuming after the last flushed batch",
                       "publish up to the head, then exit", timeout=600.0)
    add_worker_command(sub, "results", _results, "run the observation results' process "
                       "manager (raw data files → assets, finished executions → task "
                       "outcomes) and the scheduler (processing runs for results due a rebuild)",
                       "handle what the read models show, start the runs due, then exit",
                       quiet=True)
    add_worker_command(sub, "chain", _chain, "extend the audit hash chain over new events and "
                       "anchor its head (anchors file, Kafka)", "chain up to the head, then exit")
