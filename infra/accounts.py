"""Accounts, passwords and tokens.

Accounts (people and service accounts) live in two tables of the read-model database —
``accounts`` and ``service_tokens`` — written only by this module. They are not a read model
(no rebuild drops them) and not events: who changed an account is in the request audit log.

Every token is a JWT signed with the configured secret (HS256):
- a user's token (``POST /auth/token``) expires after ``token_ttl_s`` (30 minutes);
- a service account's API token is long-lived (optional expiry) and revocable: its ``jti``
  must name an unrevoked row of ``service_tokens``.

Checking a token is a signature check plus a lookup in an in-memory snapshot of the accounts
(refreshed at most every ``refresh_s``; a process that changes an account refreshes at once).
While the database cannot be read, the last snapshot stands and tokens it does not know are
trusted as signed, so automation keeps recording while the database is down.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Engine,
    MetaData,
    String,
    Table,
    Uuid,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from domain.accounts import AccountKind, Principal, Role
from infra.read_model_db import create_read_model_engine, utc_row

log = logging.getLogger("obsledger.accounts")

TZ = DateTime(timezone=True)
metadata = MetaData()
accounts = Table(
    "accounts", metadata,
    Column("id", Uuid, primary_key=True),
    Column("username", String(100), nullable=False, unique=True),
    Column("kind", String(10), nullable=False),
    Column("roles", JSON, nullable=False),
    Column("password_hash", String(200)),  # None for service accounts
    Column("created_at", TZ, nullable=False),
    Column("created_by", String(120), nullable=False),
    Column("disabled_at", TZ),
    Column("disabled_by", String(120)),
    Column("tokens_valid_after", TZ),  # user tokens issued before this are refused
)
service_tokens = Table(
    "service_tokens", metadata,
    Column("id", String(40), primary_key=True),  # the token's jti
    Column("account_id", Uuid, nullable=False, index=True),
    Column("name", String(100), nullable=False),
    Column("created_at", TZ, nullable=False),
    Column("created_by", String(120), nullable=False),
    Column("expires_at", TZ),
    Column("revoked_at", TZ),
    Column("revoked_by", String(120)),
)

ISSUER = "obsledger"
DEV_SECRET_FILE = "jwt-secret"


class AuthError(Exception):
    """A token or password that does not authenticate (→ 401)."""


class AccountExists(Exception):
    pass


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def development_secret(data_dir: Path) -> str:
    """The development signing secret: random, made once, kept in ``<data_dir>/jwt-secret``."""
    path = data_dir / DEV_SECRET_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    if not path.exists():  # written aside, then linked: a reader never sees half a secret
        tmp = data_dir / f".{DEV_SECRET_FILE}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(48))
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


class Passwords:
    """argon2id hashes (argon2-cffi's defaults: RFC 9106 low-memory profile)."""

    def __init__(self) -> None:
        self._hasher = PasswordHasher()
        self._dummy: str | None = None  # made on first use: hashing takes tens of ms

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, hashed: str | None, password: str) -> bool:
        """Also spends the time of a check when there is no hash (unknown user)."""
        if self._dummy is None:
            self._dummy = self._hasher.hash(secrets.token_urlsafe(16))
        try:
            return self._hasher.verify(hashed or self._dummy, password) and hashed is not None
        except (VerificationError, InvalidHashError):
            return False


@dataclass(frozen=True, slots=True)
class AccountState:
    id: UUID
    username: str
    kind: AccountKind
    roles: frozenset[str]
    disabled: bool
    tokens_valid_after: datetime | None


@dataclass(slots=True)
class Snapshot:
    accounts: dict[UUID, AccountState] = field(default_factory=dict)
    tokens: dict[str, tuple[UUID, datetime | None]] = field(default_factory=dict)  # live only
    taken: float = 0.0  # monotonic
    readable: bool = False  # the last refresh reached the database


