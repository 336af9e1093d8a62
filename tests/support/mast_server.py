"""A local stand-in for MAST's download service: real HTTP (aiohttp) with Range support, in a
thread of the test process, serving registered files and injecting faults on command.

``server.files[name] = bytes`` serves ``/api/v0.1/Download/file?uri=mast:…/<name>``;
``server.faults[name]`` (a dict) changes how the next answers for ``name`` behave:

- ``fail``: n, ``fail_status``: code — the next n requests get that status (5xx storm);
- ``ignore_range``: True — answer 200 with the whole body whatever the Range;
- ``ignore_range_after``: n — honour the next n Range requests, then answer 200 to every one
  (a server behind a cache or proxy that drops Range part-way);
- ``no_length``: True — no Content-Length (chunked transfer encoding);
- ``truncate``: n, ``cut_at``: bytes — the next n bodies stop after ``cut_at`` bytes, the
  connection closed cleanly (a truncated body);
- ``reset``: n, ``cut_at`` — the same with a TCP reset (SO_LINGER 0) mid-body;
- ``delay``: seconds slept after each 64 KB block (slow link);
- ``redirect``: a URL — every request is answered ``302 Found`` with that ``Location``.

``sent[name]`` counts body bytes written; ``requests`` logs (name, Range, status); ``peak[name]``
is the most answers for ``name`` written at once (parallel Range requests).

It also answers MAST's portal API (``POST /api/v0/invoke`` and the columns config) from the
real MAST answers astroquery ships in its test data: ``Mast.Name.Lookup`` with the entries of
``resolver.json`` for the name asked (none for a name MAST does not know), the CAOM services
with their recorded answers. ``invoked`` logs each portal request (service, params).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import struct
import threading
import time
from email.utils import formatdate
from pathlib import Path
from typing import Any

import astroquery
from aiohttp import web

BLOCK = 64 * 1024
MAST_DATA = Path(astroquery.__file__).parent / "mast" / "tests" / "data"
PORTAL_ANSWERS = {"Mast.Caom.Cone": "caom.json", "Mast.Caom.Filtered": "advSearch.json",
                  "Mast.Caom.Filtered.Position": "advSearchPos.json",
                  "Mast.Caom.Products": "products.json"}


def name_lookup_answer(name: str) -> bytes:
    """MAST's ``Mast.Name.Lookup`` answer for ``name``: the recorded resolver entries whose
    search string is the name (MAST matches it lower-cased), in MAST's order."""
    recorded = json.loads((MAST_DATA / "resolver.json").read_text())["resolvedCoordinate"]
    found = [e for e in recorded if e["searchString"] == name.strip().lower()]
    return json.dumps({"resolvedCoordinate": found, "status": ""}).encode()


def portal_answer(service: str, params: dict[str, Any]) -> bytes:
    if service == "Mast.Name.Lookup":
        return name_lookup_answer(str(params.get("input", "")))
    return (MAST_DATA / PORTAL_ANSWERS[service]).read_bytes()


