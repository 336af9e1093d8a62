"""Accounts, tokens and roles; the request audit log (SQLite and PostgreSQL)."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.app import create_app
from domain.accounts import Role
from infra.logs import configure_logging
from infra.read_model_db import create_read_model_engine
from infra.request_audit import RequestAuditLog
from infra.settings import Settings
from tests.conftest import ServerProcess, grant, make_settings
from tests.http.test_api import applied

PUBLIC = {("get", "/health"), ("get", "/ready"), ("get", "/metrics"), ("post", "/auth/token"),
          ("get", "/dashboard")}  # the page holds no data: it signs in with /auth/token
#: Requests that would not end (the live stream) are made to end at once for the roles
#: that may make them: a bad Last-Event-ID is a 422 once the token and roles are checked.
FINITE = {("get", "/stream"): {"Last-Event-ID": "not-a-position"}}
PASSWORD = "Sextant-Umbra-7734-quasar"


def assert_error(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body: dict[str, Any] = r.json()
    assert body["status_code"] == status and body["detail"] and isinstance(body["errors"], list)
    return body


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", str(uuid.uuid4()), path)


@pytest.fixture
def bare(settings: Settings) -> Iterator[TestClient]:
    """The API with no credentials by default."""
    with TestClient(create_app(settings)) as c:
        yield c


def login(c: TestClient, username: str, password: str) -> dict[str, str]:
    r = c.post("/auth/token", data={"username": username, "password": password})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["token_type"] == "bearer" and body["expires_in"] == 1800
    return {"Authorization": f"Bearer {body['access_token']}"}


# -- every route declares its roles, and refuses the others -------------------------------------
def test_role_matrix_over_every_route(bare: TestClient, settings: Settings) -> None:
    spec = bare.get("/openapi.json").json()
    tokens = {role: grant(settings, f"only-{role}", (role,)) for role in Role}
    checked = 0
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if (method, path) in PUBLIC:
                assert "security" not in op, (method, path)
                continue
            [requirement] = op["security"]  # exactly one way in, with the roles as scopes
            roles = set(requirement["OAuth2PasswordBearer"])
            assert roles and roles <= set(Role), (method, path, roles)
            assert {"401", "403"} <= set(op["responses"]), (method, path)
            url = _concrete(path)
            body = {"json": {}} if "requestBody" in op else {}
            # no token, a malformed header, a token that is not a JWT: 401
            assert_error(bare.request(method, url, **body), 401)
            assert_error(bare.request(method, url, headers={"Authorization": "Basic x"},
                                      **body), 401)
            assert_error(bare.request(method, url, headers={"Authorization": "Bearer x.y.z"},
                                      **body), 401)
            for role, headers in tokens.items():
                r = bare.request(method, url, headers={
                    **headers, **FINITE.get((method, path), {})}, **body)
                if role in roles:
                    assert r.status_code not in (401, 403), (method, path, role, r.text)
                else:
                    assert_error(r, 403)
            checked += 1
    assert checked >= 35
    # write endpoints are closed to dashboards; audit endpoints to everyone but auditors
    ops = spec["paths"]
    assert ops["/executed_obs_units/start"]["post"]["security"] == [
        {"OAuth2PasswordBearer": ["automation", "operator"]}]
    assert ops["/staging/{id}"]["delete"]["security"] == [{"OAuth2PasswordBearer": ["operator"]}]
    assert ops["/audit/requests"]["get"]["security"] == [{"OAuth2PasswordBearer": ["auditor"]}]


# -- tokens --------------------------------------------------------------------------------------
def test_refused_tokens(bare: TestClient, settings: Settings) -> None:
    good = grant(settings, "svc-refusals", ("automation",))
    url, body = "/executed_obs_units/start", {"obs_unit_id": "OU-T", "instrument": "HARPS"}
    assert bare.post(url, json=body, headers=good).status_code == 202
    token = good["Authorization"].removeprefix("Bearer ")
    claims = jwt.decode(token, options={"verify_signature": False})

    def bearer(t: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {t}"}

    secret = settings.signing_secret()
    expired = jwt.encode({**claims, "iat": datetime.now(UTC) - timedelta(hours=2),
                          "exp": datetime.now(UTC) - timedelta(hours=1)}, secret)
    wrong_key = jwt.encode(claims, "another-secret-of-at-least-32-characters!")
    head, payload, sig = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged["roles"] = ["admin"]
    tampered = ".".join([head, base64.urlsafe_b64encode(json.dumps(forged).encode()).decode()
                         .rstrip("="), sig])
    none_alg = jwt.encode(claims, None, algorithm="none")  # type: ignore[arg-type]
    for bad, why in [(expired, "expired"), (wrong_key, "signature"), (tampered, "signature"),
                     (none_alg, "invalid"), (token[:-4], "")]:
        body_ = assert_error(bare.post(url, json=body, headers=bearer(bad)), 401)
        assert why in body_["detail"], (why, body_)
        assert bare.post(url, json=body, headers=bearer(bad)).headers["WWW-Authenticate"] == \
            "Bearer"
    assert bare.get("/health").json()["journal"]["commands"] == {"applied": 1} or \
        bare.get("/health").json()["journal"]["depth"] <= 1  # only the good command


def test_users_service_accounts_and_revocation(bare: TestClient, settings: Settings) -> None:
    admin = grant(settings, "root", ("admin",), kind="user")
    # a user for a dashboard
    r = bare.post("/auth/register", headers=admin,
                  json={"username": "dash", "password": PASSWORD, "roles": ["viewer"]})
    assert r.status_code == 201, r.text
    user = r.json()
    assert user["roles"] == ["viewer"] and user["kind"] == "user" and user["created_by"] == "root"
    assert_error(bare.post("/auth/register", headers=admin, json={
        "username": "dash", "password": PASSWORD, "roles": ["viewer"]}), 409)
    assert_error(bare.post("/auth/register", headers=admin, json={
        "username": "short", "password": "2short", "roles": ["viewer"]}), 422)
    assert_error(bare.post("/auth/token", data={"username": "dash", "password": "wrong"}), 401)
    assert_error(bare.post("/auth/token", data={"username": "nobody", "password": "x"}), 401)
    dash = login(bare, "dash", PASSWORD)
    me = bare.get("/auth/me", headers=dash).json()
    assert me["username"] == "dash" and me["actor"] == "dash" and me["roles"] == ["viewer"]
    assert bare.get("/executed_obs_units", headers=dash).status_code == 200
    assert_error(bare.post("/executed_obs_units/start", headers=dash,
                           json={"obs_unit_id": "OU", "instrument": "H"}), 403)

    # a password change needs the current password, and ends the earlier tokens
    r = bare.put("/auth/me/password", headers=dash, json={"current_password": PASSWORD,
                                                          "password": PASSWORD + "-new"})
    assert r.status_code == 204, r.text
    assert_error(bare.get("/auth/me", headers=dash), 401)
    dash = login(bare, "dash", PASSWORD + "-new")
    assert bare.get("/auth/me", headers=dash).status_code == 200

    # disabling an account refuses its tokens at once; enabling lets them in again
    assert bare.put(f"/auth/accounts/{user['id']}/disabled", headers=admin).json()[
        "disabled_at"] is not None
    assert_error(bare.get("/auth/me", headers=dash), 401)
    assert_error(bare.post("/auth/token", data={"username": "dash",
                                                "password": PASSWORD + "-new"}), 401)
    bare.put(f"/auth/accounts/{user['id']}/disabled?disabled=false", headers=admin)
    assert bare.get("/auth/me", headers=dash).status_code == 200

    # a service account for the telescope, with two API tokens; one revoked
    r = bare.post("/auth/service-accounts", headers=admin,
                  json={"name": "dome-automation", "roles": ["automation"]})
    assert r.status_code == 201, r.text
    svc = r.json()["id"]
    issued = [bare.post(f"/auth/service-accounts/{svc}/tokens", headers=admin,
                        json={"name": name}).json() for name in ("pc-1", "pc-2")]
    assert_error(bare.post(f"/auth/service-accounts/{user['id']}/tokens", headers=admin,
                           json={"name": "x"}), 404)  # a user is not a service account
    t1, t2 = ({"Authorization": f"Bearer {i['token']}"} for i in issued)
    start = {"obs_unit_id": "OU-S", "instrument": "HARPS"}
    r = bare.post("/executed_obs_units/start?wait=true", headers=t1, json=start)
    assert applied(r)["status"] == "applied"
    cmd = bare.get(f"/commands/{r.json()['command_id']}", headers=dash).json()
    assert cmd["actor"] == "service:dome-automation"
    r = bare.delete(f"/auth/service-accounts/{svc}/tokens/{issued[0]['id']}", headers=admin)
    assert r.status_code == 204
    assert_error(bare.post("/executed_obs_units/start", headers=t1, json=start), 401)
    assert bare.post("/executed_obs_units/start", headers=t2, json=start).status_code == 202
    listed = bare.get(f"/auth/service-accounts/{svc}/tokens", headers=admin).json()
    assert [t["revoked_by"] for t in listed] == ["root", None]
    assert "token" not in listed[0]  # shown once, at issue
    assert_error(bare.delete(f"/auth/service-accounts/{svc}/tokens/nope", headers=admin), 404)
    names = {a["username"] for a in bare.get("/auth/accounts", headers=admin).json()}
    assert {"root", "dash", "dome-automation"} <= names


def test_another_process_sees_a_revocation_within_the_refresh(settings: Settings) -> None:
    """Two API processes on one database: a token revoked through one is refused by the
    other once its snapshot is refreshed (OBSLEDGER_AUTH_REFRESH_S)."""
    admin = grant(settings, "root", ("admin",), kind="user")
    with TestClient(create_app(settings)) as a, TestClient(create_app(
            settings.model_copy(update={"data_dir": settings.data_dir / "b",
                                        "read_model_url": settings.read_model_database_url,
                                        "journal_path": settings.data_dir / "b" / "j.db",
                                        "jwt_secret": SecretStr(settings.signing_secret()),
                                        "auth_refresh_s": 0.2}))) as b:
        svc = a.post("/auth/service-accounts", headers=admin,
                     json={"name": "agent", "roles": ["viewer"]}).json()["id"]
        issued = a.post(f"/auth/service-accounts/{svc}/tokens", headers=admin,
                        json={"name": "t"}).json()
        token = {"Authorization": f"Bearer {issued['token']}"}
        assert b.get("/auth/me", headers=token).status_code == 200  # unknown → refreshed
        a.delete(f"/auth/service-accounts/{svc}/tokens/{issued['id']}", headers=admin)
        deadline = datetime.now(UTC) + timedelta(seconds=5)
        while b.get("/auth/me", headers=token).status_code == 200:
            assert datetime.now(UTC) < deadline, "the other process never saw the revocation"


def test_the_actor_is_the_principal_never_a_header(client: TestClient, settings: Settings
                                                   ) -> None:
    r = client.post("/executed_obs_units/start?wait=true",
                    json={"obs_unit_id": "OU-A", "instrument": "HARPS"},
                    headers={"X-Obsledger-Actor": "somebody-else"})
    body = applied(r)
    unit = client.get(f"/executed_obs_units/execution/{body['ids']['executed_obs_unit_id']}"
                      f"?min_position={body['position']}").json()
    assert unit["started_by"] == "service:test-automation"


def test_rate_limited_logins(tmp_path: Path) -> None:
    s = make_settings(tmp_path, "sqlite", auth_rate_limit="3/minute",
                      auth_rate_limit_per_client="4/minute")
    with TestClient(create_app(s)) as c:
        for _ in range(3):
            assert_error(c.post("/auth/token", data={"username": "admin", "password": "no"}),
                         401)
        r = c.post("/auth/token", data={"username": "admin", "password": "no"})
        body = assert_error(r, 429)
        assert int(r.headers["Retry-After"]) >= 1 and body["errors"][0]["field"] == "username"
        # the right password does not get through the limit either
        password = (s.data_dir / "admin-password").read_text().strip()
        assert_error(c.post("/auth/token", data={"username": "admin", "password": password}),
                     429)
        # another name gets its own budget, until the client address runs out
        assert_error(c.post("/auth/token", data={"username": "eve", "password": "x"}), 401)
        body = assert_error(c.post("/auth/token", data={"username": "mallory",
                                                        "password": "x"}), 429)
        assert body["errors"][0]["field"] == "client"


def test_one_command_start_creates_a_local_admin(tmp_path: Path) -> None:
    s = make_settings(tmp_path, "sqlite")
    with TestClient(create_app(s)) as c:
        path = s.data_dir / "admin-password"
        assert path.stat().st_mode & 0o777 == 0o600
        admin = login(c, "admin", path.read_text().strip())
        me = c.get("/auth/me", headers=admin).json()
        assert set(me["roles"]) == {"admin", "operator", "auditor"}
    with TestClient(create_app(s)) as c:  # a restart keeps the same admin and secret
        assert c.get("/auth/me", headers=admin).status_code == 200
    assert (s.data_dir / "jwt-secret").stat().st_mode & 0o777 == 0o600


def test_production_refuses_the_development_secret(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="OBSLEDGER_JWT_SECRET"):
        make_settings(tmp_path, "sqlite", mode="production")
    with pytest.raises(ValidationError, match="32 characters"):
        make_settings(tmp_path, "sqlite", mode="production", jwt_secret="short")
    secret = "fe5fe8abab21a27d1594733949ad4568-Q"
    s = make_settings(tmp_path, "sqlite", mode="production", jwt_secret=secret)
    assert s.signing_secret() == secret and not (s.data_dir / "jwt-secret").exists()
    assert secret not in repr(s)


def test_passwords_never_reach_logs_events_or_the_audit_log(settings: Settings) -> None:
    stream = io.StringIO()
    configure_logging("json", logging.DEBUG, stream)
    try:
        admin = grant(settings, "root", ("admin", "operator"), kind="user")
        with TestClient(create_app(settings)) as c:
            assert c.post("/auth/register", headers=admin, json={
                "username": "obs1", "password": PASSWORD, "roles": ["operator"]}).status_code \
                == 201
            user = login(c, "obs1", PASSWORD)
            c.post("/auth/token", data={"username": "obs1", "password": PASSWORD + "x"})
            assert c.put("/auth/me/password", headers=user, json={
                "current_password": PASSWORD, "password": PASSWORD[::-1]}).status_code == 204
            applied(c.post("/executed_obs_units/start?wait=true", headers=login(
                c, "obs1", PASSWORD[::-1]), json={"obs_unit_id": "OU", "instrument": "H"}))
            ledger = c.app.state.ledger  # type: ignore[attr-defined]
            ledger.request_audit.flush()
            dumps = [stream.getvalue()]
            with ledger.engine.connect() as conn:
                for table in ("request_audit", "accounts", "executed_obs_units"):
                    dumps.append(repr(conn.execute(text(f"SELECT * FROM {table}")).all()))
            dumps += [repr(e) for e in ledger.store.app.recorder.select_notifications(1, 1000)]
    finally:
        logging.getLogger().handlers.clear()
    for dump in dumps:
        for secret in (PASSWORD, PASSWORD + "x", PASSWORD[::-1]):
            assert secret not in dump
    for path in settings.data_dir.rglob("*"):
        if path.is_file():
            raw = path.read_bytes()
            for secret in (PASSWORD, PASSWORD[::-1]):
                assert secret.encode() not in raw, path


# -- the request audit log ---------------------------------------------------------------------
def test_request_audit_log(bare: TestClient, settings: Settings) -> None:
    robot = grant(settings, "robot", ("automation", "viewer"))
    auditor = grant(settings, "inspector", ("auditor",), kind="user")
    t0 = datetime.now(UTC)
    r = bare.post("/executed_obs_units/start", headers={**robot, "Idempotency-Key": "aud-1"},
                  json={"obs_unit_id": "OU-R", "instrument": "HARPS"})
    assert r.status_code == 202
    unit = r.json()["ids"]["executed_obs_unit_id"]
    bare.put(f"/executed_obs_units/{unit}/finish", headers=robot, json={"status": "success"})
    bare.get("/raw_data_files", headers=robot)
    bare.post("/executed_obs_units/start", json={"obs_unit_id": "x", "instrument": "y"})  # 401
    assert_error(bare.get("/audit/requests", headers=robot), 403)

    page = bare.get("/audit/requests", headers=auditor,
                    params={"principal": "service:robot", "since": t0.isoformat()}).json()
    rows = page["items"]
    assert page["total"] == 4 == len(rows)
    start, finish, listing, forbidden = reversed(rows)  # newest first
    assert (forbidden["route"], forbidden["status"]) == ("/audit/requests", 403)
    assert (start["method"], start["route"], start["status"], start["command_id"]) == (
        "POST", "/executed_obs_units/start", 202, "aud-1")
    assert start["client"] == "testclient" and start["duration_ms"] > 0
    assert (finish["route"], finish["resource_id"]) == ("/executed_obs_units/{id}/finish", unit)
    assert finish["command_id"] and finish["path"] == f"/executed_obs_units/{unit}/finish"
    assert (listing["method"], listing["status"], listing["command_id"]) == (
        "GET", 200, None)
    refused = bare.get("/audit/requests", headers=auditor, params={"status": 401}).json()
    assert any(x["principal"] is None and x["route"] == "/executed_obs_units/start"
               for x in refused["items"])
    by_command = bare.get("/audit/requests", headers=auditor,
                          params={"command_id": "aud-1"}).json()
    assert [x["id"] for x in by_command["items"]] == [start["id"]]
    paged = bare.get("/audit/requests", headers=auditor, params={"limit": 1, "skip": 1}).json()
    assert len(paged["items"]) == 1 and paged["total"] >= 6
    assert_error(bare.get("/audit/requests", headers=auditor, params={"limit": 0}), 422)

    # append-only: the database refuses to edit or delete a record
    engine = bare.app.state.ledger.engine  # type: ignore[attr-defined]
    for statement in ("UPDATE request_audit SET status = 200",
                      "DELETE FROM request_audit"):
        with pytest.raises(SQLAlchemyError, match="append-only"), engine.begin() as conn:
            conn.execute(text(statement))


def test_oversized_requests_are_audited_cut_and_the_log_goes_on(bare: TestClient,
                                                                 settings: Settings) -> None:
    """Text longer than its column is cut: PostgreSQL would refuse the whole batch forever."""
    robot = grant(settings, "robot", ("automation", "viewer"))
    auditor = grant(settings, "inspector", ("auditor",), kind="user")
    audit = bare.app.state.ledger.request_audit  # type: ignore[attr-defined]
    audit.flush()
    long_path = "/raw_data_files/" + "f" * 5000
    assert bare.get(long_path, headers=robot).status_code < 500
    assert bare.request("PROPPATCHEXTENDED", "/raw_data_files", headers=robot).status_code < 500
    assert bare.get("/raw_data_files/a%00b%ff", headers=robot).status_code < 500
    audit.flush()  # (the writer thread may have written them already)
    assert audit.pending == 0 and not audit.failing
    rows = bare.get("/audit/requests", headers=auditor).json()["items"]
    assert {(r["method"], r["path"]) for r in rows} >= {("PROPPATCHE", "/raw_data_files"),
                                                        ("GET", long_path[:1000])}
    assert any(r["path"].startswith("/raw_data_files/a\ufffdb") for r in rows)


def test_a_record_the_database_refuses_is_left_out_not_holding_the_rest(
        bare: TestClient, settings: Settings) -> None:
    audit = bare.app.state.ledger.request_audit  # type: ignore[attr-defined]
    audit.flush()
    now = datetime.now(UTC)
    good = (now, None, "GET", "/health", "/health", None, "10.0.0.1", 200, 1.0, None)
    bad = (now, None, "GET", "/health", "/health", None, "10.0.0.2", None, 1.0, None)  # NULL
    audit._buffer.extend([good, bad, good])  # as record() holds them (it cannot make this one)
    assert audit.flush() == 2
    assert audit.pending == 0 and audit.refused == 1 and not audit.failing
    with bare.app.state.ledger.engine.connect() as conn:  # type: ignore[attr-defined]
        clients = conn.execute(text("SELECT client FROM request_audit WHERE client "
                                    "LIKE '10.0.0.%'")).scalars().all()
    assert clients == ["10.0.0.1", "10.0.0.1"]


def _audited(engine: Any, principal: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM request_audit WHERE principal = :p"),
                                {"p": principal}).scalar_one())


def test_every_request_of_concurrent_clients_is_audited_over_http(settings: Settings) -> None:
    """N clients x M requests on keep-alive connections to a real server: exactly N x M
    records (the writer once died of "deque mutated during iteration" under such load)."""
    clients, each = 8, 150
    robot = grant(settings, "audit-load", ("automation", "viewer"))
    server = ServerProcess(settings.model_copy(update={"request_audit_flush_s": 0.05}))
    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=robot, timeout=30) as c:
            for j in range(each):
                if j % 3 == 0:  # a command, acknowledged from the plain lane
                    r = c.post("/executed_obs_units/start", json={
                        "obs_unit_id": f"OU-AUD-{i}", "instrument": "HARPS"})
                else:
                    r = c.get(f"/executed_obs_units/OU-AUD-{i}")
                with lock:
                    statuses[r.status_code] += 1

    engine = create_read_model_engine(settings.read_model_database_url)
    try:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(client, range(clients)))
        assert statuses == {202: clients * ((each + 2) // 3),
                            200: clients * (each - (each + 2) // 3)}
        deadline = time.monotonic() + 30
        while _audited(engine, "service:audit-load") < clients * each \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # a few more flushes: nothing is written twice
        assert _audited(engine, "service:audit-load") == clients * each
        metrics = httpx.get(f"{server.url}/metrics").text
        assert "obsledger_request_audit_writer_up 1.0" in metrics
        assert "obsledger_request_audit_writer_errors_total 0.0" in metrics
        assert "obsledger_request_audit_dropped_total 0.0" in metrics
        audit = httpx.get(f"{server.url}/health").json()["request_audit"]
        assert audit["writer"] == "running" and audit["writer_errors"] == 0
        assert audit["written"] >= clients * each and audit["last_written_at"]
    finally:
        server.stop()
        engine.dispose()


def _request(i: int) -> tuple[Any, ...]:
    return (datetime.now(UTC), "service:hammer", "GET", "/health", f"/health/{i}", None,
            "127.0.0.1", 200, 0.1, None)


def test_records_appended_while_the_writer_flushes_are_all_written(settings: Settings) -> None:
    """Threads record as fast as they can while the writer flushes every 10 ms."""
    settings.prepare_dirs()
    engine = create_read_model_engine(settings.read_model_database_url)
    audit = RequestAuditLog(engine, flush_s=0.01)
    threads, each = 4, 5_000
    try:
        audit.create_table()
        audit.start()

        def hammer(t: int) -> None:
            for i in range(each):
                audit.record(*_request(t * each + i))

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(hammer, range(threads)))
        audit.stop()  # the last flush
        assert not audit.writer_up and audit.writer_errors == 0 and audit.pending == 0
        assert audit.written == threads * each == _audited(engine, "service:hammer")
        with engine.connect() as conn:
            paths = conn.execute(text("SELECT count(DISTINCT path) FROM request_audit")
                                 ).scalar_one()
        assert paths == threads * each  # each once
    finally:
        audit.stop()
        engine.dispose()


def test_an_exception_in_a_flush_does_not_kill_the_writer(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    settings.prepare_dirs()
    engine = create_read_model_engine(settings.read_model_database_url)
    audit = RequestAuditLog(engine, flush_s=0.02)
    real_insert = audit._insert
    failures = [RuntimeError("deque mutated during iteration"), KeyError("boom")]

    def insert(rows: list[tuple[Any, ...]]) -> None:
        if failures:
            raise failures.pop(0)
        real_insert(rows)

    monkeypatch.setattr(audit, "_insert", insert)
    try:
        audit.start()
        for i in range(10):
            audit.record(*_request(i))
        deadline = time.monotonic() + 10
        while audit.written < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert audit.writer_up and audit.writer_errors == 2
        assert audit.last_error == "KeyError: 'boom'"
        assert audit.written == 10 == _audited(engine, "service:hammer")  # held, then written
        audit.record(*_request(10))  # and it goes on
        deadline = time.monotonic() + 10
        while audit.written < 11 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _audited(engine, "service:hammer") == 11 and audit.report()["writer"] == \
            "running"
    finally:
        audit.stop()
        engine.dispose()
    assert audit.report()["writer"] == "stopped"


def test_a_verified_token_still_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.accounts as accounts

    signer = accounts.TokenSigner("s" * 40, ttl_s=60)
    token, _ = signer.user_token({"id": uuid.uuid4(), "username": "u", "kind": "user",
                                  "roles": ["viewer"]})
    assert signer.decode(token)["name"] == "u"
    assert signer.decode(token) is signer.decode(token)  # verified once, then cached
    later = accounts.time.time() + 3600
    monkeypatch.setattr(accounts.time, "time", lambda: later)
    with pytest.raises(accounts.AuthError, match="expired"):
        signer.decode(token)