class AccountStore:
    """The accounts tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._created = False

    def create_tables(self) -> None:
        if not self._created:
            # another process may create them at the same moment
            with contextlib.suppress(IntegrityError):
                metadata.create_all(self.engine, checkfirst=True)
            self._created = True

    def create(self, username: str, kind: AccountKind, roles: Iterable[str],
               password_hash: str | None, created_by: str) -> dict[str, Any]:
        self.create_tables()
        row = {"id": uuid.uuid4(), "username": username, "kind": kind,
               "roles": sorted(set(roles)), "password_hash": password_hash,
               "created_at": datetime.now(UTC), "created_by": created_by}
        try:
            with self.engine.begin() as conn:
                conn.execute(accounts.insert().values(**row))
        except IntegrityError as e:
            raise AccountExists(username) from e
        return row

    def find(self, *, username: str | None = None, account_id: UUID | None = None,
             ) -> dict[str, Any] | None:
        self.create_tables()
        q = select(accounts)
        q = q.where(accounts.c.username == username) if username is not None else q.where(
            accounts.c.id == account_id)
        with self.engine.connect() as conn:
            row = conn.execute(q).mappings().first()
        return utc_row(row) if row else None

    def all(self) -> list[dict[str, Any]]:
        self.create_tables()
        with self.engine.connect() as conn:
            return [utc_row(r) for r in conn.execute(
                select(accounts).order_by(accounts.c.username)).mappings()]

    def has_admin(self) -> bool:
        return any(Role.admin in a["roles"] and a["disabled_at"] is None for a in self.all())

    def set_disabled(self, account_id: UUID, disabled: bool, by: str) -> bool:
        self.create_tables()
        now = datetime.now(UTC)
        values: dict[str, Any] = ({"disabled_at": now, "disabled_by": by} if disabled
                                  else {"disabled_at": None, "disabled_by": None})
        with self.engine.begin() as conn:
            return bool(conn.execute(update(accounts).where(accounts.c.id == account_id)
                                     .values(**values)).rowcount)

    def set_password(self, account_id: UUID, password_hash: str) -> None:
        """A new password; the account's earlier user tokens stop working."""
        with self.engine.begin() as conn:
            conn.execute(update(accounts).where(accounts.c.id == account_id).values(
                password_hash=password_hash, tokens_valid_after=datetime.now(UTC)))

    def issue_token(self, account_id: UUID, name: str, expires_at: datetime | None,
                    by: str) -> dict[str, Any]:
        self.create_tables()
        row = {"id": secrets.token_hex(16), "account_id": account_id, "name": name,
               "created_at": datetime.now(UTC), "created_by": by, "expires_at": expires_at}
        with self.engine.begin() as conn:
            conn.execute(service_tokens.insert().values(**row))
        return row

    def revoke_token(self, account_id: UUID, token_id: str, by: str) -> bool:
        """False when the account has no such token; revoking twice is a no-op."""
        self.create_tables()
        with self.engine.begin() as conn:
            found = conn.execute(select(service_tokens.c.revoked_at).where(
                service_tokens.c.id == token_id,
                service_tokens.c.account_id == account_id)).first()
            if found is None:
                return False
            if found.revoked_at is None:
                conn.execute(update(service_tokens).where(service_tokens.c.id == token_id)
                             .values(revoked_at=datetime.now(UTC), revoked_by=by))
        return True

    def tokens(self, account_id: UUID) -> list[dict[str, Any]]:
        self.create_tables()
        with self.engine.connect() as conn:
            return [utc_row(r) for r in conn.execute(
                select(service_tokens).where(service_tokens.c.account_id == account_id)
                .order_by(service_tokens.c.created_at)).mappings()]

    def snapshot(self) -> Snapshot:
        self.create_tables()
        snap = Snapshot(taken=time.monotonic(), readable=True)
        with self.engine.connect() as conn:
            for a in conn.execute(select(accounts)).mappings():
                snap.accounts[a["id"]] = AccountState(
                    a["id"], a["username"], a["kind"], frozenset(a["roles"]),
                    a["disabled_at"] is not None, _utc(a["tokens_valid_after"]))
            for t in conn.execute(select(service_tokens.c.id, service_tokens.c.account_id,
                                         service_tokens.c.expires_at).where(
                    service_tokens.c.revoked_at.is_(None))):
                snap.tokens[t.id] = (t.account_id, _utc(t.expires_at))
        return snap


