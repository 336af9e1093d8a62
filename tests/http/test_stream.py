"""The live stream (``GET /stream``) over a real HTTP server, on SQLite and PostgreSQL: a
command's messages arrive within a second of its 202, a client resuming with
``Last-Event-ID`` gets every change after it exactly once (from the recent window or from
the log itself), browsers authenticate with the stream ticket cookie, and the downloader's
live progress is on the stream and in ``GET /mast/download/progress/{id}``."""

from __future__ import annotations

import itertools
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import queries.stream
from api.app import create_app
from infra.settings import Settings
from tests.conftest import grant
from tests.http.test_mast_downloads import download_settings, product
from tests.support.live_server import Event, LiveServer, StreamReader
from tests.support.mast_server import MastTestServer

SLOW_SIZE = 5 * 1024 * 1024  # at ~1.3 MB/s (a 50-ms pause every 64 KB): about 4 s


@pytest.fixture
def server(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(create_app(settings)) as s:
        yield s


def _start(url: str, auth: dict[str, str], key: str) -> tuple[float, dict[str, Any]]:
    r = httpx.post(f"{url}/executed_obs_units/start", headers={**auth, "Idempotency-Key": key},
                   json={"obs_unit_id": f"OU-{key}", "instrument": "HARPS"})
    assert r.status_code == 202, r.text
    return time.monotonic(), r.json()


def _changes_of(stream: StreamReader, commands: set[str], timeout: float) -> list[Event]:
    """Every message until a change of each of ``commands`` has arrived."""
    seen: list[Event] = []
    missing = set(commands)

    def done(e: Event) -> bool:
        if e.event == "change":
            missing.discard(e.data.get("command_id"))
        return not missing

    seen.extend(stream.until(done, timeout))
    return seen


def test_a_command_is_on_the_stream_within_a_second_of_its_202(
        server: LiveServer, settings: Settings) -> None:
    auth = grant(settings)
    with StreamReader(f"{server.url}/stream", auth) as stream:
        assert stream.status == 200
        key = f"ack-{uuid.uuid4().hex[:8]}"
        acked, body = _start(server.url, auth, key)
        execution = body["ids"]["executed_obs_unit_id"]
        events = list(stream.until(
            lambda e: e.event == "change" and e.data["command_id"] == key, 1.0))
    pending = next(e for e in events if e.event == "command")
    assert pending.id is None  # live-only: no log position
    assert pending.data["command_id"] == key and pending.data["pending"] is True
    assert pending.data["status"] == "accepted"
    [row] = pending.data["rows"]["executed_obs_unit"]
    assert row["id"] == execution and row["pending"] is True and row["status"] == "running"
    change = events[-1]
    assert change.at - acked < 1.0
    assert change.id == str(change.data["position"])
    [c] = change.data["changes"]
    assert c["read_model"] == "executed_obs_units" and c["op"] == "insert"
    assert c["id"] == execution and c["values"]["obs_unit_id"] == f"OU-{key}"
    # ... and once the read models show it, the command again: applied, with its position
    with StreamReader(f"{server.url}/stream", auth,
                      {"after": change.data["position"] - 1}) as again:
        list(again.until(lambda e: e.event == "change", 2.0))


def test_the_command_comes_again_when_applied(server: LiveServer, settings: Settings) -> None:
    auth = grant(settings)
    # from the log's start: "from now on" begins when the server has subscribed, which may
    # be after the 200's head reached the client (a loaded machine)
    with StreamReader(f"{server.url}/stream", auth, params={"after": 0}) as stream:
        key = f"applied-{uuid.uuid4().hex[:8]}"
        _start(server.url, auth, key)
        events = list(stream.until(lambda e: e.event == "command" and e.data["command_id"] == key
                                   and e.data["status"] == "applied", 3.0))
    change = next(e for e in events if e.event == "change" and e.data["command_id"] == key)
    applied = events[-1]
    assert applied.data["pending"] is False
    assert applied.data["position"] >= change.data["position"]  # (its receipt follows)
    assert events.index(change) < len(events) - 1  # the change first, then "applied"


@pytest.mark.parametrize("window", [queries.stream.WINDOW, 3])
def test_resuming_with_last_event_id_loses_nothing(
        server: LiveServer, settings: Settings, window: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Disconnected while commands go on: the reconnection gets every change after its
    Last-Event-ID exactly once, in log order — from the window of recent messages, or
    (window of 3) from the log itself."""
    monkeypatch.setattr(queries.stream, "WINDOW", window)
    auth = grant(settings)
    with StreamReader(f"{server.url}/stream", auth) as stream:
        first = f"before-{uuid.uuid4().hex[:8]}"
        _start(server.url, auth, first)
        last = _changes_of(stream, {first}, 3.0)[-1]
    keys = set()
    for i in range(20):  # while nobody listens
        key = f"gap-{i}-{uuid.uuid4().hex[:6]}"
        keys.add(key)
        _start(server.url, auth, key)
    files = [{"name": f"frame-{uuid.uuid4().hex[:8]}-{i}.fits", "instrument": "HARPS",
              "relative_path": f"night/frame-{i}.fits", "size": 1000 + i,
              "checksum": {"algorithm": "sha256", "value": "0" * 64},
              "file_type": "science", "created_at": "2026-12-04T01:00:00Z"} for i in range(30)]
    r = httpx.post(f"{server.url}/raw_data_files/bulk", headers={**auth, "Idempotency-Key":
                   f"bulk-{uuid.uuid4().hex[:8]}"}, json={"files": files})
    assert r.status_code == 202, r.text
    keys.add(r.json()["command_id"])
    ledger = server.app.state.ledger
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (
            any(ledger.journal.get(k).status != "applied" for k in keys)
            or ledger.feed.position < ledger.store.max_position()):
        time.sleep(0.05)  # everything applied and streamed (the window trimmed) first
    expected = [n.id for n in ledger.store.select_notifications(int(str(last.id)), 10_000)
                if ledger.projector.handles(n.topic)]
    with StreamReader(f"{server.url}/stream", {**auth, "Last-Event-ID": str(last.id)}) as again:
        resumed = list(again.until(lambda e: e.id == str(expected[-1]), 5.0))
    positions = [int(e.id) for e in resumed if e.event == "change" and e.data.get("changes")]
    assert {e.data["command_id"] for e in resumed if e.event == "change"} == keys
    assert positions == expected  # every change after Last-Event-ID, once, in order
    assert len(positions) == 20 + 30
    registered = {c["values"]["name"] for e in resumed if e.event == "change"
                  for c in e.data["changes"] if c["read_model"] == "raw_data_files"}
    assert registered == {f["name"] for f in files}


def test_browsers_use_the_stream_ticket_cookie(server: LiveServer, settings: Settings) -> None:
    viewer = grant(settings, "night-viewer", ("viewer",), kind="user")
    assert httpx.get(f"{server.url}/stream").status_code == 401
    with httpx.Client(base_url=server.url) as browser:
        r = browser.post("/stream/session", headers=viewer)
        assert r.status_code == 200, r.text
        assert 0 < r.json()["expires_in"] <= 600
        cookie = r.headers["set-cookie"]
        assert "HttpOnly" in cookie and "Path=/stream" in cookie
        assert "samesite=strict" in cookie.lower()
        ticket = browser.cookies["obsledger_stream"]
        with browser.stream("GET", "/stream") as s:  # the cookie alone
            assert s.status_code == 200
            assert s.headers["content-type"].startswith("text/event-stream")
        # a ticket is no bearer token, and a bad one is refused
        assert browser.get("/auth/me", headers={"Authorization": f"Bearer {ticket}"}
                           ).status_code == 401
    bad = httpx.get(f"{server.url}/stream", cookies={"obsledger_stream": ticket[:-4] + "AAAA"})
    assert bad.status_code == 401 and bad.json()["status_code"] == 401
    # a token in the URL is not a way in
    token = viewer["Authorization"].split()[1]
    assert httpx.get(f"{server.url}/stream", params={"access_token": token}).status_code == 401
    r = httpx.get(f"{server.url}/stream", headers={**viewer, "Last-Event-ID": "yesterday"})
    assert r.status_code == 422 and r.json()["errors"][0]["field"] == "Last-Event-ID"


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_an_account_holds_at_most_its_share_of_streams(settings: Settings) -> None:
    """Beyond ``stream_connections_per_account`` open streams an account gets 429 with
    Retry-After in the error format; a stream whose client went away gives its slot back,
    and other accounts are not affected."""
    limited = settings.model_copy(update={"stream_connections_per_account": 2})
    with LiveServer(create_app(limited)) as server:
        dashboard, other = grant(limited, "night-wall"), grant(limited, "control-room")
        url = f"{server.url}/stream"
        first, second = _open_stream(server.url, dashboard), _open_stream(server.url, dashboard)
        refused = httpx.get(url, headers=dashboard, timeout=10)
        assert refused.status_code == 429, refused.text
        assert refused.headers["Retry-After"] == "5"
        body = refused.json()
        assert body["status_code"] == 429 and body["errors"][0]["field"] == "stream"
        elsewhere = _open_stream(server.url, other)
        first.close()  # the wall display was switched off
        deadline = time.monotonic() + 10
        while True:  # the server notices the closed connection at once (http.disconnect)
            again = _open_stream(server.url, dashboard, expect=None)
            if again is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert again is not None, "the closed stream's slot was not given back"
        for s in (second, elsewhere, again):
            s.close()


def _open_stream(base: str, auth: dict[str, str],
                 expect: int | None = 200) -> socket.socket | None:
    """A ``GET /stream`` left open on a plain socket (closed by the caller): the socket once
    the answer's head is 200, else None (or AssertionError when ``expect`` is 200)."""
    host, port = httpx.URL(base).host, httpx.URL(base).port
    sock = socket.create_connection((host, port), timeout=10)
    sock.sendall(f"GET /stream HTTP/1.1\r\nHost: {host}\r\nAuthorization: "
                 f"{auth['Authorization']}\r\nAccept: text/event-stream\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        assert chunk, head
        head += chunk
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        return sock
    sock.close()
    assert expect is None, head
    return None


@pytest.mark.parametrize("store_kind", ["sqlite"])
def test_live_download_progress_on_the_stream_and_the_progress_query(
        tmp_path: Path, store_kind: str) -> None:
    mast = MastTestServer()
    mast.add("slow.bin", b"\x17" * SLOW_SIZE)
    mast.faults["slow.bin"] = {"delay": 0.05}
    mast.start()
    settings = download_settings(tmp_path, store_kind, None, mast,
                                 download_checkpoint_chunks=10_000,
                                 download_checkpoint_s=60.0,
                                 download_connections_per_file=1)  # ~4 s, not ~1
    auth = grant(settings)
    try:
        with LiveServer(create_app(settings)) as server, \
                StreamReader(f"{server.url}/stream", auth) as stream:
            r = httpx.post(f"{server.url}/mast/download/start-chunked", headers=auth, json={
                "products": [product("slow.bin", SLOW_SIZE)],
                "destination": "night/live", "register_files": False})
            assert r.status_code == 202, r.text
            job = r.json()["ids"]["download_job_id"]
            progress = [e for e in stream.until(
                lambda e: e.event == "download_progress" and e.data["id"] == job
                and 0 < e.data["bytes_done"] < SLOW_SIZE and e.data["bytes_per_s"], 10)
                if e.event == "download_progress" and e.data["id"] == job]
            live = progress[-1].data
            assert progress[-1].id is None
            assert live["bytes_total"] == SLOW_SIZE and live["eta_s"] > 0
            # the query shows the same live figures, ahead of the (single) checkpoint
            body = httpx.get(f"{server.url}/mast/download/progress/{job}", headers=auth).json()
            assert body["live"] is True and body["status"] == "running"
            assert body["bytes_done"] >= live["bytes_done"] > 0
            assert body["files"][0]["live"] is True and body["files"][0]["bytes_per_s"] > 0
            assert body["eta_s"] is not None
            ledger = server.app.state.ledger
            checkpoints = ledger.store.topics_since(uuid.UUID(job), 0)
            assert not [t for _, t in checkpoints if t.endswith(".Checkpointed")]
            # at least every second while it runs, the bytes moving each time
            ticks = [progress[-1]]
            for _ in range(2):
                ticks.append(list(stream.until(lambda e: e.event == "download_progress"
                                               and e.data["id"] == job, 1.5))[-1])
            gaps = [b.at - a.at for a, b in itertools.pairwise(ticks)]
            assert all(g < 1.5 for g in gaps), gaps
            done = [t.data["bytes_done"] for t in ticks]
            assert done == sorted(done) and done[-1] > done[0], done
    finally:
        mast.stop()
