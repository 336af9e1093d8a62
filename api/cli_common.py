"""What every ``obsledger`` sub-command shares (``api.cli``, ``api.download_cli``,
``api.processing_cli``): reaching the event store with one plain line when it does not answer,
running a worker until a signal, the actor of commands given here, argument types, tables."""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from infra.heartbeat import heartbeat_path
from infra.settings import Settings

#: How long a command-line worker keeps trying to reach the event store (after it answered
#: the first probe: a database that is still creating its tables).
CONNECT_TIMEOUT_S = 30.0
#: How long the first probe of the event store tries, quietly, before saying it is unreachable.
PROBE_TIMEOUT_S = 5.0


def cli_actor() -> str:
    """The actor recorded on commands given through the command line: ``cli:<os user>@<host>``,
    so the audit trail names a person (the uid when the user has no name on this host)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a container's uid without a passwd entry
        import os

        user = str(os.getuid())
    return f"cli:{user}@{socket.gethostname()}"


def store_location(settings: Settings) -> str:
    """Where the event store is, in the words of a message."""
    if settings.store == "postgres":
        return (f"PostgreSQL at {settings.postgres_host}:{settings.postgres_port} "
                f"(database {settings.postgres_dbname}, user {settings.postgres_user})")
    return f"SQLite file {settings.event_store_file}"


def store_problem(settings: Settings, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the event store does not answer (one line naming host and port), or None. Tries
    quietly for up to ``timeout`` seconds (a database that is starting)."""
    if settings.store != "postgres":
        return None
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            with psycopg.connect(host=settings.postgres_host, port=settings.postgres_port,
                                 user=settings.postgres_user,
                                 password=settings.postgres_password or None,
                                 dbname=settings.postgres_dbname,
                                 connect_timeout=max(1, int(min(left, 3)))):
                return None
        except psycopg.Error as e:
            if time.monotonic() + 0.5 >= deadline:
                reason = " ".join(str(e).split()) or type(e).__name__
                return f"the event store does not answer: {store_location(settings)}: {reason}"
            time.sleep(0.5)


def unreachable(settings: Settings, problem: str | None = None) -> int:
    """Say once, plainly, that the event store is unreachable and where; exit status 2."""
    print(f"obsledger: {problem or 'the event store does not answer: ' + store_location(settings)}",
          file=sys.stderr)
    return 2


def connected_ledger(settings: Settings, **kwargs: Any) -> Any:
    """A :class:`~bootstrap.ledger.Ledger` whose event store answers, or None (after one line on
    stderr). Built only once the store answered a probe, so an unreachable one costs a few
    seconds and no warnings."""
    problem = store_problem(settings)
    if problem is not None:
        unreachable(settings, problem)
        return None
    from bootstrap.ledger import Ledger

    ledger = Ledger(settings, **kwargs)
    if not ledger.connect(CONNECT_TIMEOUT_S):
        ledger.stop()
        unreachable(settings)
        return None
    return ledger


def run_until_signal(worker: Any, heartbeat: Path | None = None) -> None:
    """Start ``worker``, wait for SIGINT/SIGTERM, stop it. With ``heartbeat``, the main thread
    rewrites that file meanwhile with the state of the threads ``worker.start()`` started
    (``obsledger probe``; ``infra/heartbeat.py``)."""
    from infra.heartbeat import HEARTBEAT_INTERVAL_S, Heartbeat

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    before = set(threading.enumerate())
    worker.start()
    beat = None if heartbeat is None else Heartbeat(
        heartbeat, heartbeat.stem, [t for t in threading.enumerate() if t not in before], worker)
    try:
        while True:
            if beat is not None:
                try:
                    beat.beat()
                except OSError as e:  # a full or read-only disk: the probe will say so
                    logging.getLogger("obsledger").warning("heartbeat not written: %s", e)
            if stop.wait(HEARTBEAT_INTERVAL_S):
                break
    finally:
        if beat is not None:  # stopping is not healthy any more
            with contextlib.suppress(OSError):
                beat.remove()
        worker.stop()


