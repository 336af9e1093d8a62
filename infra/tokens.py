"""The tokens: JWTs signed with the configured secret (HS256), checked by signature, issuer
and expiry (:class:`TokenSigner`); whether the account behind one may act is
``infra.accounts.Authenticator``'s question.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt

ISSUER = "obsledger"
#: The audience of stream tickets (``TokenSigner.stream_ticket``), refused as tokens.
STREAM_AUDIENCE = "obsledger-stream"


class AuthError(Exception):
    """A token or password that does not authenticate (→ 401)."""


class AuthUnavailable(AuthError):
    """A token that cannot be checked now: the accounts cannot be read and the last snapshot
    does not know it (→ 503 with Retry-After; never trusted on its signature alone)."""


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

    def stream_ticket(self, claims: dict[str, Any], ttl_s: float) -> tuple[str, int]:
        """A ticket for the live stream only (``aud`` obsledger-stream), carrying the claims
        of the token it was made from, expiring within ``ttl_s`` and never after that token:
        what a browser's EventSource, which cannot send headers, presents as a cookie."""
        now = time.time()
        exp = min(now + ttl_s, float(claims.get("exp", now + ttl_s)))
        ticket = {k: v for k, v in claims.items() if k not in ("exp", "aud")}
        ticket.update(aud=STREAM_AUDIENCE, exp=exp)
        return jwt.encode(ticket, self._secret, algorithm="HS256"), max(0, int(exp - now))

    def decode_stream_ticket(self, ticket: str) -> dict[str, Any]:
        """A stream ticket's claims; raises AuthError (a token is no ticket, nor the reverse:
        ``_decode`` refuses any ``aud``)."""
        try:
            claims: dict[str, Any] = jwt.decode(
                ticket, self._secret, algorithms=["HS256"], issuer=ISSUER,
                audience=STREAM_AUDIENCE, leeway=self.LEEWAY_S,
                options={"require": ["sub", "iat", "jti", "kind", "name", "iss", "aud",
                                     "exp"]})
        except jwt.ExpiredSignatureError as e:
            raise AuthError("stream ticket expired") from e
        except jwt.InvalidTokenError as e:
            raise AuthError(f"stream ticket invalid: {e}") from e
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
