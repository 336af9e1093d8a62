"""Schema migrations (Alembic) of the read-model database's tables that cannot be rebuilt from
the event log: accounts, service tokens, the request audit, the audit chain, Kafka relay
positions, watermarks and verification, Kafka consumer offsets, projection positions. (The
read models themselves are rebuilt from the log, not migrated.)

``migrate`` takes a lock first (PostgreSQL: an advisory lock; SQLite: ``BEGIN IMMEDIATE``),
so processes starting together migrate once. A database made by ``create_all`` before
migrations (those tables, no version table) is adopted: stamped at the initial revision.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, text

from infra.read_model_db import is_postgres, write_transaction

#: Alembic says what it does at INFO on every start ("Context impl SQLiteImpl."): noise on a
#: command line's stderr and in the service's logs; its warnings and errors still show.
logging.getLogger("alembic").setLevel(logging.WARNING)

VERSION_TABLE = "obsledger_schema_version"
INITIAL = "0001"
#: pg_advisory_xact_lock's key for migrations.
LOCK_KEY = 4242002
#: The initial revision's tables: any of them without a version table is a create_all era DB.
INITIAL_TABLES = ("accounts", "service_tokens", "audit_chain", "kafka_relay_positions",
                  "kafka_relay_watermarks", "kafka_relay_verification",
                  "kafka_consumer_offsets", "projection_positions", "request_audit")


def config(url: str | None = None, out: io.StringIO | None = None) -> Config:
    cfg = Config(output_buffer=out)
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    if url:
        cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def head() -> str:
    return str(ScriptDirectory.from_config(config()).get_current_head())


def current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}
                                      ).get_current_revision()


def migrate(engine: Engine) -> str:
    """Bring the tables to the head revision (adopting a create_all era database); returns
    the revision reached."""
    with write_transaction(engine) as conn:
        if is_postgres(engine):
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": LOCK_KEY})
        cfg = config()
        cfg.attributes["connection"] = conn
        if current(conn) is None and set(INITIAL_TABLES) & set(inspect(conn).get_table_names()):
            # a create_all era database: the initial revision creates only what is missing
            command.upgrade(cfg, INITIAL)
        command.upgrade(cfg, "head")
        return str(current(conn))


def offline_sql(url: str, start: str | None = None) -> str:
    out = io.StringIO()
    command.upgrade(config(url, out), f"{start}:head" if start else "head", sql=True)
    return out.getvalue()
