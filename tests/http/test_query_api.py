"""The query API a dashboard needs (issue 18): lists and counts of every read model, one
pagination contract (total, ``Link``, the ``skip`` alias), unknown query parameters refused,
CORS, gzip and offline API docs — in-process with the embedded workers, on SQLite and
PostgreSQL."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urljoin

import pytest
from fastapi.testclient import TestClient

from tests.http.test_api import (
    T0,
    applied,
    assert_error,
    complete_package,
    fid,
    file_spec,
    make_client,
    stage,
    start,
)

__all__ = ["make_client"]  # the fixture, shared with tests/http/test_api.py

LINK = re.compile(r'<([^>]+)>; rel="(next|prev)"')
DASHBOARD = "http://dashboard.example:3000"


def links(r: Any) -> dict[str, str]:
    """The ``Link`` header's targets by relation."""
    return {rel: url for url, rel in LINK.findall(r.headers.get("link", ""))}


def settle(c: TestClient, position: int) -> None:
    """Until the read models include ``position`` (read-your-writes)."""
    assert c.get(f"/executed_obs_units?limit=1&min_position={position}").status_code == 200


def register(c: TestClient, names: list[str], **over: Any) -> list[str]:
    """Register files, and wait until they are in the read models."""
    settle(c, applied(c.post("/raw_data_files/bulk?wait=true", json={
        "files": [file_spec(n, **over) for n in names]}))["position"])
    return [fid(n) for n in names]


# -- the lists that were missing: packages and the staging queue -----------------------------
def test_packages_list_filters_sorts_and_counts(client: TestClient) -> None:
    unit, _ = start(client, "OU-PKG")
    small, _ = complete_package(client, ["pkg-a-1.fits"], [100])
    big, _ = complete_package(client, ["pkg-b-1.fits", "pkg-b-2.fits"], [1000, 2000])
    body = applied(client.post("/raw_data_package?wait=true", json={
        "name": "P-building", "executed_obs_unit_id": unit}))
    building = body["ids"]["raw_data_package_id"]
    settle(client, body["position"])

    page = client.get("/raw_data_package").json()
    assert page["total"] == 3 and page["offset"] == 0 and page["limit"] == 100
    assert [p["id"] for p in page["items"]] == [building, big, small]  # newest first
    assert all(p["registered_at"] and p["pending"] is False for p in page["items"])
    by_id = {p["id"]: p for p in page["items"]}
    assert by_id[big]["total_size"] == 3000 and by_id[big]["file_count"] == 2
    assert by_id[big]["status"] == "complete" and by_id[building]["status"] == "building"

    assert [p["id"] for p in client.get("/raw_data_package?status=complete&sort=total_size")
            .json()["items"]] == [small, big]
    assert [p["id"] for p in client.get("/raw_data_package?sort=-name").json()["items"]] == [
        big, small, building]
    only = client.get(f"/raw_data_package?executed_obs_unit_id={unit}").json()
    assert [p["id"] for p in only["items"]] == [building] and only["total"] == 1
    assert client.get("/raw_data_package?name=P-pkg-a-1.fits").json()["items"][0]["id"] == small
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    none = client.get("/raw_data_package", params={"registered_from": future}).json()
    assert none["total"] == 0 and none["items"] == []
    assert client.get("/raw_data_package", params={"registered_to": future}).json()[
        "total"] == 3

    counts = client.get("/raw_data_package/counts").json()
    assert counts["status"] == {"complete": 2, "building": 1} and counts["total"] == 3
    assert counts["bytes"] == 3100 and counts["pending_commands"] == 0
    assert counts["read_model_position"] >= 1
    assert client.get("/raw_data_package/counts",
                      params={"registered_from": future}).json()["total"] == 0


