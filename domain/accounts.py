"""Who may do what: the roles of the people and services that reach obsledger, and the
principal a request acts as (recorded as the actor of every event it causes)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal
from uuid import UUID


class Role(StrEnum):
    automation = "automation"
    operator = "operator"
    viewer = "viewer"
    auditor = "auditor"
    admin = "admin"


ROLE_DESCRIPTIONS: dict[str, str] = {
    Role.automation: "Telescope automation: the critical operations (start and finish executed "
    "obs units, register files, build packages, request staging, report results).",
    Role.operator: "Operators: every command, including pause, resume and cancel.",
    Role.viewer: "Dashboards: queries only.",
    Role.auditor: "Auditors: the audit endpoints (event replay, request audit log).",
    Role.admin: "Administrators: accounts and service tokens.",
}

# What each kind of endpoint accepts (any one of the roles).
CRITICAL_WRITERS = frozenset({Role.automation, Role.operator})
OPERATORS = frozenset({Role.operator})
READERS = frozenset(Role)
AUDITORS = frozenset({Role.auditor})
ADMINS = frozenset({Role.admin})

AccountKind = Literal["user", "service"]
USERNAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$"
_USERNAME = re.compile(USERNAME_PATTERN)
MIN_PASSWORD_LENGTH = 12


def valid_username(name: str) -> bool:
    return bool(_USERNAME.match(name))


@dataclass(frozen=True, slots=True)
class Principal:
    """The authenticated account a request acts as."""

    account_id: UUID
    name: str
    kind: AccountKind
    roles: frozenset[str]
    token_id: str | None = None  # the service token used, or the user token's id

    @property
    def actor(self) -> str:
        """How events record this principal: ``alice``, or ``service:telescope-1``."""
        return self.name if self.kind == "user" else f"service:{self.name}"

    def may(self, allowed: frozenset[str]) -> bool:
        return not self.roles.isdisjoint(allowed)
