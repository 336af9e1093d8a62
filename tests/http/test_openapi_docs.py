"""The served OpenAPI schema documents every operation, tag, response header and timestamp
(api/openapi_docs.py, api/app.py), and the documented headers are the ones really sent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.openapi_docs import OPERATIONS
from tests.conftest import grant, make_settings

JOB_VIEWS = {
    "JobView": {"requested_at", "started_at", "finished_at", "updated_at"},
    "StepView": {"started_at", "completed_at"},
    "LeaseView": {"expires_at"},
    "DownloadJobView": {"requested_at", "finished_at", "updated_at"},
    "DownloadFileView": {"started_at", "checkpoint_at", "completed_at"},
}


@pytest.fixture(scope="module")
def schema(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = make_settings(tmp_path_factory.mktemp("openapi"), "sqlite")
    served: dict[str, Any] = create_app(settings).openapi()
    return served


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def test_every_operation_has_a_summary_and_a_description(schema: dict[str, Any]) -> None:
    undescribed = [(m, p) for m, p, o in operations(schema)
                   if not o.get("summary") or not o.get("description")]
    assert undescribed == []
    # every description of the table belongs to an operation that exists
    served = {(m, p) for m, p, _ in operations(schema)}
    assert set(OPERATIONS) <= served


def test_every_tag_has_a_description(schema: dict[str, Any]) -> None:
    used = {t for _, _, o in operations(schema) for t in o.get("tags", [])}
    described = {t["name"] for t in schema["tags"] if t.get("description")}
    assert used <= described
    assert described <= used  # no description of a tag nobody uses


def headers_of(schema: dict[str, Any], method: str, path: str, status: str) -> dict[str, Any]:
    documented: dict[str, Any] = schema["paths"][path][method]["responses"][status].get(
        "headers", {})
    for header in documented.values():
        assert header["description"] and header["schema"]
        assert not header.get("required")  # schemathesis checks responses against it
    return documented


@pytest.mark.parametrize(("method", "path"), [
    ("post", "/executed_obs_units/start"), ("put", "/executed_obs_units/{id}/finish"),
    ("post", "/raw_data_files/bulk"), ("post", "/mast/download/start"),
    ("delete", "/ops/jobs/{id}"), ("post", "/observation_results/{id}/runs")])
def test_command_responses_document_their_headers(schema: dict[str, Any], method: str,
                                                   path: str) -> None:
    accepted = headers_of(schema, method, path, "202")
    assert {"Location", "Idempotent-Replayed"} <= set(accepted)
    applied = headers_of(schema, method, path, "200")
    assert {"Location", "Idempotent-Replayed", "X-Log-Position"} <= set(applied)
    assert "Retry-After" in headers_of(schema, method, path, "503")


@pytest.mark.parametrize("path", [
    "/executed_obs_units", "/raw_data_files", "/raw_data_package", "/staging",
    "/observation_results", "/mast/download/jobs", "/ops/jobs"])
def test_list_responses_document_their_headers(schema: dict[str, Any], path: str) -> None:
    assert {"Link", "X-Read-Models"} <= set(headers_of(schema, "get", path, "200"))
    assert "Retry-After" in headers_of(schema, "get", path, "503")


def test_product_list_documents_link(schema: dict[str, Any]) -> None:
    """Data products are read from the read models alone: ``Link``, no ``X-Read-Models``."""
    assert set(headers_of(schema, "get", "/products", "200")) == {"Link"}


def test_account_throttling_documents_retry_after(schema: dict[str, Any]) -> None:
    assert "Retry-After" in headers_of(schema, "post", "/auth/token", "429")


def test_job_view_timestamps_are_date_times(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    for view, fields in JOB_VIEWS.items():
        properties = components[view]["properties"]
        for field in fields:
            formats = {s.get("format") for s in properties[field].get("anyOf", [])}
            assert "date-time" in formats, (view, field, properties[field])


def test_documented_command_headers_are_sent(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, "sqlite")
    with TestClient(create_app(settings), headers=grant(settings)) as client:
        body = {"obs_unit_id": "OU-DOC", "instrument": "HARPS"}
        key = {"Idempotency-Key": "night-1204-ou-doc-start"}
        r = client.post("/executed_obs_units/start?wait=true", json=body, headers=key)
        assert r.status_code == 200, r.text
        assert r.headers["Location"] == f"/commands/{r.json()['command_id']}"
        assert int(r.headers["X-Log-Position"]) == r.json()["position"]
        assert "Idempotent-Replayed" not in r.headers
        again = client.post("/executed_obs_units/start", json=body, headers=key)
        assert again.headers["Idempotent-Replayed"] == "true"
        assert again.headers["Location"] == r.headers["Location"]
        listed = client.get("/executed_obs_units?limit=1")
        assert listed.status_code == 200 and 'rel="next"' not in listed.headers.get("Link", "")
        job = client.get("/ops/jobs").json()
        assert job["items"] == []