def test_staging_queue_list_and_counts(client: TestClient) -> None:
    pkg, _ = complete_package(client, ["stg-1.fits"], [4000])
    first = stage(client, pkg)
    second = stage(client, pkg)
    settle(client, applied(client.put(f"/staging/{first}/progress?wait=true", json={
        "status": "in_progress", "bytes_transferred": 1000, "files_transferred": 0}))[
        "position"])

    queue = client.get("/staging").json()
    assert [s["id"] for s in queue["items"]] == [second, first] and queue["total"] == 2
    row = {s["id"]: s for s in queue["items"]}[first]
    assert row["status"] == "in_progress" and row["progress_percent"] == 25.0
    assert row["registered_at"] and row["updated_at"] >= row["registered_at"]
    assert [s["id"] for s in client.get("/staging?status=pending").json()["items"]] == [second]
    assert client.get("/staging?sort=-updated_at").json()["items"][0]["id"] == first
    assert client.get("/staging?destination=elsewhere").json()["total"] == 0

    counts = client.get("/staging/counts").json()
    assert counts["status"] == {"pending": 1, "in_progress": 1} and counts["total"] == 2
    assert counts["bytes"] == 8000


def test_new_lists_merge_pending_commands(make_client: Callable[..., TestClient]) -> None:
    c = make_client(embedded_projector=False)  # nothing is projected: all stays pending
    body = applied(c.post("/raw_data_package?wait=true", json={
        "name": "P-pending", "files": [file_spec("pending-1.fits", 500)]}))
    pkg = body["ids"]["raw_data_package_id"]
    page = c.get("/raw_data_package").json()
    assert page["total"] == 0 and page["pending_count"] == 1
    [item] = page["items"]
    assert item["id"] == pkg and item["pending"] is True and item["registered_at"] is None
    assert item["pending_command_ids"] == [body["command_id"]] and item["total_size"] == 500
    assert c.get("/raw_data_package?status=complete").json()["items"] == []
    assert c.get("/raw_data_package?offset=1").json()["items"] == []
    # a pending entity counts as registered now
    assert c.get("/raw_data_package", params={
        "registered_to": (datetime.now(UTC) - timedelta(hours=1)).isoformat()}).json()[
        "items"] == []

    applied(c.put(f"/raw_data_package/{pkg}/finalize?wait=true"))
    staging = applied(c.post("/staging/stage?wait=true", json={
        "package_ids": [pkg], "destination": "archive:/p"}))["ids"]["staging_id"]
    [row] = c.get("/staging").json()["items"]
    assert row["id"] == staging and row["pending"] is True and row["status"] == "pending"
    counts = c.get("/staging/counts").json()
    assert counts["total"] == 0 and counts["pending_commands"] == 1
    assert c.get("/raw_data_package/counts").json()["pending_commands"] == 2


# -- counts of every read model --------------------------------------------------------------
def test_counts_of_every_read_model(client: TestClient) -> None:
    unit, _ = start(client, "OU-C1", "HARPS")
    start(client, "OU-C2", "NIRPS", T0 + timedelta(hours=2))
    settle(client, applied(client.put(f"/executed_obs_units/{unit}/finish?wait=true",
                                      json={"status": "success"}))["position"])
    units = client.get("/executed_obs_units/counts").json()
    assert units["status"] == {"success": 1, "running": 1} and units["total"] == 2
    assert units["instrument"] == {"HARPS": 1, "NIRPS": 1}
    tonight = client.get("/executed_obs_units/counts", params={
        "start_from": (T0 + timedelta(hours=1)).isoformat()}).json()
    assert tonight["total"] == 1 and tonight["instrument"] == {"NIRPS": 1}

    register(client, ["cnt-1.fits", "cnt-2.fits"], size=300)
    register(client, ["cnt-3.fits"], size=50, file_type="calibration")
    settle(client, complete_package(client, ["cnt-4.fits"], [7])[1])
    files = client.get("/raw_data_files/counts").json()
    assert files["total"] == 4 and files["bytes"] == 657 and files["packaged"] == 1
    assert files["file_type"] == {"raw_science": 3, "calibration": 1}
    assert files["instrument"] == {"HARPS": 4}

    downloads = client.get("/mast/download/counts").json()
    assert downloads["total"] == 0 and downloads["status"] == {} and downloads["bytes"] == 0
    jobs = client.get("/ops/jobs/counts").json()
    assert set(jobs) == {"read_model_position", "total", "pending_commands", "status", "kind"}
    assert jobs["total"] == sum(jobs["status"].values()) == sum(jobs["kind"].values())
    products = client.get("/products/counts").json()
    assert products == {"read_model_position": products["read_model_position"], "total": 0,
                        "status": {}, "kind": {}, "bytes": 0, "pending_commands": 0}