def provision_service_token(store: AccountStore, signer: TokenSigner, name: str,
                            roles: Iterable[str], *, token_name: str, created_by: str) -> str:
    """An API token for the service account ``name`` (created with ``roles`` if missing)."""
    account = store.find(username=name)
    if account is None:
        try:
            account = store.create(name, "service", roles, None, created_by=created_by)
        except AccountExists:  # created concurrently
            account = store.find(username=name)
    if account is None or account["kind"] != "service":
        raise AccountExists(f"{name} exists and is not a service account")
    return signer.service_token(account, store.issue_token(account["id"], token_name, None,
                                                           by=created_by))


def issue_service_token(database_url: str, secret: str, name: str, roles: Iterable[str], *,
                        token_name: str, created_by: str) -> str:
    """:func:`provision_service_token` against the accounts of ``database_url`` (for the
    command line and the benchmarks, which have no ledger)."""
    engine = create_read_model_engine(database_url)
    try:
        return provision_service_token(AccountStore(engine), TokenSigner(secret, ttl_s=1800),
                                       name, roles, token_name=token_name,
                                       created_by=created_by)
    finally:
        engine.dispose()


class TokenSigner:
    """HS256 JWTs: ``sub`` = account id, ``name``, ``kind``, ``roles``, ``iat``, ``exp``,
    ``jti`` (the service token id, or a random id for user tokens)."""

    LEEWAY_S = 5
    CACHE_SIZE = 10_000

    def __init__(self, secret: str, ttl_s: float) -> None:
        self._secret = secret
        self.ttl_s = ttl_s
        # token → its verified claims: a signature checks out the same every time, and
        # checking it (~50-100 µs) would be a good part of acknowledging a command
        self._verified: dict[str, dict[str, Any]] = {}

    def user_token(self, account: dict[str, Any]) -> tuple[str, int]:
        now = datetime.now(UTC)
        claims = self._claims(account, uuid.uuid4().hex, now)
        claims["exp"] = now + timedelta(seconds=self.ttl_s)
        return jwt.encode(claims, self._secret, algorithm="HS256"), int(self.ttl_s)

    def service_token(self, account: dict[str, Any], token: dict[str, Any]) -> str:
        claims = self._claims(account, token["id"], token["created_at"])
        if token["expires_at"] is not None:
            claims["exp"] = token["expires_at"]
        return jwt.encode(claims, self._secret, algorithm="HS256")

    @staticmethod
    def _claims(account: dict[str, Any], jti: str, iat: datetime) -> dict[str, Any]:
        return {"iss": ISSUER, "sub": str(account["id"]), "name": account["username"],
                "kind": account["kind"], "roles": sorted(account["roles"]), "jti": jti,
                "iat": iat.timestamp()}  # sub-second: a password change splits one second

    def decode(self, token: str) -> dict[str, Any]:
        """The token's claims (signature, issuer, expiry checked); raises AuthError."""
        claims = self._verified.get(token)
        if claims is not None:
            if "exp" in claims and claims["exp"] < time.time() - self.LEEWAY_S:
                raise AuthError("token expired")
            return claims
        claims = self._decode(token)
        if len(self._verified) >= self.CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = claims
        return claims

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._secret, algorithms=["HS256"], issuer=ISSUER,
                options={"require": ["sub", "iat", "jti", "kind", "name", "iss"]},
                leeway=self.LEEWAY_S)
        except jwt.ExpiredSignatureError as e:
            raise AuthError("token expired") from e
        except jwt.InvalidSignatureError as e:
            raise AuthError("token signature invalid") from e
        except jwt.InvalidTokenError as e:
            raise AuthError(f"token invalid: {e}") from e
        if claims["kind"] == "user" and "exp" not in claims:
            raise AuthError("token invalid: a user token must expire")
        return claims


