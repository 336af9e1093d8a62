"""``obsledger export`` (the event log with its chain links, JSON Lines) and ``import``
(into an empty store, verified). Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

import orjson

from api.cli_common import add_log_command, with_ledger
from infra.settings import Settings


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


def add_backup_commands(sub: Any) -> None:
    """``export``, ``import``."""
    add_log_command(sub, "export", _export, "write the whole event log with its audit chain "
                    "links as JSON Lines (obsledger.export.v1)",
                    lambda p: p.add_argument("--out", help="a file instead of stdout"))
    add_log_command(sub, "import", _import, "load an export into an EMPTY store, verifying its "
                    "chain (exit 1 naming the first bad line; nothing imported)",
                    lambda p: p.add_argument("file", help="an export (obsledger export)"))
