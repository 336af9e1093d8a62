"""The read-model database (SQLAlchemy engine), PostgreSQL or SQLite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event, func, text
from sqlalchemy.dialects import postgresql, sqlite


class ReadModelsUnavailable(Exception):
    """The read-model database does not answer, and the journal alone cannot answer the query
    (HTTP 503 with Retry-After)."""


#: Most connections the read-model engine keeps open on PostgreSQL (more are opened under load
#: and closed when returned).
READ_MODEL_POOL_SIZE = 8


def create_read_model_engine(url: str, connect_timeout: float = 5.0) -> Engine:
    """The read-model database's engine. On PostgreSQL a connection attempt gives up after
    ``connect_timeout`` seconds (libpq's own default is to wait for the operating system), and
    its connections show as ``obsledger-read-models`` in ``pg_stat_activity``."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _: Any) -> None:
            # Let SQLAlchemy, not pysqlite, begin transactions, so BEGIN covers reads too.
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))

        return engine
    return create_engine(url, pool_size=READ_MODEL_POOL_SIZE, max_overflow=8,
                         pool_pre_ping=True,
                         connect_args={"connect_timeout": max(1, round(connect_timeout)),
                                       "application_name": "obsledger-read-models"})


def create_probe_engine(url: str, connect_timeout: float) -> Engine:
    """One PostgreSQL connection for an availability probe (``infra.availability``): checked
    before each use, opened again when lost; neither connecting nor a query on a dead
    network waits longer than ``connect_timeout``."""
    seconds = max(1, round(connect_timeout))
    return create_engine(url, pool_size=1, max_overflow=0, pool_pre_ping=True,
                         pool_timeout=seconds, connect_args={
                             "connect_timeout": seconds, "tcp_user_timeout": seconds * 1000,
                             "application_name": "obsledger-probe"})


def select_one(engine: Engine) -> None:
    """Raises unless the database answers ``SELECT 1``."""
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def byte_sum(engine: Engine, column: Any) -> Any:
    """SUM of byte counts that never overflows: PostgreSQL sums bigints as numeric (exact);
    SQLite's SUM raises "integer overflow" beyond 2**63, its TOTAL (a float, exact up to 2**53
    bytes, 9 PB) does not."""
    return func.sum(column) if is_postgres(engine) else func.total(column)


def is_postgres(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A transaction that reads and then writes (a projector's page and its position).

    On SQLite it takes the write lock at BEGIN (``BEGIN IMMEDIATE``): a deferred transaction
    that read first would fail with SQLITE_BUSY, not wait, when another process (the relay,
    a second projector) committed in between. PostgreSQL needs nothing special.
    """
    with engine.connect() as conn:
        if not is_postgres(engine):
            conn = conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
        with conn.begin():
            yield conn


def insert_missing(conn: Connection, table: Table, values: dict[str, Any]) -> None:
    """Insert a row unless its key exists (processes starting together race for it)."""
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).values(**values).on_conflict_do_nothing())


def utc_row(row: Any) -> dict[str, Any]:
    """A row as a dict with its times in UTC (SQLite hands them back naive)."""
    return {k: v.replace(tzinfo=UTC) if isinstance(v, datetime) and v.tzinfo is None else v
            for k, v in dict(row).items()}
