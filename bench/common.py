"""Shared benchmark plumbing: a throw-away PostgreSQL database, settings, server processes,
the HTTP load generator and the ``BENCH <name> <value>`` output.

Run by hand (``make bench``), never from the test suite. ``python -m bench.common noop
--port P`` serves the no-op baseline app with the same uvicorn settings as ``obsledger serve``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python -m bench.x` puts bench/, not the project, on sys.path
    sys.path.insert(0, str(ROOT))

from tests.support.processes import free_port as free_port  # noqa: E402  (bench/ servers use it too)
from tests.support.processes import stop_process, wait_for_port  # noqa: E402


# -- output ----------------------------------------------------------------------------------
def bench(name: str, value: float) -> None:
    """One result line, exactly ``BENCH <name> <value>``."""
    text = f"{value:.3f}" if isinstance(value, float) else str(value)
    print(f"BENCH {name} {text}", flush=True)


def note(message: str) -> None:
    """Context for a human reader (never starts with BENCH)."""
    print(f"# {message}", flush=True)


# -- PostgreSQL ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pg:
    host: str
    port: int
    user: str
    password: str

    def connect(self, dbname: str = "postgres") -> Any:
        import psycopg

        return psycopg.connect(host=self.host, port=self.port, user=self.user,
                               password=self.password or None, dbname=dbname,
                               autocommit=True, connect_timeout=5)


def bench_parser(description: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line: its description as written, and where PostgreSQL is."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pg_args(parser)
    return parser


def add_pg_args(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    parser.add_argument("--pg-host", default=env.get("OBSLEDGER_POSTGRES_HOST", "127.0.0.1"))
    parser.add_argument("--pg-port", type=int,
                        default=int(env.get("OBSLEDGER_POSTGRES_PORT", "5432")))
    parser.add_argument("--pg-user", default=env.get("OBSLEDGER_POSTGRES_USER", "postgres"))
    parser.add_argument("--pg-password", default=env.get("OBSLEDGER_POSTGRES_PASSWORD", ""))
    parser.add_argument("--keep-dir", action="store_true",
                        help="keep the temporary data directory (journals) for inspection")


def pg_from_args(args: argparse.Namespace) -> Pg:
    return Pg(args.pg_host, args.pg_port, args.pg_user, args.pg_password)


@contextmanager
def temp_database(pg: Pg, prefix: str) -> Iterator[str]:
    """A fresh database with a random name, dropped (with its connections) at the end."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with pg.connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    note(f"PostgreSQL {pg.host}:{pg.port} database {name}")
    try:
        yield name
    finally:
        with pg.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        note(f"dropped database {name}")


@contextmanager
def temp_dir(keep: bool = False) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="obsledger-bench-"))
    try:
        yield path
    finally:
        if keep:
            note(f"kept {path}")
        else:
            shutil.rmtree(path, ignore_errors=True)


