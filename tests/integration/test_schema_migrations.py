"""Schema migrations of the tables that cannot be rebuilt from the log (infra/schema.py)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine, inspect, text

from infra.accounts import accounts
from infra.accounts import metadata as accounts_metadata
from infra.read_model_db import create_read_model_engine
from infra.schema import INITIAL_TABLES, head, migrate, offline_sql
from tests.conftest import make_settings


@pytest.fixture(params=["sqlite", "postgres"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "sqlite":
        return create_read_model_engine(f"sqlite:///{tmp_path / 'rm.db'}")
    make: Callable[[], str] = request.getfixturevalue("pg_database")
    settings = make_settings(tmp_path, "postgres", make())
    return create_read_model_engine(settings.read_model_database_url)


def test_fresh_database_migrated_to_head(engine: Engine) -> None:
    assert migrate(engine) == head()
    assert set(INITIAL_TABLES) <= set(inspect(engine).get_table_names())
    assert migrate(engine) == head()  # again: nothing to do


def test_create_all_era_database_adopted_with_its_rows(engine: Engine) -> None:
    accounts_metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(accounts.insert().values(
            id=uuid.uuid4(), username="night-operator", kind="user",
            roles=["operator"], created_at=datetime.now(UTC), created_by="test"))
    assert migrate(engine) == head()
    with engine.connect() as conn:
        names = conn.execute(text("SELECT username FROM accounts")).scalars().all()
    assert names == ["night-operator"]
    assert set(INITIAL_TABLES) <= set(inspect(engine).get_table_names())


def test_offline_sql() -> None:
    sql = offline_sql("sqlite://")
    assert "CREATE TABLE accounts" in sql and "obsledger_schema_version" in sql


def test_migrate_command_status_and_sql(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from api.cli import main

    monkeypatch.setenv("OBSLEDGER_DATA_DIR", str(tmp_path / "var"))
    assert main(["migrate", "--status"]) == 1
    assert capsys.readouterr().out == f"current: none\nhead: {head()}\n"
    assert main(["migrate"]) == 0
    assert head() in capsys.readouterr().out
    assert main(["migrate", "--status"]) == 0
    assert capsys.readouterr().out == f"current: {head()}\nhead: {head()}\n"
    assert main(["migrate", "--sql"]) == 0
    assert "CREATE TABLE request_audit" in capsys.readouterr().out


def test_concurrent_start_ups_migrate_once(engine: Engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    url = engine.url.render_as_string(hide_password=False)
    engines = [create_read_model_engine(url) for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        reached = list(pool.map(migrate, engines))
    assert reached == [head()] * 4
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM obsledger_schema_version")
                            ).scalars().all() == [head()]
    for e in engines:
        e.dispose()


def test_wheel_ships_the_migration_scripts(tmp_path: Path) -> None:
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                    "-q", "-w", str(tmp_path), str(root)], check=True, timeout=300)
    [wheel] = tmp_path.glob("obsledger-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"infra/migrations/env.py", "infra/migrations/script.py.mako",
            "infra/migrations/versions/r0001_initial.py", "infra/schema.py"} <= names
