"""``obsledger serve``: the HTTP API (with the dispatcher, projector and other workers
inside unless told not to). Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Any

from api.cli_common import positive_int
from infra.settings import Settings


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from api.app import create_app

    problem = _port_problem(args.host, args.port)
    if problem is not None:  # before anything is created (accounts, journal, stores)
        print(f"obsledger serve: {problem}", file=sys.stderr)
        return 2
    if args.no_workers:
        settings = settings.model_copy(update={"embedded_workers": False})
    # X-Forwarded-For/-Proto only from the configured proxies (uvicorn would believe any
    # process on 127.0.0.1 by default): the client address of rate limits and the audit log
    proxies = settings.trusted_proxies
    # uvicorn's loggers reach the root handler: the same JSON lines as everything else
    options: dict[str, Any] = dict(
        host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
        log_config=None, proxy_headers=bool(proxies), forwarded_allow_ips=proxies or [])
    if args.workers > 1:
        # N processes on one socket (uvicorn restarts one that dies), each with its own
        # journal slot; they read these settings from the environment (api/scaleout.py)
        settings = settings.model_copy(update={"journal_slots": True})
        os.environ.update(settings.environment())
        print(f"obsledger: {settings.store} event store, {args.workers} API processes on "
              f"http://{args.host}:{args.port} (docs at /docs)", flush=True)
        uvicorn.run("api.scaleout:worker_app", factory=True, workers=args.workers,
                    **options)
        return 0
    app = create_app(settings)
    print(f"obsledger: {settings.store} event store, API on http://{args.host}:{args.port} "
          f"(docs at /docs)", flush=True)
    uvicorn.run(app, **options)
    return 0


def _port_problem(host: str, port: int) -> str | None:
    """Why the API could not listen on ``host:port`` (in use, not an address here), or None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OverflowError) as e:
        return f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as e:
            why = "the port is already in use" if e.errno in (98, 48) else e.strerror
            return f"cannot listen on {host}:{port}: {why}"
    return None


def add_serve_command(sub: Any) -> None:
    """``serve``."""
    p = sub.add_parser("serve", help="run the HTTP API (with the dispatcher and projector "
                       "inside, unless OBSLEDGER_EMBEDDED_WORKERS=false or --no-workers)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: %(default)s; 0.0.0.0 for every one)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: %(default)s)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn's log level (default: %(default)s)")
    p.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="log every HTTP request (default: on)")
    p.add_argument("--no-workers", action="store_true",
                   help="no dispatcher, projector or other worker inside the API: they run "
                   "as their own processes")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="API processes on the one port (default: %(default)s); more than "
                   "one: each has its own journal slot and one leads the single workers "
                   "(docs/OPERATIONS.md)")
    p.set_defaults(func=_serve)