# -- raw data files: time ranges and sorts ---------------------------------------------------
def test_raw_data_files_time_ranges_and_sorts(client: TestClient) -> None:
    early = register(client, ["tr-early.fits"], size=10, created_at=T0.isoformat())
    late = register(client, ["tr-late.fits"], size=30,
                    created_at=(T0 + timedelta(hours=3)).isoformat())
    middle = register(client, ["tr-middle.fits"], size=20,
                      created_at=(T0 + timedelta(hours=1)).isoformat())

    def ids(**params: Any) -> list[str]:
        r = client.get("/raw_data_files", params=params)
        assert r.status_code == 200, r.text
        return [f["id"] for f in r.json()["items"]]

    assert ids() == late + middle + early  # newest created first
    assert ids(sort="created_at") == early + middle + late
    assert ids(sort="-size") == late + middle + early
    assert ids(sort="name") == early + late + middle
    assert ids(sort="registered_at") == early + late + middle  # the order registered
    assert ids(sort="-registered_at") == middle + late + early
    assert ids(created_from=(T0 + timedelta(minutes=30)).isoformat()) == late + middle
    assert ids(created_from=(T0 + timedelta(minutes=30)).isoformat(),
               created_to=(T0 + timedelta(hours=2)).isoformat()) == middle
    now = datetime.now(UTC)
    assert ids(registered_from=(now - timedelta(hours=1)).isoformat()) == late + middle + early
    assert ids(registered_to=(now - timedelta(hours=1)).isoformat()) == []
    row = client.get(f"/raw_data_files/{early[0]}").json()
    assert row["registered_at"] is not None
    assert_error(client.get("/raw_data_files?sort=checksum"), 422, "query.sort")
    assert_error(client.get("/raw_data_files?created_from=12345"), 422, "query.created_from")


# -- one pagination contract -----------------------------------------------------------------
def test_pagination_total_and_link_headers(client: TestClient) -> None:
    names = [f"page-{i}.fits" for i in range(5)]
    every = set(register(client, names))
    first = client.get("/raw_data_files?limit=2&file_type=raw_science")
    body = first.json()
    assert body["total"] == 5 and body["limit"] == 2 and body["offset"] == 0
    assert set(links(first)) == {"next"}
    assert "file_type=raw_science" in links(first)["next"]  # the filters carry over

    seen: list[str] = [f["id"] for f in body["items"]]
    r = first
    while "next" in links(r):
        r = client.get(links(r)["next"])
        assert r.status_code == 200 and r.json()["total"] == 5
        seen += [f["id"] for f in r.json()["items"]]
    assert len(seen) == 5 and set(seen) == every  # every row once
    assert r.json()["offset"] == 4 and set(links(r)) == {"prev"}
    back = client.get(links(r)["prev"]).json()
    assert back["offset"] == 2 and len(back["items"]) == 2

    middle = client.get("/raw_data_files?limit=2&offset=2")
    assert set(links(middle)) == {"next", "prev"}
    assert "offset=0" in links(middle)["prev"] and "offset=4" in links(middle)["next"]
    assert "link" not in client.get("/raw_data_files").headers  # one page: no neighbours

    # every list answers the same way
    for path in ("/executed_obs_units", "/raw_data_package", "/staging", "/observation_results",
                 "/mast/download/jobs", "/mast/download/resumable", "/ops/jobs", "/products",
                 "/audit/requests"):
        r = client.get(f"{path}?limit=1&offset=1")
        assert r.status_code == 200, (path, r.text)
        page = r.json()
        assert page["limit"] == 1 and page["offset"] == 1 and "total" in page, path
        assert links(r).get("prev", "").startswith(f"{path}?"), (path, r.headers)


