"""``obsledger probe``: a container healthcheck, of a process's heartbeat or an HTTP URL.
Added to ``api.cli``'s parser."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from infra.heartbeat import HEARTBEAT_MAX_AGE_S, check_heartbeat, heartbeat_path
from infra.settings import Settings

#: The long-running commands without HTTP that write a heartbeat for ``obsledger probe``.
HEARTBEAT_COMMANDS = ("dispatch", "project", "relay", "results", "chain", "downloader",
                      "worker")


def _probe(args: argparse.Namespace, settings: Settings) -> int:
    """A container healthcheck: exit 0 when healthy, 1 (one line saying why) when not."""
    if (args.command_name is None) == (args.url is None):
        print("name a command (" + ", ".join(HEARTBEAT_COMMANDS) + ") or give --url",
              file=sys.stderr)
        return 2
    if args.url is not None:
        return _probe_url(args.url, args.timeout)
    ok, why = check_heartbeat(heartbeat_path(settings.data_dir, args.command_name),
                              args.max_age)
    print(why if ok else f"unhealthy: {why}")
    return 0 if ok else 1


def _probe_url(url: str, timeout: float) -> int:
    import urllib.error
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy
    try:
        with opener.open(url, timeout=timeout) as r:
            status = int(r.status)
    except urllib.error.HTTPError as e:
        status = e.code
    except (OSError, ValueError) as e:  # refused, timed out, not a URL
        print(f"unhealthy: GET {url}: {e}")
        return 1
    healthy = 200 <= status < 300
    print(f"{'ok' if healthy else 'unhealthy'}: GET {url} answered {status}")
    return 0 if healthy else 1


def add_probe_command(sub: Any) -> None:
    """``probe``."""
    p = sub.add_parser("probe", help="container healthcheck: exit 0 when the process is "
                       "healthy, 1 with one line saying why not (docs/OPERATIONS.md)")
    p.add_argument("command_name", nargs="?", choices=HEARTBEAT_COMMANDS, metavar="command",
                   help="check the heartbeat of this command's process on this host "
                   "(<data_dir>/heartbeats/<command>.json): one of "
                   + ", ".join(HEARTBEAT_COMMANDS))
    p.add_argument("--url", help="instead, GET this URL (e.g. http://127.0.0.1:8000/health): "
                   "healthy when it answers 2xx")
    p.add_argument("--max-age", type=float, default=HEARTBEAT_MAX_AGE_S,
                   help="seconds after which a heartbeat is stale")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for --url")
    p.set_defaults(func=_probe)