def make_settings(pg: Pg, dbname: str, data_dir: Path, **overrides: Any) -> Any:
    from infra.settings import Settings

    values: dict[str, Any] = {
        "store": "postgres", "data_dir": data_dir, "postgres_host": pg.host,
        "postgres_port": pg.port, "postgres_user": pg.user, "postgres_password": pg.password,
        "postgres_dbname": dbname,
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def fresh_settings(args: argparse.Namespace, prefix: str, **overrides: Any) -> Iterator[Any]:
    """Settings on a fresh database (``prefix``_…) and data directory from ``add_pg_args``'
    arguments; both are removed at the end (the directory kept with ``--keep-dir``)."""
    pg = pg_from_args(args)
    with temp_database(pg, prefix) as db, temp_dir(args.keep_dir) as tmp:
        yield make_settings(pg, db, tmp, **overrides)


@dataclass(frozen=True)
class Served:
    """``obsledger serve`` on fresh settings, with an automation token for its API."""

    settings: Any
    token: str
    server: Server


@contextmanager
def served(args: argparse.Namespace, prefix: str, **overrides: Any) -> Iterator[Served]:
    """``obsledger serve`` on ``fresh_settings(args, prefix, **overrides)``, stopped at the
    end."""
    with fresh_settings(args, prefix, **overrides) as settings:
        token = service_token(settings)
        with Server.obsledger(settings) as server:
            yield Served(settings, token, server)


def settings_env(settings: Any) -> dict[str, str]:
    """The OBSLEDGER_* environment that reproduces ``settings`` in another process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OBSLEDGER_")}
    return {**env, **settings.environment(), "PYTHONPATH": str(ROOT)}


# -- servers ---------------------------------------------------------------------------------
class Server:
    """A server process on a free port: ``obsledger serve`` or the no-op app."""

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)],
                                     env=env or {**os.environ, "PYTHONPATH": str(ROOT)},
                                     cwd=ROOT, stdout=subprocess.DEVNULL)
        self._wait_ready()

    @classmethod
    def obsledger(cls, settings: Any, *extra: str) -> Server:
        return cls([sys.executable, "-m", "api.cli", "serve", "--log-level", "warning",
                    "--no-access-log", *extra], settings_env(settings))

    @classmethod
    def noop(cls, workers: int = 1) -> Server:
        return cls([sys.executable, str(Path(__file__).resolve()), "noop",
                    "--workers", str(workers)])

    def _wait_ready(self, timeout: float = 30.0) -> None:
        wait_for_port(self.port, self.proc, timeout)

    def stop(self) -> None:
        stop_process(self.proc, 30)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *_: Any) -> None:
        self.stop()


def noop_app() -> Any:
    """The baseline: an async FastAPI endpoint that does nothing but answer."""
    from fastapi import FastAPI, Response

    app = FastAPI()
    body = b'{"status":"accepted"}'

    @app.post("/noop", status_code=202)
    async def noop() -> Response:
        return Response(body, status_code=202, media_type="application/json")

    return app


def _serve_noop(argv: list[str]) -> int:
    import uvicorn

    p = argparse.ArgumentParser()
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    # Exactly how api/cli.py `serve --log-level warning --no-access-log` runs uvicorn.
    # (no trusted proxy configured: no forwarded headers middleware)
    options: dict[str, Any] = dict(host=args.host, port=args.port, log_level="warning",
                                   access_log=False, proxy_headers=False)
    if args.workers > 1:  # as `serve --workers N`: uvicorn's processes on one socket
        uvicorn.run("bench.common:noop_app", factory=True, workers=args.workers, **options)
    else:
        uvicorn.run(noop_app(), **options)
    return 0


# -- journal and dispatcher ------------------------------------------------------------------
Command = tuple[str, Any, "dict[str, Any] | None"]  # (command type, request model, path)


async def journal_commands(ledger: Any, command_type: str | None, requests: list[Any]) -> None:
    """Journal commands through the command service, as the API does (group commit), in
    order. ``requests`` are request models of ``command_type``, or, with ``command_type``
    None, ``(command type, request, path)`` triples."""
    import asyncio

    items: list[Command] = ([(command_type, r, None) for r in requests] if command_type
                            else list(requests))
    chunk = 500
    for i in range(0, len(items), chunk):
        await asyncio.gather(*(
            ledger.commands.submit(ctype, req, path=path, actor="bench",
                                   correlation_id=str(uuid.uuid4()), idempotency_key=None)
            for ctype, req, path in items[i:i + chunk]))


def drain_journal(ledger: Any, expected: int, what: str) -> float:
    """Seconds the dispatcher takes to apply everything journaled; checks all were applied."""
    t = time.perf_counter()
    ledger.dispatcher.drain(timeout=600)
    took = time.perf_counter() - t
    counts = ledger.journal.counts()
    if counts.get("applied", 0) != expected:
        raise SystemExit(f"{what}: expected {expected} applied, journal says {counts}")
    return took


# -- load generation -------------------------------------------------------------------------
_WRK_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = %s
wrk.body = %s
local non2xx = 0
response = function(status, headers, body)
  if status < 200 or status > 299 then non2xx = non2xx + 1 end
end
"""


@dataclass
class LoadResult:
    requests: int
    seconds: float
    errors: int
    tool: str

    @property
    def per_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _run_wrk(url: str, body: bytes, seconds: float, connections: int,
             authorization: str) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA % (json.dumps(authorization), json.dumps(body.decode())))
        script = f.name
    try:
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script,
             url], capture_output=True, text=True, check=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(script)
    requests = errors = 0
    duration = seconds
    for line in out.splitlines():
        parts = line.split()
        if "requests in" in line:  # "  41234 requests in 10.00s, 7.5MB read"
            requests = int(parts[0])
            duration = _wrk_seconds(parts[3].rstrip(","))
        elif line.strip().startswith("Non-2xx or 3xx responses:"):
            errors += int(parts[-1])
        elif line.strip().startswith("Socket errors:"):
            errors += sum(int(x.rstrip(",")) for x in parts[3::2])
    return LoadResult(requests, duration, errors, f"wrk -t1 -c{connections}")