def test_older_pagination_parameters_still_work(client: TestClient) -> None:
    for path in ("/ops/jobs", "/products", "/audit/requests"):  # lists that took `skip`
        r = client.get(f"{path}?skip=3&limit=2")
        assert r.status_code == 200, (path, r.text)
        assert r.json()["offset"] == 3 and r.json()["skip"] == 3
        assert "offset=1" in links(r)["prev"] and "skip" not in links(r)["prev"]
        assert client.get(f"{path}?skip=3&offset=2").json()["offset"] == 2  # offset wins
    # `offset` lists do not take `skip`: one scheme, an alias only where it was
    assert_error(client.get("/raw_data_files?skip=3"), 422, "query.skip")
    # the audit event log pages by log position (`after`), its Link too
    start(client, "OU-AUDIT-1")
    start(client, "OU-AUDIT-2")
    r = client.get("/audit/events?limit=1&aggregate_type=ExecutedObsUnit")
    assert r.status_code == 200 and r.json()["next_after"] is not None, r.text
    assert links(r) == {"next": f"/audit/events?limit=1&aggregate_type=ExecutedObsUnit&after="
                                f"{r.json()['next_after']}"}
    assert client.get(links(r)["next"]).json()["items"][0]["position"] > r.json()[
        "next_after"]
    assert "link" not in client.get("/audit/events?limit=1000").headers


