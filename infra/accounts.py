"""Accounts: who may act, with which roles and tokens (passwords: ``infra/passwords.py``;
signing and checking JWTs: ``infra/tokens.py``).

Accounts (people and service accounts) live in two tables of the read-model database —
``accounts`` and ``service_tokens`` — written only by this module. They are not a read model
(no rebuild drops them) and not events: who changed an account is in the request audit log.

Every token is a JWT signed with the configured secret (HS256, ``infra.tokens``):
- a user's token (``POST /auth/token``) expires after ``token_ttl_s`` (30 minutes);
- a service account's API token is long-lived (optional expiry) and revocable: its ``jti``
  must name an unrevoked row of ``service_tokens``.

Checking a token is a signature check plus a lookup in an in-memory snapshot of the accounts
and of every service token, revoked ones included (refreshed at most every ``refresh_s``; a
process that changes an account refreshes at once). While the database cannot be read, the
last snapshot stands: a token it knows as valid keeps working (automation keeps recording), a
revoked one stays refused, and one it does not know cannot be checked (:class:`AuthUnavailable`,
503): nothing is trusted on its signature alone.

Passwords (and the JWT secret) must pass one strength rule,
:func:`infra.passwords.password_problem`: zxcvbn's estimate, with the username as a word an
attacker would try first.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import UUID

import orjson
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
from infra.passwords import Passwords, write_private
from infra.read_model_db import create_read_model_engine, utc_row
from infra.schema import migrate
from infra.tokens import AuthError, AuthUnavailable, TokenSigner

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
    Column("email", String(320)),  # a user's address, when given at registration
)
#: Columns added to ``accounts`` after its first release: an existing table gains them.
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


class AccountExists(Exception):
    pass


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


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
    revoked: set[str] = field(default_factory=set)  # ids of revoked service tokens
    taken: float = 0.0  # monotonic
    readable: bool = False  # the last refresh reached the database


class AccountStore:
    """The accounts tables."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._created = False

    def create_tables(self) -> None:
        """The accounts tables at the schema's head revision (infra/schema.py: created, or an
        older database migrated, once per process; other processes may do it at once)."""
        if not self._created:
            migrate(self.engine)
            self._created = True

    def create(self, username: str, kind: AccountKind, roles: Iterable[str],
               password_hash: str | None, created_by: str,
               email: str | None = None) -> dict[str, Any]:
        self.create_tables()
        row = {"id": uuid.uuid4(), "username": username, "kind": kind,
               "roles": sorted(set(roles)), "password_hash": password_hash,
               "created_at": datetime.now(UTC), "created_by": created_by, "email": email}
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
                                         service_tokens.c.expires_at,
                                         service_tokens.c.revoked_at)):
                if t.revoked_at is None:
                    snap.tokens[t.id] = (t.account_id, _utc(t.expires_at))
                else:  # kept: a revocation must still apply while the tables are unreadable
                    snap.revoked.add(t.id)
        return snap


class RolesDiffer(AccountExists):
    """The service account exists with other roles than those asked for: its tokens carry
    the account's roles, so a token is not issued (the roles are not changed silently)."""


def provision_service_token(store: AccountStore, signer: TokenSigner, name: str,
                            roles: Iterable[str], *, token_name: str, created_by: str,
                            same_roles: bool = False) -> str:
    """An API token for the service account ``name`` (created with ``roles`` if missing).
    With ``same_roles``, an existing account whose roles are not exactly ``roles`` raises
    :class:`RolesDiffer`."""
    roles = sorted(set(roles))
    account = store.find(username=name)
    if same_roles and account is not None and account["kind"] == "service" \
            and sorted(account["roles"]) != roles:
        raise RolesDiffer(
            f"service account {name} exists with the roles {', '.join(sorted(account['roles']))}"
            f"; its tokens carry those, not {', '.join(roles)}: no token issued (ask for "
            f"exactly its roles, or use another account name)")
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
                        token_name: str, created_by: str, cache: Path | None = None,
                        same_roles: bool = False) -> str:
    """:func:`provision_service_token` against the accounts of ``database_url`` (for the
    command line and the benchmarks, which have no ledger). With ``cache`` (the accounts
    snapshot file of an API process on this machine), the snapshot is refreshed there too:
    that API, restarted while the database is down, still knows the new token."""
    engine = create_read_model_engine(database_url)
    try:
        store = AccountStore(engine)
        signer = TokenSigner(secret, ttl_s=1800)
        token = provision_service_token(store, signer, name, roles, token_name=token_name,
                                        created_by=created_by, same_roles=same_roles)
        if cache is not None:
            Authenticator(store, signer, cache=cache).refresh()
        return token
    finally:
        engine.dispose()


