"""The dashboard in a real browser: Debian's headless Chromium (``make chromium``) driven by
Playwright for Python (``executable_path``: no browser is downloaded), against the API on a
real HTTP server with its embedded dispatcher, projector and downloader, and the local MAST
stand-in. Without Chromium the test skips — and fails with OBSLEDGER_REQUIRE_SERVICES=1."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.app import create_app
from api.dashboard.models import NightSummary
from tests.conftest import REQUIRE_SERVICES, grant
from tests.http.test_mast_downloads import download_settings, product
from tests.support.live_server import LiveServer
from tests.support.mast_server import MastTestServer

VIEWER = "night-watch"
VIEWER_PASSWORD = "amber telescope dome shutter 4412"
FILE = "slow-frame.bin"


def chromium() -> str:
    """Debian's chromium: skipped without it, failed in CI (OBSLEDGER_REQUIRE_SERVICES=1)."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        msg = "Debian's chromium is not installed (make chromium)"
        if REQUIRE_SERVICES:
            pytest.fail(msg + " and OBSLEDGER_REQUIRE_SERVICES=1")
        pytest.skip(msg)
    return path


@pytest.fixture
def slow_mast() -> Iterator[MastTestServer]:
    s = MastTestServer()
    s.add(FILE, os.urandom(3 * 1024 * 1024))
    s.faults[FILE] = {"delay": 0.06}  # ~1 MB/s: the bar moves for about 3 s
    s.start()
    yield s
    s.stop()


def _viewer(url: str, admin_password: str) -> None:
    """A person with the viewer role only, registered by the admin (POST /auth/register)."""
    token = httpx.post(f"{url}/auth/token", data={
        "username": "admin", "password": admin_password}).json()["access_token"]
    r = httpx.post(f"{url}/auth/register", json={
        "username": VIEWER, "password": VIEWER_PASSWORD, "roles": ["viewer"]},
        headers={"Authorization": f"Bearer {token}"})
    assert r.status_code in (200, 201), r.text


@contextmanager
def _projector_held(projector: Any) -> Iterator[None]:
    """The embedded projector waits (between batches) until the block ends: what is
    accepted meanwhile is in the journal, not yet in the read models."""
    go = threading.Event()
    project_once = projector.project_once

    def held() -> Any:
        go.wait(10)
        return project_once()

    projector.project_once = held
    try:
        yield
    finally:
        go.set()
        projector.project_once = project_once


#: The panels' counts boxes (filled with counts, or "none yet") and the system figures.
COUNTS = ("exec-counts", "pkg-counts", "stg-counts", "job-counts", "res-fulfillment",
          "res-products")


def _every_panel_drawn(page: Any) -> None:
    """Every panel the issue lists has been drawn from the summary, /health and the stream:
    counts, the files-per-minute chart (uPlot's canvas), the system figures."""
    for box in COUNTS:
        page.wait_for_selector(f"#{box} .count", timeout=5_000)
    page.wait_for_selector("#files-chart canvas", timeout=5_000)
    page.wait_for_function(
        "() => !['?', ''].includes(document.getElementById('sys-depth').textContent)",
        timeout=5_000)
    figures = {f: page.text_content(f"#sys-{f}") or "" for f in (
        "store", "models", "depth", "oldest", "projection", "relay", "position")}
    assert figures["store"].startswith("reachable (sqlite"), figures
    assert figures["models"] == "available", figures
    assert figures["depth"].isdigit() and figures["position"].isdigit(), figures
    assert figures["oldest"] and figures["oldest"] != "?", figures
    assert re.fullmatch(r"\d+ events", figures["projection"]), figures
    assert figures["relay"] == "no relay (Kafka not configured)", figures
    for card in ("executions", "files", "packages", "staging", "downloads", "processing",
                 "results", "system", "activity"):
        assert page.is_visible(f"#{card}"), card


