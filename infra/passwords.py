"""Passwords and the signing secret: the one strength rule (:func:`password_problem`,
zxcvbn's estimate, with the username as a word an attacker would try first), argon2id hashes
(:class:`Passwords`), the development secret, and files only their owner may read.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from zxcvbn import zxcvbn

from domain.accounts import MIN_PASSWORD_LENGTH

DEV_SECRET_FILE = "jwt-secret"

#: zxcvbn's score (0-4) a password must reach; it reads at most the first 72 characters.
MIN_PASSWORD_SCORE = 3
ZXCVBN_MAX_LENGTH = 72
#: The JWT secret: at least this many characters and 10**this many guesses (~80 bits).
MIN_SECRET_LENGTH = 32
MIN_SECRET_GUESSES_LOG10 = 24.0


def password_problem(password: str, username: str | None = None) -> str | None:
    """Why ``password`` is too weak (None: strong enough) — the one rule of every password
    (registration, password change, ``OBSLEDGER_ADMIN_PASSWORD``): at least
    ``MIN_PASSWORD_LENGTH`` characters and a zxcvbn score of at least ``MIN_PASSWORD_SCORE``,
    the username counting as a word an attacker tries first."""
    if len(password) < MIN_PASSWORD_LENGTH:
        return f"must be at least {MIN_PASSWORD_LENGTH} characters"
    if username and password.strip().lower() == username.strip().lower():
        return "must not be the username"
    estimate = zxcvbn(password[:ZXCVBN_MAX_LENGTH], user_inputs=[username] if username else [])
    if estimate["score"] >= MIN_PASSWORD_SCORE:
        return None
    feedback = estimate["feedback"]
    hints = [feedback.get("warning") or "", *feedback.get("suggestions", ())]
    hint = " ".join(h for h in hints if h) or "use a longer passphrase of unrelated words"
    return f"too easy to guess: {hint}"


def secret_problem(secret: str) -> str | None:
    """Why a JWT signing secret is too weak (None: strong enough)."""
    if len(secret) < MIN_SECRET_LENGTH:
        return f"must be at least {MIN_SECRET_LENGTH} characters"
    guesses = zxcvbn(secret[:ZXCVBN_MAX_LENGTH])["guesses_log10"]
    if guesses < MIN_SECRET_GUESSES_LOG10:
        return ("is too easy to guess (repeated, sequential or dictionary text): use a random "
                "one, e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(48))'")
    return None


def write_private(path: Path, text: str) -> None:
    """Write ``path`` as a new file created with mode 0600 (never readable by others, not even
    for a moment), replacing any earlier one atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def development_secret(data_dir: Path) -> str:
    """The development signing secret: random, made once, kept in ``<data_dir>/jwt-secret``."""
    path = data_dir / DEV_SECRET_FILE
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
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
