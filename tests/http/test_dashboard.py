"""The dashboard page and its summary: served by the API with every asset from the package
(no external host referenced anywhere), the night's figures with pending rows marked, and
an answer from the journal alone while the read models do not answer."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.dashboard import static_files
from api.dashboard.models import NightSummary
from infra.settings import Settings
from tests.conftest import grant, make_settings

#: An absolute or protocol-relative URL: what would make a browser go to another host.
EXTERNAL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}|(?:https?|wss?|ftp):""", re.I)
COMMENTS = re.compile(r"/\*.*?\*/", re.S)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.links += [v for k, v in attrs if k in ("src", "href", "action") and v]


def _external(text: str) -> list[str]:
    """External references in JS or CSS, comments (licence banners) aside."""
    return [m.group(0) for m in EXTERNAL.finditer(COMMENTS.sub("", text))]


@pytest.fixture
def page_client(tmp_path: Path) -> Iterator[TestClient]:
    settings = make_settings(tmp_path, "sqlite")
    with TestClient(create_app(settings), headers=grant(settings)) as c:
        yield c


def test_the_page_and_every_asset_come_from_this_server(page_client: TestClient) -> None:
    r = page_client.get("/", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/dashboard"
    page = page_client.get("/dashboard", headers={"Authorization": ""})  # no token needed
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "connect-src 'self'" in csp
    parser = _Links()
    parser.feed(page.text)
    assert parser.links
    for link in parser.links:  # the page's own links: this server, or an inline data: URL
        assert (link.startswith("/") and not link.startswith("//")) or link == "data:,", link
    assert not _external(re.sub(r"<a [^>]*>", "", page.text))
    served = 0
    for name in static_files():
        r = page_client.get(f"/dashboard/static/{name}")
        assert r.status_code == 200, name
        if name.endswith((".js", ".css", ".html")):
            assert not _external(r.text), (name, _external(r.text))
            served += 1
    assert served >= 4  # dashboard.js/.css, uPlot's JS and CSS
    # uPlot ships with its licence
    assert "MIT" in page_client.get("/dashboard/static/vendor/uplot/LICENSE").text
    for link in parser.links:
        if link.startswith("/dashboard/static/"):
            assert link.removeprefix("/dashboard/static/") in static_files()
    for bad in ("nope.js", "../__init__.py", "..%2F__init__.py", "templates/dashboard.html"):
        r = page_client.get(f"/dashboard/static/{bad}")
        assert r.status_code == 404 and r.json()["status_code"] == 404


def test_assets_are_package_data() -> None:
    """A wheel carries the templates and every asset (pyproject's package-data)."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "api.dashboard" in data["packages"]
    patterns = data["package-data"]["api.dashboard"]
    base = root / "api" / "dashboard"
    shipped = {p for pattern in patterns for p in base.glob(pattern) if p.is_file()}
    assert shipped == {p for p in base.rglob("*") if p.is_file() and p.suffix != ".py"
                       and "__pycache__" not in p.parts}


def _wait(client: TestClient, check: Any, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = client.get("/dashboard/summary").json()
        if check(body) or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_the_summary_of_the_night(client: TestClient, settings: Settings) -> None:
    u = client.post("/executed_obs_units/start", json={
        "obs_unit_id": "OU-2026-0412", "instrument": "HARPS"}).json()["ids"][
        "executed_obs_unit_id"]
    files = [{"name": f"night-{i}.fits", "instrument": "HARPS",
              "relative_path": f"n/night-{i}.fits", "size": 1000,
              "checksum": {"algorithm": "sha256", "value": "0" * 64}, "file_type": "science",
              "created_at": "2026-12-04T01:00:00Z"} for i in range(5)]
    p = client.post("/raw_data_package", json={"name": "night-pkg", "files": files}).json()
    pkg = p["ids"]["package_id"] if "package_id" in p["ids"] else p["ids"]["raw_data_package_id"]
    client.put(f"/raw_data_package/{pkg}/finalize", params={"wait": "true"})
    st = client.post("/staging/stage", params={"wait": "true"}, json={
        "package_ids": [pkg], "destination": "archive-eso"})
    assert st.status_code == 200, st.text
    body = _wait(client, lambda b: b["staging"]["queue"] and b["files"]["total"] == 5
                 and b["packages"]["by_status"] == {"complete": 1})
    assert body["read_models"] == "available" and body["read_model_position"] > 0
    NightSummary.model_validate(body)  # the documented shape, every section's keys
    schema = client.get("/openapi.json").json()["paths"]["/dashboard/summary"]["get"]
    assert schema["responses"]["200"]["content"]["application/json"]["schema"][
        "$ref"].endswith("/NightSummary")
    assert body["executions"]["by_status"] == {"running": 1}
    assert [x["id"] for x in body["executions"]["items"]] == [u]
    assert body["files"]["total"] == 5 and sum(
        m["files"] for m in body["files"]["per_minute"]) == 5
    assert body["packages"]["bytes_by_status"] == {"complete": 5000}
    assert body["packages"]["items"][0]["name"] == "night-pkg"
    assert body["staging"]["by_status"] == {"pending": 1}
    assert body["staging"]["queue"][0]["destination"] == "archive-eso"
    assert body["downloads"]["items"] == [] and body["processing_jobs"]["items"] == []
    assert body["observation_results"]["fulfillment_status"] == {}


def test_pending_rows_are_marked_and_the_journal_answers_in_an_outage(
        tmp_path: Path) -> None:
    """The read models on a server that does not answer: commands are acknowledged, and the
    summary answers from the journal, its rows pending."""
    settings = make_settings(tmp_path, "sqlite")
    auth = grant(settings)  # accounts known before the outage
    from tests.conftest import remember_accounts

    remember_accounts(settings)
    down = make_settings(tmp_path, "sqlite", read_model_url=(
        "postgresql+psycopg://postgres@127.0.0.1:9/nowhere?connect_timeout=1"),
        health_probe_s=0.2)
    with TestClient(create_app(down), headers=auth) as c:
        r = c.post("/executed_obs_units/start", json={"obs_unit_id": "OU-9", "instrument":
                                                       "HARPS"})
        assert r.status_code == 202, r.text
        body = c.get("/dashboard/summary")
        assert body.status_code == 200, body.text
        assert body.headers["x-read-models"] == "unavailable"
        s = body.json()
        assert s["read_models"] == "unavailable"
        NightSummary.model_validate(s)
        [row] = s["executions"]["items"]
        assert row["pending"] is True and row["obs_unit_id"] == "OU-9"
        assert s["executions"]["by_status"] is None and s["files"]["total"] is None
