"""MAST searches through astroquery's real query and parsing code, with only its transport
replaced (as astroquery's own tests do): the real MAST answers shipped in its wheel are
served by service name. Also a download job started by obs_id, resolved the same way."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest
import requests
from astropy.io import fits
from fastapi.testclient import TestClient

from api.app import create_app
from infra.settings import Settings
from tests.conftest import grant
from tests.http.test_mast_downloads import download_settings, wait_status
from tests.support.mast_server import MAST_DATA, MastTestServer, portal_answer

RESOLVABLE = "TIC 307210830"  # one of the names resolver.json answers for


class Replay:
    """Serves the shipped MAST answers; records what was asked; can fail on command."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []  # (url, service)
        self.fail: Exception | None = None
        self.error_status: str | None = None

    def portal(self, method: str = "POST", url: str | None = None,
               data: Any = None, timeout: int = 10, **kwargs: Any) -> list[Any]:
        from astroquery.utils.mocks import MockResponse

        assert url is not None
        if self.fail is not None:
            raise self.fail
        if "columnsconfig" in url:
            self.calls.append((url, "columnsconfig"))
            return [MockResponse((MAST_DATA / "columnsconfig.json").read_bytes())]
        mashup = json.loads(unquote(data.split("=", 1)[1]))
        service = mashup["service"]
        self.calls.append((url, service))
        if self.error_status is not None:
            return [MockResponse(b'{"status": "ERROR", "msg": "' + self.error_status.encode()
                                 + b'", "data": [], "fields": []}')]
        return [MockResponse(portal_answer(service, mashup["params"]))]

    def santa(self, url: str, params: Any = None) -> Any:
        """astroquery's own resolver, at its fixed STScI address: never to be asked."""
        self.calls.append((url, "santa"))
        raise AssertionError(f"astroquery's fixed resolver was asked: {url}")


@pytest.fixture
def replay(monkeypatch: pytest.MonkeyPatch) -> Replay:
    from astroquery import mast

    r = Replay()
    monkeypatch.setattr(mast.discovery_portal.PortalAPI, "_request", r.portal)
    monkeypatch.setattr(mast.utils, "_simple_request", r.santa)
    return r


@pytest.fixture
def search_settings(tmp_path: Path) -> Settings:
    server = MastTestServer()  # not started: searches only need its (unused) address
    server.port = 9
    return download_settings(tmp_path, "sqlite", None, server,
                             mast_base_url="https://mast.example.org")


@pytest.fixture
def client(search_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(search_settings), headers=grant(search_settings)) as c:
        yield c


