"""``obsledger``: serve the API, run the dispatcher or projector alone, rebuild read models."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from importlib.metadata import PackageNotFoundError, version

from pydantic import ValidationError

from api.account_cli import add_service_token_command
from api.audit_cli import add_audit_commands
from api.backup_cli import add_backup_commands
from api.consistency_cli import add_consistency_commands
from api.download_cli import add_download_commands
from api.migrate_cli import add_migrate_command
from api.probe_cli import add_probe_command
from api.processing_cli import add_processing_commands
from api.serve_cli import add_serve_command
from api.workers_cli import add_worker_commands
from infra.logs import configure_logging
from infra.settings import Settings


def build_parser() -> argparse.ArgumentParser:
    """Every sub-command and option of ``obsledger``."""
    parser = argparse.ArgumentParser(prog="obsledger", description=__doc__)
    parser.add_argument("--version", action="version", version=f"obsledger {_version()}",
                        help="print the version and exit")
    parser.add_argument("--traceback", action="store_true",
                        help="on an unexpected error, print the Python traceback (a bug "
                        "report) instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    add_serve_command(sub)
    add_worker_commands(sub)  # dispatch, project, relay, results, chain
    add_audit_commands(sub)  # verify, replay, state, trail
    add_consistency_commands(sub)  # check-projections, check-kafka, rebuild
    add_service_token_command(sub)
    add_backup_commands(sub)  # export, import
    add_probe_command(sub)
    add_download_commands(sub)  # downloader, download …
    add_processing_commands(sub)  # worker
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