class MastTestServer:
    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, dict[str, Any]] = {}
        self.modified: dict[str, float] = {}
        self.sent: dict[str, int] = {}
        self.serving: dict[str, int] = {}  # answers being written, per file
        self.peak: dict[str, int] = {}  # most answers written at once, per file
        self.requests: list[tuple[str, str | None, int]] = []
        self.invoked: list[tuple[str, dict[str, Any]]] = []  # portal (service, params)
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, name: str, data: bytes, modified: float = 1_700_000_000.0) -> None:
        self.files[name] = data
        self.modified[name] = modified

    def served_from(self, name: str) -> list[int]:
        """The first byte of each answered request for ``name``."""
        out = []
        for n, rng, status in self.requests:
            if n == name and status in (200, 206):
                m = re.match(r"bytes=(\d+)-", rng or "")
                out.append(int(m.group(1)) if m and status == 206 else 0)
        return out

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application()
            app.router.add_get("/api/v0.1/Download/file", self._download)
            app.router.add_post("/api/v0/invoke", self._invoke)
            app.router.add_post("/portal/Mashup/Mashup.asmx/columnsconfig",
                                self._columns_config)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="mast-test-server", daemon=True)
        self._thread.start()
        ready.wait(10)

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    # -- the portal API --------------------------------------------------------------------
    async def _invoke(self, request: web.Request) -> web.Response:
        form = await request.post()
        mashup = json.loads(str(form["request"]))
        service, params = str(mashup["service"]), dict(mashup.get("params") or {})
        self.invoked.append((service, params))
        if service != "Mast.Name.Lookup" and service not in PORTAL_ANSWERS:
            return web.json_response({"status": "ERROR", "msg": f"unknown service {service}"})
        return web.Response(body=portal_answer(service, params),
                            content_type="application/json")

    async def _columns_config(self, request: web.Request) -> web.Response:
        return web.Response(body=(MAST_DATA / "columnsconfig.json").read_bytes(),
                            content_type="application/json")

    # -- the download service --------------------------------------------------------------
    def wait_idle(self, name: str, timeout: float = 10.0) -> None:
        """Wait until no answer for ``name`` is being written: the answer to a client that
        was killed goes on until a write fails, and its last blocks still count in ``sent``."""
        deadline = time.monotonic() + timeout
        while self.serving.get(name, 0) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not self.serving.get(name, 0), f"{name} is still being served"

    async def _download(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("uri", "").rsplit("/", 1)[-1]
        self.serving[name] = self.serving.get(name, 0) + 1
        self.peak[name] = max(self.peak.get(name, 0), self.serving[name])
        try:
            return await self._answer(request)
        finally:
            self.serving[name] -= 1

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        uri = request.query.get("uri", "")
        name = uri.rsplit("/", 1)[-1]
        rng = request.headers.get("Range")
        data = self.files.get(name)
        if data is None:
            self.requests.append((name, rng, 404))
            return web.Response(status=404, text=f"no such product: {uri}")
        f = self.faults.setdefault(name, {})
        if f.get("redirect"):
            self.requests.append((name, rng, 302))
            return web.Response(status=302, headers={"Location": str(f["redirect"])})
        if f.get("fail", 0) > 0:
            f["fail"] -= 1
            status = int(f.get("fail_status", 503))
            self.requests.append((name, rng, status))
            return web.Response(status=status, text="storm")
        headers = {"ETag": '"' + hashlib.sha1(data).hexdigest()[:16] + '"',
                   "Last-Modified": formatdate(self.modified[name], usegmt=True),
                   "Accept-Ranges": "bytes"}
        start, end, status = 0, len(data) - 1, 200
        m = re.match(r"^bytes=(\d+)-(\d*)$", rng or "")
        if m and f.get("ignore_range_after") is not None:  # Range honoured n times, then not
            f["ignore_range"] = f["ignore_range_after"] <= 0
            f["ignore_range_after"] -= 1
        if m and not f.get("ignore_range"):
            start = int(m.group(1))
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            if start >= len(data):
                self.requests.append((name, rng, 416))
                return web.Response(status=416, headers={
                    **headers, "Content-Range": f"bytes */{len(data)}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        self.requests.append((name, rng, status))
        body = data[start:end + 1]
        resp = web.StreamResponse(status=status, headers=headers)
        if f.get("no_length"):
            resp.enable_chunked_encoding()
        else:
            resp.content_length = len(body)
        await resp.prepare(request)
        cut: int | None = None
        mode = None
        for fault in ("truncate", "reset"):
            if f.get(fault, 0) > 0:
                f[fault] -= 1
                cut, mode = int(f.get("cut_at", len(body) // 2)), fault
                break
        pos = 0
        while pos < len(body):
            block = body[pos:pos + BLOCK]
            if cut is not None and pos + len(block) > cut:
                block = block[:max(cut - pos, 0)]
                if block:
                    await resp.write(block)
                    self.sent[name] = self.sent.get(name, 0) + len(block)
                await asyncio.sleep(0.01)
                transport = request.transport
                if transport is not None:
                    if mode == "reset":
                        sock = transport.get_extra_info("socket")
                        if sock is not None:
                            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                            struct.pack("ii", 1, 0))
                    transport.close()
                return resp
            await resp.write(block)
            self.sent[name] = self.sent.get(name, 0) + len(block)
            pos += len(block)
            if f.get("delay"):
                await asyncio.sleep(float(f["delay"]))
        await resp.write_eof()
        return resp