def test_target_search_resolves_and_cones(client: TestClient, replay: Replay) -> None:
    r = client.post("/mast/search/target", json={"target": RESOLVABLE, "radius_deg": 0.1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 19 and len(body["observations"]) == 19
    first = body["observations"][0]
    assert first["obs_id"] == "U27XCS01T" and str(first["obsid"]) == "2003585980"
    assert first["obs_collection"] == "HST" and "_selected_" not in first
    assert body["products"] is None
    assert [s for _, s in replay.calls if s != "columnsconfig"] == ["Mast.Name.Lookup",
                                                                    "Mast.Caom.Cone"]
    assert {u for u, s in replay.calls if s != "columnsconfig"} == {
        "https://mast.example.org/api/v0/invoke"}  # the configured server, lookup included


def test_target_search_with_filters_uses_criteria(client: TestClient, replay: Replay) -> None:
    r = client.post("/mast/search/target", json={
        "target": RESOLVABLE, "filters": {"collection": ["HST"], "calib_level": [3]},
        "limit": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Mast.Caom.Filtered.Position" in [s for _, s in replay.calls]
    assert len(body["observations"]) <= 2 and body["count"] >= len(body["observations"])


def test_unknown_target_is_404(client: TestClient, replay: Replay) -> None:
    r = client.post("/mast/search/target", json={"target": "Not A Real Star 123"})
    assert r.status_code == 404
    body = r.json()
    assert body["status_code"] == 404 and body["errors"][0]["field"] == "target"
    assert "unknown target" in body["errors"][0]["message"]


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[MastTestServer, TestClient]]:
    """A MAST mirror (the local server, over HTTP) as OBSLEDGER_MAST_BASE_URL; nothing
    patched: astroquery's own fixed resolver address would fail to answer (no network)."""
    server = MastTestServer()
    server.start()
    try:
        settings = download_settings(tmp_path, "sqlite", None, server)
        with TestClient(create_app(settings), headers=grant(settings)) as c:
            yield server, c
    finally:
        server.stop()


@pytest.mark.parametrize(("name", "ra", "dec"), [
    ("M101", 210.802429, 54.34875), (" tic 307210830", 124.531756290083, -68.3129998725044)])
def test_target_resolved_by_the_configured_mast(mirror: tuple[MastTestServer, TestClient],
                                                name: str, ra: float, dec: float) -> None:
    server, client = mirror
    r = client.post("/mast/search/target", json={"target": name, "radius_deg": 0.05})
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 19
    assert [s for s, _ in server.invoked] == ["Mast.Name.Lookup", "Mast.Caom.Cone"]
    lookup, cone = (p for _, p in server.invoked)
    assert lookup == {"input": name.strip(), "format": "json"}
    # the cone is around the position MAST's first resolver gave (resolver.json's order)
    assert (cone["ra"], cone["dec"], cone["radius"]) == pytest.approx((ra, dec, 0.05))


def test_target_with_filters_resolved_by_the_configured_mast(
        mirror: tuple[MastTestServer, TestClient]) -> None:
    server, client = mirror
    r = client.post("/mast/search/target", json={"target": "M8", "filters": {
        "collection": ["HST"]}})
    assert r.status_code == 200, r.text
    assert [s for s, _ in server.invoked] == ["Mast.Name.Lookup",
                                              "Mast.Caom.Filtered.Position"]


def test_unknown_target_at_the_configured_mast_is_404(
        mirror: tuple[MastTestServer, TestClient]) -> None:
    server, client = mirror
    r = client.post("/mast/search/target", json={"target": "Not A Real Star 123"})
    assert r.status_code == 404, r.text
    error = r.json()["errors"][0]
    assert error["field"] == "target" and "Not A Real Star 123" in error["message"]
    assert [s for s, _ in server.invoked] == ["Mast.Name.Lookup"]  # no search after it


def test_target_search_with_the_configured_mast_down_is_503(tmp_path: Path) -> None:
    server = MastTestServer()
    server.start()
    settings = download_settings(tmp_path, "sqlite", None, server)
    server.stop()  # nothing listens at the configured base any more
    with TestClient(create_app(settings), headers=grant(settings)) as client:
        r = client.post("/mast/search/target", json={"target": "M101"})
    assert r.status_code == 503, r.text
    assert "unreachable" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize(("ra", "dec"), [(23.118, 60.642), ("01:32:28.4", "+60:38:31"),
                                         ("1h32m28.4s", "60d38m31s"), ("23.118", "60.642")])
def test_coordinate_search_degrees_or_sexagesimal(client: TestClient, replay: Replay,
                                                  ra: Any, dec: Any) -> None:
    r = client.post("/mast/search/coordinates", json={"ra": ra, "dec": dec,
                                                       "radius_deg": 0.05})
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 19
    assert [s for _, s in replay.calls if s != "columnsconfig"] == ["Mast.Caom.Cone"]


@pytest.mark.parametrize(("ra", "dec", "field"), [
    (400, 10, "ra"), (-1, 10, "ra"), (10, 95, "dec"), ("abc", 10, "ra"),
    (10, "12:xx:00", "dec"), ("nan", 0, "ra")])
def test_bad_coordinates_are_422(client: TestClient, replay: Replay, ra: Any, dec: Any,
                                 field: str) -> None:
    r = client.post("/mast/search/coordinates", json={"ra": ra, "dec": dec})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["status_code"] == 422 and body["errors"][0]["field"] == field
    assert replay.calls == []


def test_observation_search_with_products(client: TestClient, replay: Replay) -> None:
    r = client.post("/mast/search/observation", json={"obs_id": "O6AU01MSQ",
                                                       "include_products": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["count"] == 3
    services = [s for _, s in replay.calls]
    assert "Mast.Caom.Filtered" in services and "Mast.Caom.Products" in services
    products = [p for group in body["products"].values() for p in group]
    assert len(products) == 22
    c3m = next(p for p in products if p["filename"] == "u9o40504m_c3m.fits")
    assert c3m == {"data_uri": "mast:HST/product/u9o40504m_c3m.fits",
                   "filename": "u9o40504m_c3m.fits", "size": 207360, "obs_id": "U9O40504M",
                   "obsid": "2003738726", "product_type": "AUXILIARY",
                   "product_subgroup": "C3M", "description": c3m["description"],
                   "collection": "HST"}


def test_product_filters(client: TestClient, replay: Replay) -> None:
    r = client.post("/mast/search/observation", json={
        "obs_id": "O6AU01MSQ", "include_products": True,
        "filters": {"product_type": ["SCIENCE"]}})
    products = [p for group in r.json()["products"].values() for p in group]
    assert len(products) == 7 and {p["product_type"] for p in products} == {"SCIENCE"}


def test_program_search(client: TestClient, replay: Replay) -> None:
    r = client.post("/mast/search/program", json={"proposal_id": "5371",
                                                   "filters": {"collection": ["HST"]}})
    assert r.status_code == 200, r.text
    assert r.json()["count"] == 3
    assert "Mast.Caom.Filtered" in [s for _, s in replay.calls]


@pytest.mark.parametrize("failure", [requests.ConnectionError("refused"),
                                     requests.Timeout("slow")])
def test_unreachable_mast_is_503(client: TestClient, replay: Replay,
                                 failure: Exception) -> None:
    replay.fail = failure
    for path, body in (("/mast/search/observation", {"obs_id": "X"}),
                       ("/mast/search/target", {"target": RESOLVABLE}),
                       ("/mast/search/coordinates", {"ra": 1, "dec": 2})):
        r = client.post(path, json=body)
        assert r.status_code == 503, r.text
        assert r.json()["status_code"] == 503 and "unreachable" in r.json()["errors"][0][
            "message"]


def test_mast_error_answer_is_503(client: TestClient, replay: Replay) -> None:
    replay.error_status = "Internal failure of the portal"
    r = client.post("/mast/search/observation", json={"obs_id": "X"})
    assert r.status_code == 503
    assert "Internal failure" in r.json()["errors"][0]["message"]


@pytest.mark.parametrize(("path", "body"), [
    ("/mast/search/target", {"target": ""}),
    ("/mast/search/target", {"target": "M101", "radius_deg": 0}),
    ("/mast/search/target", {"target": "M101", "radius_deg": 11}),
    ("/mast/search/target", {"target": "M101", "limit": 0}),
    ("/mast/search/target", {"target": "M101", "bogus": 1}),
    ("/mast/search/coordinates", {"ra": 1}),
    ("/mast/search/coordinates", {"ra": [1], "dec": 2}),
    ("/mast/search/observation", {}),
    ("/mast/search/program", {"proposal_id": "5371; drop"}),
    ("/mast/search/program", {"proposal_id": "1", "filters": {"calib_level": [9]}}),
])
def test_bad_search_bodies_are_422(client: TestClient, replay: Replay, path: str,
                                   body: dict[str, Any]) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["errors"] and replay.calls == []


def test_openapi_documents_every_mast_route(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    mast = {p: v for p, v in spec["paths"].items() if p.startswith("/mast/")}
    assert len(mast) == 13  # with GET /mast/download/counts
    for path, ops in mast.items():
        for op in ops.values():
            assert op.get("summary"), path
            if "requestBody" in op:
                schema = op["requestBody"]["content"]["application/json"]["schema"]
                ref = schema["$ref"].rsplit("/", 1)[-1]
                assert spec["components"]["schemas"][ref].get("examples"), path


def fits_of_size(size: int, seed: int) -> bytes:
    """A valid FITS file of exactly ``size`` bytes with CHECKSUM/DATASUM cards."""
    import io

    data = np.random.default_rng(seed).integers(0, 255, size - 2880, dtype=np.uint8)
    buf = io.BytesIO()
    fits.PrimaryHDU(data).writeto(buf, checksum=True)
    out = buf.getvalue()
    assert len(out) == size
    return out


def test_download_by_obs_id_resolves_products_and_verifies_checksums(
        tmp_path: Path, replay: Replay) -> None:
    server = MastTestServer()
    wanted = {"u9o40504m_cgr.fits": 31680, "u9o40504m_dgr.fits": 31680,
              "u9o40504j_jit.fits": 25920}
    for i, (name, size) in enumerate(wanted.items()):
        server.add(name, fits_of_size(size, i))
    server.start()
    try:
        settings = download_settings(tmp_path, "sqlite", None, server)
        with TestClient(create_app(settings), headers=grant(settings)) as client:
            r = client.post("/mast/download/start-chunked", json={
                "obs_id": "O6AU01MSQ", "destination": "hst/u9o40504m",
                "filters": {"product_subgroup": ["CGR", "DGR", "JIT"]}})
            assert r.status_code == 202, r.text
            job_id = r.json()["ids"]["download_job_id"]
            job = wait_status(client, job_id, {"completed"})
            assert sorted(f["filename"] for f in job["files"]) == sorted(wanted)
            for f in job["files"]:
                assert f["obs_id"] == "U9O40504M" and f["data_uri"].startswith("mast:HST/")
                assert f["fits"]["checksums_verified"] == 1
                assert f["url"].startswith(server.url)
            r = client.post("/mast/download/start", json={
                "obs_id": "O6AU01MSQ", "filters": {"product_subgroup": ["NOPE"]}})
            assert r.status_code == 404 and r.json()["errors"][0]["field"] == "filters"
    finally:
        server.stop()


def test_a_fits_checksum_mismatch_fails_the_job(tmp_path: Path) -> None:
    server = MastTestServer()
    good = bytearray(fits_of_size(28800, 7))
    good[-10] ^= 0xFF  # one flipped byte in the data
    server.add("u9o40504m_trl.fits", bytes(good))
    server.start()
    try:
        settings = download_settings(tmp_path, "sqlite", None, server)
        with TestClient(create_app(settings), headers=grant(settings)) as client:
            r = client.post("/mast/download/start", json={"products": [{
                "data_uri": "mast:HST/product/u9o40504m_trl.fits", "size": 28800}]})
            job = wait_status(client, r.json()["ids"]["download_job_id"], {"failed"})
            assert "DATASUM does not match" in job["reason"]
    finally:
        server.stop()