def _snapshot_json(snap: Snapshot) -> bytes:
    """The snapshot as kept on disk: who may act and which tokens are live or revoked; no
    password hash (only ids, names, roles and dates)."""
    def when(value: datetime | None) -> str | None:
        return value.isoformat() if value is not None else None

    return orjson.dumps({
        "version": 1,
        "accounts": [{"id": str(a.id), "username": a.username, "kind": a.kind,
                      "roles": sorted(a.roles), "disabled": a.disabled,
                      "tokens_valid_after": when(a.tokens_valid_after)}
                     for a in sorted(snap.accounts.values(), key=lambda a: str(a.id))],
        "tokens": {jti: [str(account), when(expires)]
                   for jti, (account, expires) in sorted(snap.tokens.items())},
        "revoked": sorted(snap.revoked)})


def _snapshot_from_json(data: bytes) -> Snapshot:
    def when(value: str | None) -> datetime | None:
        return datetime.fromisoformat(value) if value is not None else None

    raw = orjson.loads(data)
    if raw.get("version") != 1:
        raise ValueError(f"unknown version {raw.get('version')!r}")
    snap = Snapshot(readable=False)  # taken 0: stale, refreshed at the first chance
    for a in raw["accounts"]:
        snap.accounts[UUID(a["id"])] = AccountState(
            UUID(a["id"]), a["username"], a["kind"], frozenset(a["roles"]),
            bool(a["disabled"]), when(a["tokens_valid_after"]))
    for jti, (account, expires) in raw["tokens"].items():
        snap.tokens[jti] = (UUID(account), when(expires))
    snap.revoked = set(raw["revoked"])
    return snap