def test_the_night_live_in_a_real_browser(tmp_path: Path, slow_mast: MastTestServer) -> None:
    executable = chromium()
    from playwright.sync_api import sync_playwright

    # checkpoints far apart: the bar can only move with the downloader's live progress
    settings = download_settings(tmp_path, "sqlite", None, slow_mast,
                                 download_checkpoint_chunks=10_000, download_checkpoint_s=60.0,
                                 download_connections_per_file=1)  # the bar moves ~3 s
    automation = grant(settings)
    with LiveServer(create_app(settings)) as server:
        _viewer(server.url, (settings.data_dir / "admin-password").read_text().strip())
        requested: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.on("request", lambda r: requested.append(r.url))
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"{server.url}/")
                assert page.url == f"{server.url}/dashboard"
                page.fill("input[name=username]", VIEWER)
                page.fill("input[name=password]", VIEWER_PASSWORD)
                page.click("#sign-in button[type=submit]")
                page.wait_for_selector("body[data-ready=true]", timeout=10_000)
                page.wait_for_selector("#stream-state.ok", timeout=5_000)
                _every_panel_drawn(page)

                # a command sent over HTTP appears on the page within 2 s of its 202, marked
                # pending while the read models do not show it (the projector held)
                key = f"browser-{uuid.uuid4().hex[:8]}"
                with _projector_held(server.app.state.ledger.projector):
                    r = httpx.post(f"{server.url}/executed_obs_units/start", headers={
                        **automation, "Idempotency-Key": key},
                        json={"obs_unit_id": "OU-2026-0412", "instrument": "HARPS"})
                    acked = time.monotonic()
                    assert r.status_code == 202, r.text
                    execution = r.json()["ids"]["executed_obs_unit_id"]
                    row = f'#exec-rows tr[data-id="{execution}"]'
                    page.wait_for_selector(f"{row}.pending", timeout=2_000)
                    page.wait_for_selector(f'#activity-rows tr[data-command-id="{key}"]',
                                           timeout=2_000)
                    assert time.monotonic() - acked < 2.0
                    assert "pending" in page.evaluate(  # visibly: the row's "pending" badge
                        "(sel) => getComputedStyle(document.querySelector(sel + ' td'),"
                        " '::before').content", row)
                # ... and is no longer marked pending once applied
                page.wait_for_selector(f"{row}:not(.pending)", timeout=5_000)

                # a download's progress bar moves with the live progress
                r = httpx.post(f"{server.url}/mast/download/start-chunked", headers=automation,
                               json={"products": [product(FILE, 3 * 1024 * 1024)],
                                     "destination": "night/browser", "register_files": False})
                assert r.status_code == 202, r.text
                job = r.json()["ids"]["download_job_id"]
                bar = f'progress[data-job="{job}"]'
                page.wait_for_selector(bar, timeout=5_000)
                seen: list[float] = []
                etas: set[str] = set()
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    value = float(page.get_attribute(bar, "value") or 0)
                    maximum = float(page.get_attribute(bar, "max") or 1)
                    if value and (not seen or value != seen[-1]):
                        seen.append(value)
                        if value < maximum:
                            etas.add(page.text_content(
                                f'#dl-rows tr[data-id="{job}"] td.eta') or "")
                    if value >= maximum > 1:
                        break
                    time.sleep(0.1)
                partial = [v for v in seen if v < 3 * 1024 * 1024]
                assert len(partial) >= 2 and partial == sorted(partial), seen
                # while it runs, an ETA from the live speed (digits, not a dash)
                assert any(re.search(r"\d", eta) for eta in etas), etas

                shot = tmp_path / "dashboard.png"
                page.screenshot(path=str(shot), full_page=True)
                assert shot.stat().st_size > 10_000
                assert not errors, errors
            finally:
                browser.close()
            # the summary with a download job in it has the documented shape
            summary = httpx.get(f"{server.url}/dashboard/summary", headers=automation).json()
            assert [d["id"] for d in summary["downloads"]["items"]] == [job]
            NightSummary.model_validate(summary)
        # every request the page made went to this server
        assert requested and all(u.startswith(server.url + "/") for u in requested), [
            u for u in requested if not u.startswith(server.url + "/")]


def test_the_api_docs_render_offline_in_a_real_browser(tmp_path: Path) -> None:
    """Swagger UI and ReDoc drawn in Chromium with every request (scripts, styles, fonts,
    images, the schema) to this server: the pages work at a site without internet."""
    executable = chromium()
    from playwright.sync_api import sync_playwright

    from tests.conftest import make_settings

    settings = make_settings(tmp_path, "sqlite")
    with LiveServer(create_app(settings)) as server:
        requested: list[str] = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=executable, headless=True,
                                         args=["--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.on("request", lambda r: requested.append(r.url))
                blocked: dict[str, str | None] = {}
                page.on("requestfailed", lambda r: blocked.update({r.url: r.failure}))
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(f"{server.url}/docs")
                page.wait_for_selector(".swagger-ui .opblock-tag", timeout=15_000)
                assert page.locator(".swagger-ui .opblock").count() > 50
                page.goto(f"{server.url}/redoc")
                page.wait_for_selector("[data-section-id^='tag/']", timeout=20_000)
                assert not errors, errors
            finally:
                browser.close()
        assert f"{server.url}/openapi.json" in requested
        ours = (f"{server.url}/", f"blob:{server.url}/", "data:")  # ReDoc's worker: a blob
        # ReDoc's bundle asks for Redocly's logo (cdn.redoc.ly): the pages' CSP blocks it
        elsewhere = {u for u in requested if not u.startswith(ours)}
        assert {u: blocked.get(u) for u in elsewhere} == {
            u: "csp" for u in elsewhere}
