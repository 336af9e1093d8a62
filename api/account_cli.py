"""``obsledger service-token``: an API token for a service account, issued straight in the
accounts database. Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from api.cli_common import cli_actor
from infra.settings import Settings


def _service_token(args: argparse.Namespace, settings: Settings) -> int:
    """Issue an API token for a service account straight in the accounts database (for
    provisioning telescope automation without an admin token)."""
    from infra.accounts import AccountExists, issue_service_token

    settings.prepare_dirs()
    try:
        token = issue_service_token(settings.read_model_database_url,
                                    settings.signing_secret(), args.name, args.role,
                                    token_name=args.token_name, created_by=cli_actor(),
                                    cache=settings.accounts_cache_file, same_roles=True)
    except AccountExists as e:
        print(e, file=sys.stderr)
        return 1
    print(token)
    return 0


def add_service_token_command(sub: Any) -> None:
    """``service-token``."""
    p = sub.add_parser("service-token", help="issue an API token for a service account "
                       "(created with the --role roles if missing) and print it")
    p.add_argument("name", help="service account name, e.g. telescope-automation")
    p.add_argument("--role", action="append", required=True,
                   choices=["automation", "operator", "viewer", "auditor", "admin"],
                   help="a role of the account (repeat for more); an existing account must "
                   "have exactly these roles")
    p.add_argument("--token-name", default="cli", help="what the token is for")
    p.set_defaults(func=_service_token)