def test_pagination_is_documented(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    for path in ("/raw_data_files", "/executed_obs_units", "/raw_data_package", "/staging",
                 "/observation_results", "/mast/download/jobs", "/ops/jobs", "/products",
                 "/audit/requests"):
        op = schema["paths"][path]["get"]
        assert "Link" in op["responses"]["200"]["headers"], path
        names = {p["name"]: p for p in op["parameters"]}
        assert {"limit", "offset"} <= set(names), path
        if "skip" in names:
            assert names["skip"]["deprecated"] is True
    for path in ("/raw_data_package/counts", "/staging/counts", "/executed_obs_units/counts",
                 "/raw_data_files/counts", "/mast/download/counts", "/ops/jobs/counts",
                 "/products/counts"):
        ref = schema["paths"][path]["get"]["responses"]["200"]["content"][
            "application/json"]["schema"]["$ref"]
        assert ref.endswith("Counts"), (path, ref)


# -- unknown query parameters ----------------------------------------------------------------
def test_unknown_query_parameters_are_422_naming_them(client: TestClient) -> None:
    register(client, ["unknown-param.fits"])
    # the case: a misspelt time filter silently returned every file
    body = assert_error(client.get("/raw_data_files?created_frm=2026-01-01"), 422,
                        "query.created_frm", "unknown query parameter")
    assert "created_from" in body["errors"][0]["message"]  # what the endpoint accepts
    body = assert_error(client.get("/raw_data_package?colour=red&flavour=x&limit=5"), 422)
    assert [e["field"] for e in body["errors"]] == ["query.colour", "query.flavour"]
    for method, path in (("GET", f"/raw_data_files/{fid('unknown-param.fits')}?x=1"),
                         ("GET", "/staging/counts?x=1"), ("GET", "/products/counts?x=1"),
                         ("GET", "/health?verbose=1"),
                         ("GET", "/auth/me?x=1"), ("GET", "/audit/events?x=1"),
                         ("GET", "/ops/algorithms?x=1"), ("GET", "/commands/abc?x=1"),
                         ("POST", "/executed_obs_units/start?dry_run=true")):
        r = client.request(method, path, json={"obs_unit_id": "OU-X", "instrument": "HARPS"}
                           if method == "POST" else None)
        assert_error(r, 422, "query." + path.split("?")[1].split("=")[0])
    # nothing was started by the refused command
    assert client.get("/executed_obs_units/OU-X").json()["executions"] == []


def test_unknown_parameters_are_refused_after_authentication(client: TestClient) -> None:
    r = client.get("/raw_data_files?nonsense=1", headers={"Authorization": ""})
    assert_error(r, 401)


# -- CORS and gzip ---------------------------------------------------------------------------
def test_cors_preflight_and_headers(make_client: Callable[..., TestClient]) -> None:
    c = make_client(cors_origins=f"{DASHBOARD}, https://ops.example")
    preflight = {"Origin": DASHBOARD, "Access-Control-Request-Method": "GET",
                 "Access-Control-Request-Headers": "authorization"}
    for path in ("/raw_data_files", "/staging/counts", f"/raw_data_files/{fid('x.fits')}",
                 "/executed_obs_units/start"):
        r = c.options(path, headers=preflight)
        assert r.status_code == 200, (path, r.status_code, r.text)
        assert r.headers["access-control-allow-origin"] == DASHBOARD
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
    post = c.options("/executed_obs_units/start", headers={
        **preflight, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, idempotency-key"})
    assert post.status_code == 200 and "POST" in post.headers["access-control-allow-methods"]

    r = c.get("/raw_data_files?limit=1&offset=1", headers={"Origin": DASHBOARD})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == DASHBOARD
    exposed = r.headers["access-control-expose-headers"].lower()
    assert "link" in exposed and "x-read-models" in exposed and "retry-after" in exposed
    # a command through the plain lane answers a browser too
    ack = c.post("/executed_obs_units/start", headers={"Origin": DASHBOARD},
                 json={"obs_unit_id": "OU-CORS", "instrument": "HARPS"})
    assert ack.status_code == 202 and ack.headers["access-control-allow-origin"] == DASHBOARD

    other = c.options("/raw_data_files", headers={**preflight, "Origin": "http://evil.example"})
    assert_error(other, 400, "Origin")
    assert "access-control-allow-origin" not in other.headers
    assert "access-control-allow-origin" not in c.get(
        "/raw_data_files", headers={"Origin": "http://evil.example"}).headers


def test_without_cors_origins_no_browser_access(client: TestClient) -> None:
    r = client.options("/raw_data_files", headers={
        "Origin": DASHBOARD, "Access-Control-Request-Method": "GET"})
    assert_error(r, 405)
    assert "access-control-allow-origin" not in client.get(
        "/raw_data_files", headers={"Origin": DASHBOARD}).headers


def test_cors_origins_must_be_origins(tmp_path: Any) -> None:
    from pydantic import ValidationError

    from tests.conftest import make_settings
    for bad in ("dashboard.example", "ftp://x.example", "http://x.example/path"):
        with pytest.raises(ValidationError, match="cors_origins"):
            make_settings(tmp_path, "sqlite", cors_origins=bad)
    assert make_settings(tmp_path, "sqlite", cors_origins="*, http://a.example:8080/"
                         ).cors_origin_list == ["*", "http://a.example:8080"]


def test_gzip_above_the_minimum_size(client: TestClient) -> None:
    register(client, [f"gz-{i}.fits" for i in range(30)])
    r = client.get("/raw_data_files", headers={"Accept-Encoding": "gzip"})
    assert r.status_code == 200 and r.headers["content-encoding"] == "gzip"
    assert len(r.json()["items"]) == 30  # decoded by the client
    assert int(r.headers["content-length"]) < len(r.content) / 3
    assert "content-encoding" not in client.get(
        "/raw_data_files", headers={"Accept-Encoding": "identity"}).headers
    small = client.get("/raw_data_files/counts", headers={"Accept-Encoding": "gzip"})
    assert "content-encoding" not in small.headers  # below OBSLEDGER_GZIP_MINIMUM_BYTES
    ack = client.post("/executed_obs_units/start", headers={"Accept-Encoding": "gzip"},
                      json={"obs_unit_id": "OU-GZ", "instrument": "HARPS"})
    assert ack.status_code == 202 and "content-encoding" not in ack.headers


# -- offline API documentation ---------------------------------------------------------------
REFERENCE = re.compile(r'(?:src|href|spec-url)\s*=\s*"([^"]+)"|url\(\s*[\'"]?([^\'")]+)'
                       r"|url:\s*'([^']+)'")


def test_docs_are_served_without_any_external_host(client: TestClient) -> None:
    for page in ("/docs", "/redoc"):
        r = client.get(page)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]  # the browser fetches from here only
        assert "default-src 'self'" in csp and "img-src 'self' data:;" in csp
        assert "connect-src 'self'" in csp and "http" not in csp
        refs = [next(g for g in m if g) for m in REFERENCE.findall(r.text)]
        assert refs, page
        for ref in refs:
            assert not re.match(r"^([a-z]+:)?//", ref), (page, ref)  # same origin only
            asset = client.get(urljoin(page, ref))
            assert asset.status_code == 200, (page, ref)
        assert not re.search(r"https?://", re.sub(r"<!--.*?-->", "", r.text, flags=re.S)), page
    swagger = client.get("/docs").text
    assert '"validatorUrl": null' in swagger  # no badge image from validator.swagger.io
    assert "/docs-assets/swagger-ui-bundle.js" in swagger
    assert "/docs-assets/redoc.standalone.js" in client.get("/redoc").text
    assert client.get("/docs/oauth2-redirect").status_code == 200
    css = client.get("/docs-assets/swagger-ui.css").text
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", css)
