"""Accounts under attack and under faults (issue 16, items 3, 4, 5, 8, 9, 10): revocations
while the accounts cannot be read, concurrent password guessing, password changes, weak
credentials, forwarded headers, and who may read the data directory."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy import Engine, text

from api.app import create_app
from bootstrap.ledger import Ledger
from infra.read_model_db import create_read_model_engine
from infra.settings import Settings
from tests.conftest import (
    PG_HOST,
    PG_PORT,
    ROOT,
    ServerProcess,
    grant,
    make_settings,
    need_postgres,
    settings_env,
)
from tests.http.test_accounts import PASSWORD, assert_error, login
from tests.support.tcp_proxy import TcpProxy

START = {"obs_unit_id": "OU-H", "instrument": "HARPS"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _claims(headers: dict[str, str]) -> dict[str, Any]:
    token = headers["Authorization"].removeprefix("Bearer ")
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _rename(engine: Engine, pairs: list[tuple[str, str]]) -> None:
    with engine.begin() as conn:
        for old, new in pairs:
            conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))


def _until(check: Any, timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


# -- 3: revocations still apply while the accounts cannot be read --------------------------
def test_revocations_still_apply_while_the_accounts_cannot_be_read(settings: Settings
                                                                   ) -> None:
    """The accounts tables become unreadable (renamed on this test's own database): a
    revoked token stays refused, a token known valid keeps being acknowledged, and a token
    this process cannot check is 503, never trusted on its signature."""
    settings = settings.model_copy(update={"auth_refresh_s": 0.2})
    admin = grant(settings, "root", ("admin",), kind="user")
    with TestClient(create_app(settings)) as c:
        ledger: Ledger = c.app.state.ledger  # type: ignore[attr-defined]
        svc = c.post("/auth/service-accounts", headers=admin,
                     json={"name": "dome", "roles": ["automation", "viewer"]}).json()["id"]
        valid, revoked = (c.post(f"/auth/service-accounts/{svc}/tokens", headers=admin,
                                 json={"name": n}).json() for n in ("valid", "revoked"))
        assert c.delete(f"/auth/service-accounts/{svc}/tokens/{revoked['id']}",
                        headers=admin).status_code == 204
        v, r = bearer(valid["token"]), bearer(revoked["token"])
        assert c.post("/executed_obs_units/start", headers=v, json=START).status_code == 202
        assert_error(c.post("/executed_obs_units/start", headers=r, json=START), 401)
        unknown = grant(settings, "late-robot", ("automation",))  # not seen by this process
        engine = create_read_model_engine(settings.read_model_database_url)
        away = [("accounts", "accounts_away"), ("service_tokens", "service_tokens_away")]
        _rename(engine, away)
        try:
            ledger.auth.refresh()
            assert not ledger.auth._snapshot.readable  # the outage is real
            time.sleep(0.5)  # background refreshes keep failing meanwhile
            for _ in range(3):  # the plain command lane and the regular stack alike
                body = assert_error(c.post("/executed_obs_units/start", headers=r,
                                           json=START), 401)
                assert "revoked" in body["detail"]
                assert_error(c.get("/executed_obs_units", headers=r), 401)
            accepted = c.post("/executed_obs_units/start", headers=v, json=START)
            assert accepted.status_code == 202, accepted.text
            assert c.get(accepted.headers["Location"], headers=v).json()["status"] in (
                "accepted", "applied")
            refused = c.post("/executed_obs_units/start", headers=unknown, json=START)
            body = assert_error(refused, 503)
            assert int(refused.headers["Retry-After"]) >= 1
            assert body["errors"][0]["field"] == "Authorization"
            assert "WWW-Authenticate" not in refused.headers
            # an account route that needs the tables: 503, not 500
            assert_error(c.get("/auth/accounts", headers=admin), 503)
        finally:
            _rename(engine, [(new, old) for old, new in away])
            engine.dispose()
        _until(lambda: c.post("/executed_obs_units/start", headers=unknown,
                              json=START).status_code == 202, what="the unknown token")
        assert_error(c.post("/executed_obs_units/start", headers=r, json=START), 401)


def test_a_restart_during_the_outage_keeps_what_the_process_knew(settings: Settings) -> None:
    """The last snapshot is kept on disk (0600, no password hashes): a process restarted
    while the accounts cannot be read still acknowledges known tokens and still refuses
    known revocations; what it never saw is 503."""
    admin = grant(settings, "root", ("admin",), kind="user")
    with TestClient(create_app(settings)) as c:
        svc = c.post("/auth/service-accounts", headers=admin,
                     json={"name": "dome", "roles": ["automation"]}).json()["id"]
        valid, revoked = (c.post(f"/auth/service-accounts/{svc}/tokens", headers=admin,
                                 json={"name": n}).json() for n in ("valid", "revoked"))
        c.delete(f"/auth/service-accounts/{svc}/tokens/{revoked['id']}", headers=admin)
    cache = settings.accounts_cache_file
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert b"argon2" not in cache.read_bytes() and revoked["id"].encode() in cache.read_bytes()
    unknown = grant(settings, "late-robot", ("automation",))
    engine = create_read_model_engine(settings.read_model_database_url)
    away = [("accounts", "accounts_away"), ("service_tokens", "service_tokens_away")]
    _rename(engine, away)
    try:
        with TestClient(create_app(settings)) as c:  # the restart, tables unreadable
            assert c.post("/executed_obs_units/start", headers=bearer(valid["token"]),
                          json=START).status_code == 202
            assert_error(c.post("/executed_obs_units/start", headers=bearer(revoked["token"]),
                                json=START), 401)
            assert_error(c.post("/executed_obs_units/start", headers=unknown, json=START), 503)
    finally:
        _rename(engine, [(new, old) for old, new in away])
        engine.dispose()


def test_a_token_from_service_token_works_on_a_first_start_during_an_outage(
        tmp_path: Path) -> None:
    """`obsledger service-token` on the machine also writes the accounts snapshot: an API
    that starts for the first time while the accounts cannot be read knows the token."""
    settings = make_settings(tmp_path, "sqlite")
    done = subprocess.run([sys.executable, "-m", "api.cli", "service-token", "dome-pc",
                           "--role", "automation"], env=settings_env(settings), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()
    cache = settings.accounts_cache_file
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    assert jwt.decode(token, options={"verify_signature": False})["jti"] in cache.read_text()
    engine = create_read_model_engine(settings.read_model_database_url)
    _rename(engine, [("service_tokens", "service_tokens_away")])
    engine.dispose()
    with TestClient(create_app(settings)) as c:
        assert c.post("/executed_obs_units/start", headers=bearer(token),
                      json=START).status_code == 202


@pytest.mark.postgres
def test_a_database_outage_keeps_known_tokens_and_refuses_the_rest(
        tmp_path: Path, pg_database: Any) -> None:
    """A real server, its PostgreSQL behind a proxy that is cut: the whole database is gone
    (event store, read models, accounts); automation with a known token is acknowledged
    from the journal, a revoked token is 401, an unchecked one 503; all applied after."""
    need_postgres()
    proxy = TcpProxy(PG_HOST, PG_PORT)
    server = None
    try:
        settings = make_settings(tmp_path, "postgres", pg_database(),
                                 postgres_host=proxy.host, postgres_port=proxy.port,
                                 postgres_connect_timeout=2, dispatch_retry_max_s=1.0,
                                 auth_refresh_s=0.5, embedded_audit_chain=False,
                                 embedded_results_automation=False,
                                 embedded_downloader=False,
                                 embedded_processing_worker=False)
        admin = grant(settings, "root", ("admin",), kind="user")
        valid = grant(settings, "robot", ("automation", "viewer"))
        revoked = grant(settings, "robot2", ("automation",))
        server = ServerProcess(settings)
        with httpx.Client(base_url=server.url, timeout=30) as c:
            claims = _claims(revoked)
            assert c.delete(f"/auth/service-accounts/{claims['sub']}/tokens/{claims['jti']}",
                            headers=admin).status_code == 204
            assert c.post("/executed_obs_units/start", headers=valid,
                          json=START).status_code == 202
            assert_error(c.post("/executed_obs_units/start", headers=revoked, json=START), 401)
            unknown = grant(settings, "robot3", ("automation",))
            proxy.cut()
            time.sleep(1.5)  # the server's refreshes find the database gone
            commands = []
            for _ in range(5):
                r = c.post("/executed_obs_units/start", headers=valid, json=START)
                assert r.status_code == 202, r.text
                commands.append(r.headers["Location"])
                assert_error(c.post("/executed_obs_units/start", headers=revoked,
                                    json=START), 401)
                refused = c.post("/executed_obs_units/start", headers=unknown, json=START)
                assert_error(refused, 503)
                assert refused.headers["Retry-After"]
            proxy.restore()
            _until(lambda: c.post("/executed_obs_units/start", headers=unknown,
                                  json=START).status_code == 202, 30, "the unknown token")
            assert_error(c.post("/executed_obs_units/start", headers=revoked, json=START), 401)
            _until(lambda: all(c.get(loc, headers=valid).json()["status"] == "applied"
                               for loc in commands), 30, "the journaled commands")
    finally:
        if server is not None:
            server.stop()
        proxy.close()


# -- 4: concurrent guesses --------------------------------------------------------------------
def _peak_rss_kib(pid: int) -> int:
    text_ = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", text_).group(1))  # type: ignore[union-attr]


def _metric(url: str, name: str, labels: str = "") -> float:
    body = httpx.get(f"{url}/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+]+)$", body, re.M)
    return float(m.group(1)) if m else 0.0


async def _guesses(url: str, forms: list[dict[str, str]]) -> Counter[int]:
    limits = httpx.Limits(max_connections=len(forms), max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        answers = await asyncio.gather(*(client.post("/auth/token", data=f) for f in forms))
    for a in answers:
        assert a.json()["status_code"] == a.status_code  # the error format, always
        if a.status_code in (429, 503):
            assert int(a.headers["Retry-After"]) >= 1
    return Counter(a.status_code for a in answers)


def test_concurrent_guesses_cannot_pass_the_limits(tmp_path: Path) -> None:
    """A real server (defaults: 10 failures a minute per username, 60 per client, 4 argon2
    checks at once): 100 concurrent guesses at one username check at most 10 passwords; 200
    at different usernames from one client at most the client's budget; memory stays
    bounded (each check is 64 MiB)."""
    settings = make_settings(tmp_path, "sqlite")
    server = ServerProcess(settings)
    try:
        _until(lambda: (settings.data_dir / "admin-password").exists(), what="the admin")
        before = _peak_rss_kib(server.proc.pid)
        one_name = asyncio.run(_guesses(server.url, [
            {"username": "admin", "password": f"guess-{i}"} for i in range(100)]))
        checked = _metric(server.url, "obsledger_password_checks_total", '{kind="login"}')
        assert set(one_name) <= {401, 429, 503}, one_name
        assert one_name[401] <= 10 and one_name[401] <= checked <= 10, (one_name, checked)
        assert one_name[429] >= 90
        many_names = asyncio.run(_guesses(server.url, [
            {"username": f"user{i}", "password": "guess"} for i in range(200)]))
        checked = _metric(server.url, "obsledger_password_checks_total", '{kind="login"}')
        assert set(many_names) <= {401, 429, 503}, many_names
        assert checked <= 60 and many_names[401] <= 50, (many_names, checked)
        assert checked >= one_name[401] + many_names[401]  # every 401 was a real check
        assert many_names[429] + many_names[503] >= 150
        grown_mib = (_peak_rss_kib(server.proc.pid) - before) / 1024
        print(f"peak RSS grew {grown_mib:.0f} MiB; answers {one_name}, {many_names}")
        assert grown_mib < 4 * 64 + 200, grown_mib  # was ~2,800 MiB
        # the right password still gets through for a name whose budget is left
        password = (settings.data_dir / "admin-password").read_text().strip()
        r = httpx.post(f"{server.url}/auth/token",
                       data={"username": "admin", "password": password})
        assert r.status_code == 429  # the limit holds for the right password too
    finally:
        server.stop()


# -- 5: changing a password needs the current one -------------------------------------------
def test_a_password_change_needs_the_current_password(tmp_path: Path) -> None:
    s = make_settings(tmp_path, "sqlite", auth_rate_limit="3/minute")
    admin = grant(s, "root", ("admin",), kind="user")
    with TestClient(create_app(s)) as c:
        assert c.post("/auth/register", headers=admin, json={
            "username": "obs2", "password": PASSWORD, "roles": ["viewer"]}).status_code == 201
        user = login(c, "obs2", PASSWORD)
        new = "Meridian-Quasar-5581-umbra"
        # a stolen token alone cannot change the password
        body = assert_error(c.put("/auth/me/password", headers=user,
                                  json={"password": new}), 422)
        assert body["errors"][0]["field"] == "current_password"
        body = assert_error(c.put("/auth/me/password", headers=user, json={
            "current_password": "not-the-password", "password": new}), 403)
        assert body["errors"][0]["field"] == "current_password"
        assert c.get("/auth/me", headers=user).status_code == 200  # nothing changed
        login(c, "obs2", PASSWORD)
        # wrong guesses count with failed logins of the name: the limit (3) is reached
        for _ in range(2):
            assert_error(c.put("/auth/me/password", headers=user, json={
                "current_password": "another-guess", "password": new}), 403)
        r = c.put("/auth/me/password", headers=user, json={"current_password": PASSWORD,
                                                           "password": new})
        assert_error(r, 429)
        assert int(r.headers["Retry-After"]) >= 1
        assert_error(c.post("/auth/token", data={"username": "obs2", "password": PASSWORD}),
                     429)
    with TestClient(create_app(s)) as c:  # a new process: a fresh window
        user = login(c, "obs2", PASSWORD)
        assert_error(c.put("/auth/me/password", headers=user, json={
            "current_password": PASSWORD, "password": "obs2obs2obs2"}), 422)  # weak
        assert c.put("/auth/me/password", headers=user, json={
            "current_password": PASSWORD, "password": new}).status_code == 204
        assert_error(c.get("/auth/me", headers=user), 401)  # earlier tokens end
        login(c, "obs2", new)


# -- 8: weak credentials ----------------------------------------------------------------------
WEAK = [" " * 12, "a" * 12, "password1234", "night-operator", "Night-Operator",
        "night-operator1", "123456789012", "qwertyuiopas", "\t" * 12]


@pytest.mark.parametrize("password", WEAK)
def test_weak_passwords_are_refused_everywhere(tmp_path: Path, password: str) -> None:
    s = make_settings(tmp_path, "sqlite")
    admin = grant(s, "root", ("admin",), kind="user")
    with TestClient(create_app(s)) as c:
        body = assert_error(c.post("/auth/register", headers=admin, json={
            "username": "night-operator", "password": password, "roles": ["viewer"]}), 422)
        assert body["errors"][0]["field"] == "password"
        assert c.post("/auth/register", headers=admin, json={
            "username": "night-operator", "password": PASSWORD,
            "roles": ["viewer"]}).status_code == 201
        user = login(c, "night-operator", PASSWORD)
        body = assert_error(c.put("/auth/me/password", headers=user, json={
            "current_password": PASSWORD, "password": password}), 422)
        assert body["errors"][0]["field"] == "password"
    if "night-operator" not in password.lower():  # the same rule for the admin's password
        with pytest.raises(ValidationError, match="OBSLEDGER_ADMIN_PASSWORD"):
            make_settings(tmp_path, "sqlite", admin_password=password)
    with pytest.raises(ValidationError, match="OBSLEDGER_ADMIN_PASSWORD must be at least 12"):
        make_settings(tmp_path, "sqlite", admin_password="a")


@pytest.mark.parametrize("secret", [" " * 32, "x" * 40, "0123456789abcdef0123456789abcdef",
                                    "passwordpasswordpasswordpassword"])
def test_weak_jwt_secrets_are_refused(tmp_path: Path, secret: str) -> None:
    with pytest.raises(ValidationError, match=r"OBSLEDGER_JWT_SECRET .*guess"):
        make_settings(tmp_path, "sqlite", mode="production", jwt_secret=secret)


@pytest.mark.parametrize(("variable", "value"), [
    ("OBSLEDGER_JWT_SECRET", " " * 32),
    ("OBSLEDGER_ADMIN_PASSWORD", "a"),
])
def test_production_refuses_to_start_with_weak_credentials(tmp_path: Path, variable: str,
                                                           value: str) -> None:
    env = settings_env(make_settings(tmp_path, "sqlite"))
    env.update({"OBSLEDGER_MODE": "production",
                "OBSLEDGER_JWT_SECRET": "fe5fe8abab21a27d1594733949ad4568-Qx", variable: value})
    done = subprocess.run([sys.executable, "-m", "api.cli", "serve", "--port", "1"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("obsledger: configuration refused: ") and variable in lines[0]
    assert "=" + value not in lines[0] and repr(value) not in lines[0]  # not echoed


# -- 9: forwarded headers only from configured proxies ----------------------------------------
def _audited_clients(url: str, auditor: dict[str, str]) -> list[str]:
    time.sleep(1.2)  # the audit log is written every 0.5 s
    page = httpx.get(f"{url}/audit/requests", headers=auditor,
                     params={"route": "/auth/token", "limit": 100}, timeout=10).json()
    return [i["client"] for i in page["items"]]


@pytest.mark.parametrize("proxies", ["", "127.0.0.1"])
def test_forwarded_for_is_believed_only_from_configured_proxies(tmp_path: Path,
                                                                proxies: str) -> None:
    settings = make_settings(tmp_path, "sqlite", auth_rate_limit_per_client="3/minute",
                             forwarded_allow_ips=proxies)
    auditor = grant(settings, "inspector", ("auditor",), kind="user")
    server = ServerProcess(settings)
    try:
        statuses = []
        for i in range(5):  # a new spoofed address and a new name every time
            r = httpx.post(f"{server.url}/auth/token",
                           data={"username": f"eve{i}", "password": "guess"},
                           headers={"X-Forwarded-For": f"203.0.113.{i + 1}"}, timeout=30)
            statuses.append(r.status_code)
        clients = _audited_clients(server.url, auditor)
        if not proxies:  # the header is nobody's word: one client, its budget of 3
            assert statuses == [401, 401, 401, 429, 429]
            assert set(clients) == {"127.0.0.1"}, clients
        else:  # behind the configured proxy, each forwarded address has its own budget
            assert statuses == [401] * 5
            assert sorted(clients) == [f"203.0.113.{i}" for i in range(1, 6)]
    finally:
        server.stop()


@pytest.mark.usefixtures("_process_state")
def test_serve_passes_the_trusted_proxies_to_uvicorn(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    """Every way `obsledger serve` starts uvicorn (the Dockerfile and compose call it too)."""
    import uvicorn

    from api import cli

    seen: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.append(kw))
    for value, expected in [("", (False, [])), ("10.0.0.0/8, 192.168.1.2",
                                                (True, ["10.0.0.0/8", "192.168.1.2"]))]:
        monkeypatch.setenv("OBSLEDGER_DATA_DIR", str(tmp_path / "var"))
        monkeypatch.setenv("OBSLEDGER_FORWARDED_ALLOW_IPS", value)
        assert cli.main(["serve", "--port", "1"]) == 0
        assert (seen[-1]["proxy_headers"], seen[-1]["forwarded_allow_ips"]) == expected
    monkeypatch.setenv("OBSLEDGER_FORWARDED_ALLOW_IPS", "not-an-address")
    assert cli.main(["serve", "--port", "1"]) == 2
    for path in (ROOT / "Dockerfile", ROOT / "docker-compose.yml"):
        assert "forwarded-allow-ips" not in path.read_text()  # no flag bypasses the setting


# -- 10: the data directory is for the service's user only ------------------------------------
def _modes(root: Path) -> dict[str, int]:
    out = {".": stat.S_IMODE(root.stat().st_mode)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = stat.S_IMODE(p.lstat().st_mode)
    return out


def _private(modes: dict[str, int], root: Path) -> None:
    for name, mode in modes.items():
        path = root / name
        if path.is_dir():
            assert mode & 0o077 == 0, (name, oct(mode))
        else:
            assert mode == 0o600, (name, oct(mode))


def test_a_served_data_directory_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # a usual umask: the server must not depend on it
    try:
        settings = make_settings(tmp_path, "sqlite")
        robot = grant(settings)
        server = ServerProcess(settings)
    finally:
        os.umask(old)
    try:
        r = httpx.post(f"{server.url}/executed_obs_units/start?wait=true", headers=robot,
                       json=START, timeout=30)
        assert r.status_code == 200, r.text
        modes = _modes(settings.data_dir)
        for name in ("journal.sqlite3", "events.sqlite3", "read_models.sqlite3"):
            for side in ("", "-wal", "-shm"):
                assert name + side in modes, (name + side, sorted(modes))
        assert "admin-password" in modes and "jwt-secret" in modes
        assert modes["."] == 0o700
        _private(modes, settings.data_dir)
    finally:
        server.stop()


def test_an_existing_data_directory_is_tightened_in_process(tmp_path: Path) -> None:
    """Without the CLI's umask (an embedding process, tests): the data directory and the
    SQLite files are still private, those of an older version (0755/0644) tightened."""
    settings = make_settings(tmp_path, "sqlite")
    old = os.umask(0o022)
    try:
        settings.data_dir.mkdir(parents=True, mode=0o755)
        settings.data_dir.chmod(0o755)
        (settings.data_dir / "journal.sqlite3").touch(0o644)
        (settings.data_dir / "jwt-secret").write_text("x" * 64)
        (settings.data_dir / "jwt-secret").chmod(0o644)
        with TestClient(create_app(settings)) as c:
            assert c.get("/health").status_code == 200
            modes = _modes(settings.data_dir)
    finally:
        os.umask(old)
    assert "read_models.sqlite3-wal" in modes and "events.sqlite3-wal" in modes
    assert modes["."] == 0o700  # what is below is out of others' reach
    _private({k: v for k, v in modes.items() if "/" not in k and k != "."
              and (settings.data_dir / k).is_file()}, settings.data_dir)


def test_the_admin_password_file_is_created_with_its_final_mode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_chmod(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("chmod after writing: the file was readable in between")

    settings = make_settings(tmp_path, "sqlite")
    settings.prepare_dirs()
    monkeypatch.setattr(os, "chmod", no_chmod)
    monkeypatch.setattr(Path, "chmod", no_chmod)
    old = os.umask(0)  # whatever the umask
    try:
        with TestClient(create_app(settings)):
            pass
    finally:
        os.umask(old)
    path = settings.data_dir / "admin-password"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and len(path.read_text().strip()) >= 20


@pytest.fixture
def _process_state() -> Iterator[None]:
    """``cli.main`` sets the umask and the root logger of the process: put them back."""
    import logging

    old = os.umask(0o022)
    os.umask(old)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    os.umask(old)
    root.handlers[:] = handlers
    root.setLevel(level)
