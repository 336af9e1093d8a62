"""``obsledger migrate``: bring the tables that cannot be rebuilt from the log to the head
schema revision (``--status``: where the database stands; ``--sql``: the SQL, offline).
Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from infra.settings import Settings


def _migrate(args: argparse.Namespace, settings: Settings) -> int:
    from infra.read_model_db import create_read_model_engine
    from infra.schema import current, head, migrate, offline_sql

    url = settings.read_model_database_url
    if args.sql:
        print(offline_sql(url, args.from_revision), end="")
        return 0
    settings.prepare_dirs()
    engine = create_read_model_engine(url, settings.postgres_connect_timeout)
    try:
        if args.status:
            with engine.connect() as conn:
                now = current(conn)
            print(f"current: {now or 'none'}\nhead: {head()}")
            return 0 if now == head() else 1
        print(f"schema at revision {migrate(engine)} (head)")
        return 0
    except SQLAlchemyError as e:
        print(f"obsledger: read-model database unreachable: {e}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()


def add_migrate_command(sub: Any) -> None:
    p = sub.add_parser("migrate", help="migrate the tables that cannot be rebuilt from the log "
                       "(accounts, tokens, request audit, chain and Kafka positions) to the "
                       "head schema revision")
    p.add_argument("--status", action="store_true",
                   help="print the current and head revisions (exit 1 when behind)")
    p.add_argument("--sql", action="store_true", help="print the SQL instead (offline)")
    p.add_argument("--from", dest="from_revision", help="with --sql: from this revision")
    p.set_defaults(func=_migrate)
