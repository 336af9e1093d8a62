"""What is derived from the event log, checked against it and rebuilt: ``obsledger
check-projections`` (read models), ``check-kafka`` (the Kafka topics), ``rebuild`` (read
models, switched atomically). Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import orjson

from api.cli_common import add_log_command, with_ledger
from infra.settings import Settings


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


def add_consistency_commands(sub: Any) -> None:
    """``check-projections``, ``check-kafka``, ``rebuild``."""
    add_log_command(sub, "check-projections", _check_projections, "compare every live read "
                    "model with a fresh build from the log (exit 1 on a difference)",
                    quiet="no progress bars")
    add_log_command(sub, "check-kafka", _check_kafka, "read every Kafka topic back and compare "
                    "it with the event log up to the relay's sent position: missing events, "
                    "payload or key mismatches, per-aggregate order (exit 1 on a difference, 2 "
                    "when the store or Kafka does not answer)",
                    lambda p: p.add_argument(
                        "--repair", action="store_true", help="re-publish, in log order, every "
                        "event a consumer following docs/KAFKA.md's rule does not get (the exit "
                        "code still says what was found)"),
                    quiet="no progress bars")
    add_log_command(sub, "rebuild", _rebuild, "rebuild read models from the log into fresh "
                    "tables while the live ones serve, then switch atomically", _rebuild_options)


def _rebuild_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("models", nargs="*", metavar="read-model",
                   help="executed_obs_units, raw_data_files, raw_data_packages, "
                   "staging_requests, observation_results, observation_result_tasks, "
                   "processing_runs")
    p.add_argument("--all", action="store_true", help="every read model")