class Authenticator:
    """Turns a bearer token into a :class:`Principal` (or :class:`AuthError`)."""

    def __init__(self, store: AccountStore, signer: TokenSigner, refresh_s: float = 1.0) -> None:
        self.store = store
        self.signer = signer
        self.refresh_s = refresh_s
        self.passwords = Passwords()
        self._snapshot = Snapshot()
        self._lock = threading.Lock()
        self._background = threading.Lock()

    # -- the snapshot -------------------------------------------------------------------------
    def stale(self) -> bool:
        return time.monotonic() - self._snapshot.taken > self.refresh_s

    def refresh_soon(self) -> None:
        """Refresh in a background thread (one at a time): requests keep using the current
        snapshot meanwhile, so a database that hangs never delays them."""
        if self._background.acquire(blocking=False):
            def run() -> None:
                try:
                    self.refresh()
                finally:
                    self._background.release()
            threading.Thread(target=run, name="accounts-refresh", daemon=True).start()

    def refresh(self) -> None:
        """Read the accounts again (keeps the last snapshot if the database is down)."""
        with self._lock:
            try:
                self._snapshot = self.store.snapshot()
            except SQLAlchemyError as e:
                if self._snapshot.readable:
                    log.warning("accounts unreadable, last snapshot stands: %s", e)
                self._snapshot = Snapshot(self._snapshot.accounts, self._snapshot.tokens,
                                          taken=time.monotonic(), readable=False)

    # -- tokens ------------------------------------------------------------------------------
    def authenticate(self, token: str, *, refreshed: bool = False) -> Principal | None:
        """The principal, or None when the snapshot does not know the account or token yet
        (refresh, then ask again with ``refreshed=True``). Raises :class:`AuthError`."""
        claims = self.signer.decode(token)
        try:
            account_id = UUID(claims["sub"])
        except (ValueError, TypeError) as e:
            raise AuthError("token invalid: bad subject") from e
        snap = self._snapshot
        account = snap.accounts.get(account_id)
        kind = claims["kind"]
        jti = str(claims["jti"])
        if kind == "service":
            live = snap.tokens.get(jti)
            if live is None or account is None:
                if not snap.readable:  # the database is down: trust the signature
                    return self._from_claims(claims, account_id)
                if not refreshed:
                    return None
                raise AuthError("token revoked or unknown")
            if live[0] != account_id:
                raise AuthError("token invalid: wrong account")
        elif kind == "user":
            if account is None:
                if not snap.readable:
                    return self._from_claims(claims, account_id)
                if not refreshed:
                    return None
                raise AuthError("unknown account")
            valid_after = account.tokens_valid_after
            if valid_after is not None and claims["iat"] < valid_after.timestamp():
                raise AuthError("token revoked (password changed)")
        else:
            raise AuthError("token invalid: unknown kind")
        if account.disabled:
            raise AuthError("account disabled")
        return Principal(account.id, account.username, account.kind, account.roles, jti)

    @staticmethod
    def _from_claims(claims: dict[str, Any], account_id: UUID) -> Principal:
        return Principal(account_id, str(claims["name"]), claims["kind"],
                         frozenset(claims.get("roles", ())), str(claims["jti"]))

    def password_login(self, username: str, password: str) -> tuple[str, int]:
        """A user token for a valid username and password (slow by design: argon2)."""
        account = self.store.find(username=username)
        hashed = account["password_hash"] if account and account["kind"] == "user" else None
        if not self.passwords.verify(hashed, password) or account is None:
            raise AuthError("incorrect username or password")
        if account["disabled_at"] is not None:
            raise AuthError("account disabled")
        return self.signer.user_token(account)

    def ensure_admin(self, password: str | None, data_dir: Path) -> str | None:
        """Create the local ``admin`` account when no enabled admin exists. Returns the
        password file written (a random password), or None when nothing was created."""
        if self.store.has_admin():
            return None
        written = None
        if password is None:
            password = secrets.token_urlsafe(18)
            path = data_dir / "admin-password"
            path.write_text(password + "\n")
            path.chmod(0o600)
            written = str(path)
        try:
            self.store.create("admin", "user", [Role.admin, Role.operator, Role.auditor],
                              self.passwords.hash(password), created_by="obsledger")
        except AccountExists:
            return None
        self.refresh()
        return written or "OBSLEDGER_ADMIN_PASSWORD"