class Authenticator:
    """Turns a bearer token into a :class:`Principal` (or :class:`AuthError`).

    With a ``cache`` file, every snapshot read from the database that differs from the last
    one is also written there (mode 0600, no password hashes), and a process starting while
    the database cannot be read begins with it: a restart during an outage keeps the tokens
    and revocations it knew."""

    def __init__(self, store: AccountStore, signer: TokenSigner, refresh_s: float = 1.0,
                 cache: Path | None = None) -> None:
        self.store = store
        self.signer = signer
        self.refresh_s = refresh_s
        self.passwords = Passwords()
        self.cache = cache
        self._cached: bytes | None = None
        self._snapshot = self._load_cache()
        self._lock = threading.Lock()
        self._background = threading.Lock()

    def _load_cache(self) -> Snapshot:
        if self.cache is None:
            return Snapshot()
        try:
            data = self.cache.read_bytes()
            snapshot = _snapshot_from_json(data)
        except FileNotFoundError:
            return Snapshot()
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("accounts cache %s unusable, ignored: %s", self.cache, e)
            return Snapshot()
        self._cached = data
        return snapshot

    def _save_cache(self, snap: Snapshot) -> None:
        if self.cache is None:
            return
        data = _snapshot_json(snap)
        if data == self._cached:
            return
        try:
            write_private(self.cache, data.decode())
            self._cached = data
        except OSError as e:  # the database answered: the cache is only for outages
            log.warning("could not write the accounts cache %s: %s", self.cache, e)

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
                self._save_cache(self._snapshot)
            except SQLAlchemyError as e:
                if self._snapshot.readable:
                    log.warning("accounts unreadable, last snapshot stands: %s", e)
                self._snapshot = Snapshot(self._snapshot.accounts, self._snapshot.tokens,
                                          self._snapshot.revoked, taken=time.monotonic(),
                                          readable=False)

    def snapshot_status(self) -> dict[str, Any]:
        """Whether the last refresh read the accounts (``reachable``; when not, tokens are
        checked against the last snapshot read). A stale snapshot is refreshed in the
        background, so that asking again soon tells the present."""
        if self.stale():
            self.refresh_soon()
        return {"reachable": self._snapshot.readable}

    # -- tokens ------------------------------------------------------------------------------
    def retry_after_s(self) -> int:
        """When a token that could not be checked is worth sending again."""
        return max(1, int(self.refresh_s + 0.999))

    def authenticate(self, token: str, *, refreshed: bool = False) -> Principal | None:
        """The principal, or None when the snapshot does not know the account or token yet
        (refresh, then ask again with ``refreshed=True``). Raises :class:`AuthError`, or
        :class:`AuthUnavailable` for a token the last snapshot does not know while the
        accounts cannot be read."""
        return self.principal(self.signer.decode(token), refreshed=refreshed)

    def principal(self, claims: dict[str, Any], *, refreshed: bool = False) -> Principal | None:
        """:meth:`authenticate` for claims already verified (a token's, a stream ticket's)."""
        try:
            account_id = UUID(claims["sub"])
        except (ValueError, TypeError) as e:
            raise AuthError("token invalid: bad subject") from e
        snap = self._snapshot
        account = snap.accounts.get(account_id)
        kind = claims["kind"]
        jti = str(claims["jti"])
        if kind == "service":
            if jti in snap.revoked:
                raise AuthError("token revoked")
            live = snap.tokens.get(jti)
            if live is None or account is None:
                if not snap.readable:  # the database is down: this token cannot be checked
                    raise AuthUnavailable("the accounts database cannot be read and this "
                                          "token is not known here yet")
                if not refreshed:
                    return None
                raise AuthError("token revoked or unknown")
            if live[0] != account_id:
                raise AuthError("token invalid: wrong account")
        elif kind == "user":
            if account is None:
                if not snap.readable:
                    raise AuthUnavailable("the accounts database cannot be read and this "
                                          "account is not known here yet")
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

    def password_login(self, username: str, password: str) -> tuple[str, int]:
        """A user token for a valid username and password (slow by design: argon2)."""
        account = self.store.find(username=username)
        hashed = account["password_hash"] if account and account["kind"] == "user" else None
        if not self.passwords.verify(hashed, password) or account is None:
            raise AuthError("incorrect username or password")
        if account["disabled_at"] is not None:
            raise AuthError("account disabled")
        return self.signer.user_token(account)

    def check_password(self, account_id: UUID, password: str) -> bool:
        """Whether ``password`` is the account's current one (argon2, like a login)."""
        account = self.store.find(account_id=account_id)
        hashed = account["password_hash"] if account and account["kind"] == "user" else None
        return self.passwords.verify(hashed, password)

    def ensure_admin(self, password: str | None, data_dir: Path) -> str | None:
        """Create the local ``admin`` account when no enabled admin exists. Returns the
        password file written (a random password), or None when nothing was created."""
        if self.store.has_admin():
            return None
        written = None
        if password is None:
            password = secrets.token_urlsafe(18)
            path = data_dir / "admin-password"
            write_private(path, password + "\n")  # created 0600, never chmod-ed afterwards
            written = str(path)
        try:
            self.store.create("admin", "user", [Role.admin, Role.operator, Role.auditor],
                              self.passwords.hash(password), created_by="obsledger")
        except AccountExists:
            return None
        self.refresh()
        return written or "OBSLEDGER_ADMIN_PASSWORD"