def _wrk_seconds(text: str) -> float:
    for suffix, factor in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


async def _aiohttp_load(url: str, body: bytes, seconds: float, connections: int,
                        authorization: str) -> list[int]:
    import aiohttp

    counts = [0, 0]
    stop_at = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json", "Authorization": authorization}
    conn = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def worker() -> None:
            while time.perf_counter() < stop_at:
                async with session.post(url, data=body, headers=headers) as r:
                    await r.read()
                    counts[0 if 200 <= r.status < 300 else 1] += 1

        await __import__("asyncio").gather(*(worker() for _ in range(connections)))
    return counts


def _run_aiohttp(url: str, body: bytes, seconds: float, connections: int,
                 authorization: str) -> LoadResult:
    """The fallback client, in its own process so it never shares the server's GIL."""
    args = ", ".join(repr(a) for a in (url, body, seconds, connections, authorization))
    code = (
        f"import sys, json, asyncio, time; sys.path.insert(0, {str(ROOT)!r});"
        f"from bench import common; t=time.perf_counter();"
        f"c=asyncio.run(common._aiohttp_load({args}));"
        "print(json.dumps([c[0], c[1], time.perf_counter()-t]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=seconds + 60).stdout
    ok, bad, took = json.loads(out.strip().splitlines()[-1])
    return LoadResult(ok + bad, took, bad, f"aiohttp (1 process) -c{connections}")


async def _aiohttp_steady(url: str, body: bytes, rate: int, seconds: float,
                          authorization: str) -> list[float]:
    """Open loop: request i is sent at ``i / rate`` s whatever the answers before it; its
    latency counts from that scheduled time (a late send is the server's delay too)."""
    import asyncio

    import aiohttp

    latencies: list[float] = []
    failures = [0]
    headers = {"Content-Type": "application/json", "Authorization": authorization}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        async def one(due: float) -> None:
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if not 200 <= r.status < 300:
                    failures[0] += 1
            latencies.append((time.perf_counter() - due) * 1000)

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * seconds)):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.ensure_future(one(due)))
        await asyncio.gather(*tasks)
    if failures[0]:
        raise SystemExit(f"steady load: {failures[0]} failed requests")
    return latencies


def steady_load(url: str, body: bytes, rate: int, seconds: float, token: str) -> list[float]:
    """Milliseconds per request at a steady ``rate`` (aiohttp in its own process)."""
    args = ", ".join(repr(a) for a in (url, body, rate, seconds, f"Bearer {token}"))
    code = (
        f"import sys, json, asyncio; sys.path.insert(0, {str(ROOT)!r});"
        f"from bench import common;"
        f"print(json.dumps(asyncio.run(common._aiohttp_steady({args}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=seconds + 120).stdout
    latencies: list[float] = json.loads(out.strip().splitlines()[-1])
    return latencies


def http_load(url: str, body: bytes, seconds: float, connections: int,
              client: str = "auto", token: str = "") -> LoadResult:
    """Requests per second sustained against ``url`` by POSTing ``body`` (with ``token`` as
    the bearer token; the no-op baseline ignores it)."""
    authorization = f"Bearer {token}"
    if client == "wrk" or (client == "auto" and shutil.which("wrk")):
        return _run_wrk(url, body, seconds, connections, authorization)
    return _run_aiohttp(url, body, seconds, connections, authorization)


def service_token(settings: Any, name: str = "bench-automation") -> str:
    """An API token of a service account with the automation role, in ``settings``' store."""
    from infra.accounts import issue_service_token

    settings.prepare_dirs()
    return issue_service_token(settings.read_model_database_url, settings.signing_secret(),
                               name, ["automation", "viewer"], token_name="bench",
                               created_by="bench")


def add_load_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--client", choices=["auto", "wrk", "aiohttp"], default="auto",
                        help="HTTP load generator (auto: wrk when installed, else aiohttp)")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=int, default=8,
                        help="seconds of load per HTTP measurement (after a warm-up)")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "noop":
        sys.exit(_serve_noop(sys.argv[2:]))
    sys.exit("usage: python -m bench.common noop --port PORT")