def run_worker(args: argparse.Namespace, settings: Settings, role: str,
               once: Callable[[Any], str]) -> int:
    """Run the ledger's ``role`` (dispatcher, projector, relay…): ``once`` and exit with
    --drain/--once, else until SIGINT/SIGTERM."""
    ledger = connected_ledger(settings, workers=False)
    if ledger is None:
        return 2
    try:
        worker = getattr(ledger, role)
        if worker is None:
            return unreachable(settings)
        if getattr(args, "once", False) or getattr(args, "drain", False):
            print(once(worker))
        else:
            run_until_signal(worker, heartbeat_path(settings.data_dir, args.command))
        return 0
    finally:
        ledger.stop()


def add_worker_command(sub: Any, name: str, func: Callable[[argparse.Namespace, Settings], int],
                       help: str, once: str, *, flag: str = "--once",
                       timeout: float | None = None, quiet: bool = False) -> None:
    """The sub-command of a long-running worker (:func:`run_worker`): until SIGINT/SIGTERM,
    or with ``flag`` only ``once`` (what it does then, then exits); with ``timeout``, the
    default of the ``--timeout`` that bounds that; with ``quiet``, ``--quiet`` hides its
    progress bar."""
    p = sub.add_parser(name, help=help)
    p.add_argument(flag, action="store_true", help=once)
    if timeout is not None:
        p.add_argument("--timeout", type=float, default=timeout,
                       help=f"with {flag}: give up after this many seconds "
                       "(default: %(default)s)")
    if quiet:
        p.add_argument("--quiet", action="store_true", help=f"no progress bar with {flag}")
    p.set_defaults(func=func)


def add_log_command(sub: Any, name: str, func: Callable[[argparse.Namespace, Settings], int],
                    help: str, options: Callable[[argparse.ArgumentParser], object] | None = None,
                    *, quiet: str = "no progress bar") -> None:
    """The sub-command of a pass over the event log (:func:`with_ledger`), which shows its
    progress on a terminal: the command's ``options``, then ``--quiet`` (``quiet``: what it
    hides)."""
    p = sub.add_parser(name, help=help)
    if options is not None:
        options(p)
    p.add_argument("--quiet", action="store_true", help=quiet)
    p.set_defaults(func=func)


def with_ledger(settings: Settings, work: Callable[[Any], int]) -> int:
    """Run ``work(ledger)`` on a ledger without workers whose event store answers."""
    ledger = connected_ledger(settings, workers=False)
    if ledger is None:
        return 2
    try:
        if ledger.projector is None:
            return unreachable(settings)
        return work(ledger)
    finally:
        ledger.stop()


def utc_time(text: str) -> datetime:
    """An ISO 8601 time given on the command line (UTC when it has no offset)."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: give ISO 8601, e.g. 2026-12-04T21:30:00Z or "
            "2026-12-04 (UTC when no offset is given)") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 or more")
    return value


def human_bytes(n: int | None) -> str:
    """``1.2 MB`` (decimal units, as rich and ``ls -h --si`` show them); ``?`` when unknown."""
    from rich.filesize import decimal

    return "?" if n is None else decimal(n)


def print_table(columns: Sequence[tuple[str, str]], rows: Iterable[Sequence[Any]],
                out: IO[str] | None = None, *, title: str | None = None) -> None:
    """``rows`` as a table (rich): ``columns`` are (header, justify) pairs; nothing is cut,
    long values wrap in their cell. Off a terminal the table is as wide as it needs."""
    from rich.console import Console
    from rich.table import Table

    target = out or sys.stdout
    table = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for header, justify in columns:
        table.add_column(header, justify=justify, overflow="fold")  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    tty = target.isatty()
    Console(file=target, width=None if tty else 400, soft_wrap=not tty,
            highlight=False).print(table)


def print_json(value: Any, out: IO[str] | None = None) -> None:
    """``value`` as indented JSON (``--format json``)."""
    print(orjson.dumps(value, option=orjson.OPT_INDENT_2).decode(), file=out or sys.stdout)
