"""Shared fixtures: the store under test (SQLite and a real PostgreSQL), ledgers, servers.

PostgreSQL tests create their own database and drop it afterwards. When PostgreSQL is not
reachable they skip, except with OBSLEDGER_REQUIRE_SERVICES=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select

from api.app import create_app
from bootstrap.ledger import Ledger
from infra.accounts import AccountStore, Authenticator, provision_service_token
from infra.read_model_db import create_read_model_engine
from infra.settings import Settings
from infra.tokens import TokenSigner
from projections.tables import READ_MODELS, ReadModelTables, build_tables
from tests.support.processes import free_port, stop_process, wait_for_port

PG_HOST = os.environ.get("OBSLEDGER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("OBSLEDGER_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("OBSLEDGER_TEST_PG_USER", "postgres")
REQUIRE_SERVICES = os.environ.get("OBSLEDGER_REQUIRE_SERVICES") == "1"
ROOT = Path(__file__).resolve().parent.parent


def _admin() -> psycopg.Connection[Any]:
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres",
                           autocommit=True, connect_timeout=3)


def postgres_available() -> bool:
    try:
        with _admin():
            return True
    except psycopg.Error:
        return False


def need_postgres() -> None:
    if postgres_available():
        return
    msg = f"PostgreSQL not reachable at {PG_HOST}:{PG_PORT}"
    if REQUIRE_SERVICES:
        pytest.fail(msg + " and OBSLEDGER_REQUIRE_SERVICES=1")
    pytest.skip(msg)


@pytest.fixture
def pg_database() -> Iterator[Callable[[], str]]:
    """Factory of fresh PostgreSQL databases, each dropped after the test."""
    need_postgres()
    made: list[str] = []

    def make() -> str:
        name = f"obsledger_test_{uuid.uuid4().hex[:12]}"
        with _admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return name

    yield make
    with _admin() as conn:
        for name in made:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def make_settings(tmp_path: Path, store: str, dbname: str | None = None,
                  **overrides: Any) -> Settings:
    values: dict[str, Any] = {"store": store, "data_dir": tmp_path / "var"}
    if store == "postgres":
        values.update(postgres_host=PG_HOST, postgres_port=PG_PORT, postgres_user=PG_USER,
                      postgres_dbname=dbname)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def settings(tmp_path: Path, store_kind: str, pg_database_if_needed: str | None) -> Settings:
    return make_settings(tmp_path, store_kind, pg_database_if_needed,
                         missing_target_deadline_s=0.5)


@pytest.fixture
def pg_database_if_needed(store_kind: str, request: pytest.FixtureRequest) -> str | None:
    if store_kind != "postgres":
        return None
    factory: Callable[[], str] = request.getfixturevalue("pg_database")
    return factory()


@pytest.fixture
def ledger(settings: Settings) -> Iterator[Ledger]:
    """A ledger without background workers: tests drain and project explicitly."""
    lg = Ledger(settings, workers=False)
    yield lg
    lg.stop()


AUTOMATION_ROLES = ("automation", "operator", "viewer", "auditor")


def grant(settings: Settings, name: str = "test-automation",
          roles: tuple[str, ...] = AUTOMATION_ROLES, kind: str = "service") -> dict[str, str]:
    """``Authorization`` headers of an account (created if missing) of the store under
    test: a service account's API token, or a user's 30-minute token."""
    settings.prepare_dirs()
    engine = create_read_model_engine(settings.read_model_database_url)
    try:
        store = AccountStore(engine)
        signer = TokenSigner(settings.signing_secret(), settings.token_ttl_s)
        if kind == "service":
            token = provision_service_token(store, signer, name, roles, token_name="tests",
                                            created_by="tests")
        else:
            account = store.find(username=name)
            if account is None:
                account = store.create(name, "user", roles, None, created_by="tests")
            token, _ = signer.user_token(account)
    finally:
        engine.dispose()
    return {"Authorization": f"Bearer {token}"}


def remember_accounts(settings: Settings) -> None:
    """Write the accounts snapshot an API process of ``settings`` keeps on disk, as if it had
    run before: started while the database is down, it knows the accounts and tokens of
    now (a token it never saw cannot be checked then: 503, docs/ACCOUNTS.md)."""
    engine = create_read_model_engine(settings.read_model_database_url)
    try:
        Authenticator(AccountStore(engine), TokenSigner(settings.signing_secret(),
                                                        settings.token_ttl_s),
                      cache=settings.accounts_cache_file).refresh()
    finally:
        engine.dispose()


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    """The API in-process, with the embedded dispatcher and projector running, as a service
    account holding every role but admin."""
    app = create_app(settings)
    with TestClient(app, headers=grant(settings)) as c:
        yield c


def read_model_rows(engine: Engine, tables: ReadModelTables | None = None,
                    ) -> dict[str, list[dict[str, Any]]]:
    """Every row of every read model (the live set, or ``tables``), by model, in id order."""
    t = tables or build_tables()
    out = {}
    with engine.connect() as conn:
        for model, table in zip(READ_MODELS, t.all(), strict=True):
            rows = conn.execute(select(table).order_by(table.c.id)).mappings().all()
            out[model] = [dict(r) for r in rows]
    return out


def settings_env(settings: Settings) -> dict[str, str]:
    """The OBSLEDGER_* environment that reproduces ``settings`` in another process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBSLEDGER_")}
    return {**env, **settings.environment()}


class CliProcess:
    """``obsledger <command> <args>`` in its own process with ``settings``' environment."""

    def __init__(self, settings: Settings, command: str, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "api.cli", command, *args],
                                     env=settings_env(settings), cwd=ROOT)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc, 15)


class ServerProcess:
    """``obsledger serve`` in its own process, on a free port."""

    def __init__(self, settings: Settings, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "api.cli", "serve", "--port", str(self.port),
             "--log-level", "warning", "--no-access-log", *extra],
            env=settings_env(settings), cwd=ROOT)
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        wait_for_port(self.port, self.proc, timeout)

    def stop(self) -> None:
        stop_process(self.proc, 20)


@pytest.fixture
def live_server(settings: Settings) -> Iterator[ServerProcess]:
    server = ServerProcess(settings)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3-protocol server (moto_server) shared by the session
    (tests/support/s3_server.py)."""
    from tests.support.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3"))
    yield server
    server.stop()
