"""The HTTP API in-process (embedded dispatcher and projector), on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from api.app import create_app
from api.mast import CoordinateSearch, ObservationSearch, ProgramSearch, TargetSearch
from commands.downloads import StartDownloadRequest
from commands.obs_units import FinishExecutedObsUnitRequest, StartExecutedObsUnitRequest
from commands.processing import CatalogRequest, IngestRequest, PlanRequest, ProcessRequest
from commands.raw_data import (
    AddFilesToPackageRequest,
    BulkRegisterRawDataFilesRequest,
    CreateRawDataPackageRequest,
    RegisterRawDataFileRequest,
)
from commands.results import (
    CancelObservationResultRequest,
    ContributeAssetRequest,
    DispatchObservationResultRequest,
    EndProcessingRunRequest,
    MaterializeObservationResultsRequest,
    StartProcessingRunRequest,
    TaskOutcomeRequest,
)
from commands.staging import RetryStagingRequest, StageRequest, StagingProgressRequest
from domain.raw_data import raw_data_file_id
from infra.settings import Settings
from tests.conftest import ROOT, grant, make_settings, settings_env

T0 = datetime(2026, 11, 21, 23, 0, tzinfo=UTC)
ERROR_KEYS = {"detail", "status_code", "errors"}
UNKNOWN = "00000000-0000-4000-8000-000000000000"


# -- helpers ---------------------------------------------------------------------------------
def assert_error(r: Any, status: int, field: str | None = None,
                 message: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= ERROR_KEYS, body
    assert body["status_code"] == status
    assert isinstance(body["detail"], str) and body["detail"]
    assert isinstance(body["errors"], list)
    for e in body["errors"]:
        assert set(e) == {"field", "message"} and isinstance(e["message"], str), e
    if field is not None:
        fields = [e["field"] for e in body["errors"]]
        assert field in fields, (field, body)
    if message is not None:
        text = body["detail"] + " " + " ".join(e["message"] for e in body["errors"])
        assert message in text, (message, body)
    return body  # type: ignore[no-any-return]


def applied(r: Any) -> dict[str, Any]:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "applied" and body["position"] >= 1, body
    assert r.headers["X-Log-Position"] == str(body["position"])
    return body  # type: ignore[no-any-return]


def file_spec(name: str, size: Any = 100, instrument: str = "HARPS",
              unit: str | None = None, **over: Any) -> dict[str, Any]:
    spec = {"name": name, "relative_path": f"2026-11-21/{name}", "size": size,
            "checksum": {"algorithm": "sha256", "value": "ab" * 32},
            "instrument": instrument, "file_type": "raw_science",
            "created_at": T0.isoformat()}
    if unit:
        spec["executed_obs_unit_id"] = unit
    spec.update(over)
    return spec


def fid(name: str, instrument: str = "HARPS") -> str:
    return str(raw_data_file_id(instrument, name))


def start(c: TestClient, obs_unit_id: str = "OU-1", instrument: str = "HARPS",
          start_time: datetime = T0) -> tuple[str, int]:
    body = applied(c.post("/executed_obs_units/start?wait=true", json={
        "obs_unit_id": obs_unit_id, "instrument": instrument,
        "start_time": start_time.isoformat()}))
    return body["ids"]["executed_obs_unit_id"], body["position"]


def complete_package(c: TestClient, names: list[str], sizes: list[int] | None = None
                     ) -> tuple[str, int]:
    sizes = sizes or [100] * len(names)
    pkg = applied(c.post("/raw_data_package?wait=true", json={
        "name": "P-" + names[0], "files": [file_spec(n, s) for n, s in zip(
            names, sizes, strict=True)]}))["ids"]["raw_data_package_id"]
    pos = applied(c.put(f"/raw_data_package/{pkg}/finalize?wait=true"))["position"]
    return pkg, pos


def stage(c: TestClient, pkg: str) -> str:
    return str(applied(c.post("/staging/stage?wait=true", json={
        "package_ids": [pkg], "destination": "archive:/stage"}))["ids"]["staging_id"])


@pytest.fixture
def make_client(tmp_path: Path, store_kind: str,
                request: pytest.FixtureRequest) -> Iterator[Callable[..., TestClient]]:
    """Clients with their own settings (each on a fresh database)."""
    new_db = request.getfixturevalue("pg_database") if store_kind == "postgres" else None
    stack = contextlib.ExitStack()

    def make(**overrides: Any) -> TestClient:
        s = make_settings(tmp_path / uuid.uuid4().hex[:8], store_kind,
                          new_db() if new_db else None, missing_target_deadline_s=0.5,
                          **overrides)
        return stack.enter_context(TestClient(create_app(s), headers=grant(s)))

    yield make
    stack.close()


# -- happy paths -----------------------------------------------------------------------------
def test_every_endpoint_happy_path(client: TestClient, settings: Settings) -> None:
    c = client
    r = c.post("/executed_obs_units/start?wait=true",
               json={"obs_unit_id": "OU-H", "instrument": "HARPS",
                     "start_time": "2026-11-21T23:14:05Z", "metadata": {"airmass": 1.1}},
               headers={**grant(settings, "night-script", kind="user"),
                        "X-Correlation-ID": "corr-1"})
    body = applied(r)
    unit = body["ids"]["executed_obs_unit_id"]
    assert r.headers["Location"] == f"/commands/{body['command_id']}"
    assert r.headers["X-Correlation-ID"] == "corr-1"

    r = c.get(f"/executed_obs_units/execution/{unit}?min_position={body['position']}")
    assert r.status_code == 200, r.text
    row = r.json()
    assert row["status"] == "running" and row["started_by"] == "night-script"
    assert row["pending"] is False and row["metadata"] == {"airmass": 1.1}

    pos = applied(c.put(f"/executed_obs_units/{unit}/finish?wait=true", json={
        "status": "success", "end_time": "2026-11-22T00:02:40Z",
        "metadata": {"exposures": 12}}))["position"]
    r = c.get(f"/executed_obs_units/OU-H?min_position={pos}")
    assert r.status_code == 200
    [ex] = r.json()["executions"]
    assert ex["status"] == "success" and ex["metadata"] == {"airmass": 1.1, "exposures": 12}

    r = c.post("/raw_data_files", json=file_spec("one.fits", 10, unit=unit))
    assert r.status_code == 202 and r.json()["status"] == "accepted"
    assert r.json()["ids"] == {"raw_data_file_id": fid("one.fits")}
    bulk = applied(c.post("/raw_data_files/bulk?wait=true", json={"files": [
        file_spec("two.fits", 20, unit=unit), file_spec("three.fits", 30)]}))
    assert bulk["ids"]["raw_data_file_ids"] == [fid("two.fits"), fid("three.fits")]

    pkg_body = applied(c.post("/raw_data_package?wait=true", json={
        "name": "PKG", "executed_obs_unit_id": unit, "file_ids": [fid("one.fits")],
        "files": [file_spec("four.fits", 40)]}))
    pkg = pkg_body["ids"]["raw_data_package_id"]
    assert pkg_body["ids"]["raw_data_file_ids"] == [fid("four.fits")]
    applied(c.post(f"/raw_data_package/{pkg}/files?wait=true",
                   json={"file_ids": [fid("two.fits"), fid("three.fits")]}))
    pos = applied(c.put(f"/raw_data_package/{pkg}/finalize?wait=true"))["position"]
    r = c.get(f"/raw_data_package/{pkg}?min_position={pos}")
    assert r.status_code == 200
    p = r.json()
    assert (p["status"], p["total_size"], p["file_count"]) == ("complete", 100, 4)
    assert p["finalized_at"] is not None and len(p["files"]) == 4

    r = c.get(f"/raw_data_files/{fid('one.fits')}")
    assert r.status_code == 200 and r.json()["package_id"] == pkg
    r = c.get(f"/raw_data_files?package_id={pkg}&min_position={pos}")
    assert r.status_code == 200 and r.json()["total"] == 4

    stg = applied(c.post("/staging/stage?wait=true", json={
        "package_ids": [pkg], "destination": "archive:/stage/1121"}))["ids"]["staging_id"]
    pos = applied(c.put(f"/staging/{stg}/progress?wait=true", json={
        "status": "in_progress", "bytes_transferred": 25, "files_transferred": 1}))["position"]
    r = c.get(f"/staging/status/{stg}?min_position={pos}")
    assert r.status_code == 200
    s = r.json()
    assert (s["status"], s["bytes_total"], s["progress_percent"]) == ("in_progress", 100, 25.0)
    pos = applied(c.put(f"/staging/{stg}/progress?wait=true", json={
        "status": "completed", "bytes_transferred": 100, "files_transferred": 4}))["position"]
    assert c.get(f"/staging/status/{stg}?min_position={pos}").json()["status"] == "completed"

    stg2 = stage(c, pkg)
    cancel = applied(c.delete(f"/staging/{stg2}?wait=true&reason=not%20needed"))
    r = c.get(f"/staging/status/{stg2}?min_position={cancel['position']}")
    assert r.json()["status"] == "cancelled" and r.json()["message"] == "not needed"

    r = c.get(f"/commands/{cancel['command_id']}")
    assert r.status_code == 200
    cs = r.json()
    assert cs["status"] == "applied" and cs["position"] == cancel["position"]
    assert cs["command_type"] == "staging.cancel" and cs["ids"] == {"staging_id": stg2}

    r = c.get("/executed_obs_units?status=success")
    assert r.status_code == 200 and [i["id"] for i in r.json()["items"]] == [unit]

    r = c.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_command_status_endpoint(client: TestClient, settings: Settings) -> None:
    r = client.put(f"/executed_obs_units/{UNKNOWN}/finish", json={"status": "success"},
                   headers={"Idempotency-Key": "stat-1"})
    assert_error(r, 404)  # refused at once: nothing journaled
    assert_error(client.get("/commands/stat-1"), 404, message="stat-1")

    unit, _ = start(client, "OU-C")
    r = client.put(f"/executed_obs_units/{unit}/finish?wait=true", json={
        "status": "success", "end_time": (T0 - timedelta(hours=1)).isoformat()},
        headers={"Idempotency-Key": "stat-2", **grant(settings, "closer", kind="user")})
    body = assert_error(r, 409, field="end_time", message="before start_time")
    assert body["command_id"] == "stat-2"
    r = client.get("/commands/stat-2")
    assert r.status_code == 200
    cs = r.json()
    assert cs["status"] == "rejected" and cs["position"] is None
    assert cs["reason_code"] == "conflict" and cs["reason_field"] == "end_time"
    assert "before start_time" in cs["reason"] and cs["actor"] == "closer"
    assert cs["attempts"] >= 1 and cs["finished_at"] is not None

    r = client.post("/executed_obs_units/start", json={"obs_unit_id": "OU-D",
                                                       "instrument": "HARPS"})
    assert r.status_code == 202
    cid = r.json()["command_id"]
    deadline = time.monotonic() + 10
    while (cs := client.get(f"/commands/{cid}").json())["status"] == "accepted":
        assert cs["position"] is None
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert cs["status"] == "applied" and cs["position"] >= 1


def test_idempotency_over_http(client: TestClient) -> None:
    h = {"Idempotency-Key": "night-1121:start:OU-7"}
    body = {"obs_unit_id": "OU-7", "instrument": "HARPS"}
    r1 = client.post("/executed_obs_units/start?wait=true", json=body, headers=h)
    first = applied(r1)
    assert "Idempotent-Replayed" not in r1.headers
    r2 = client.post("/executed_obs_units/start?wait=true", json=body, headers=h)
    assert r2.headers["Idempotent-Replayed"] == "true"
    assert applied(r2) == first
    r3 = client.post("/executed_obs_units/start", json={**body, "instrument": "X"}, headers=h)
    assert_error(r3, 409, field="Idempotency-Key")
    r = client.get(f"/executed_obs_units/OU-7?min_position={first['position']}")
    assert len(r.json()["executions"]) == 1


def test_idempotency_keys_are_scoped_to_their_principal(client: TestClient,
                                                         settings: Settings) -> None:
    """Another principal re-sending a key with the same body: 409, nothing of the first
    answer (ids, command type, outcome) in it, nothing journaled; the first principal's
    retry still gets the first answer. On the plain lane and the regular stack."""
    admin = grant(settings, "night-admin", ("admin", "operator", "viewer"), kind="user")
    other = grant(settings, "other-script")
    unit, _ = start(client, "OU-SCOPE")
    sends = [
        ("POST", "/executed_obs_units/start", {"obs_unit_id": "OU-K", "instrument": "HARPS"}),
        ("POST", "/raw_data_files/bulk", {"files": [file_spec("scoped.fits")]}),
        ("PUT", f"/executed_obs_units/{unit}/finish", {"status": "success"}),
    ]
    for i, (method, path, body) in enumerate(sends):
        key = {"Idempotency-Key": f"admin-key-{i}"}
        first = client.request(method, path + "?wait=true", json=body, headers={**admin, **key})
        answer = applied(first)
        depth = client.get("/health").json()["journal"]["commands"]
        for query in ("", "?wait=true"):
            r = client.request(method, path + query, json=body, headers={**other, **key})
            refused = assert_error(r, 409, field="Idempotency-Key", message="another principal")
            text = r.text
            assert all(str(v) not in text for v in answer["ids"].values()), text
            assert "executed_obs_unit" not in text and "raw_data_file" not in text, text
            assert "Location" not in r.headers and "Idempotent-Replayed" not in r.headers
            assert set(refused) == {"detail", "status_code", "errors"}
        assert client.get("/health").json()["journal"]["commands"] == depth
        again = client.request(method, path + "?wait=true", json=body, headers={**admin, **key})
        assert again.headers["Idempotent-Replayed"] == "true" and applied(again) == answer


def test_another_principal_reusing_a_key_through_another_journal_is_refused(
        settings: Settings, tmp_path: Path) -> None:
    """Two API processes, each with its own journal: the second does not know the key, so
    the dispatcher finds the first principal's receipt and rejects the command (409 with
    wait) instead of calling it applied; the same principal's replay stays applied."""
    import asyncio

    from bootstrap.ledger import Ledger

    first = Ledger(settings, workers=False)
    second = Ledger(settings.model_copy(update={
        "journal_path": tmp_path / "second-journal.sqlite3"}), workers=False)
    try:
        request = StartExecutedObsUnitRequest(obs_unit_id="OU-TWIN", instrument="HARPS")

        async def submit(ledger: Ledger, actor: str) -> None:
            await ledger.commands.submit("executed_obs_unit.start", request, actor=actor,
                                         correlation_id=None, idempotency_key="twin-key")
        for ledger, actor in ((first, "admin"), (second, "service:other")):
            asyncio.run(submit(ledger, actor))
            assert ledger.dispatcher is not None
            ledger.dispatcher.drain(timeout=30)
        mine, theirs = first.journal.get("twin-key"), second.journal.get("twin-key")
        assert mine is not None and mine.status == "applied"
        assert theirs is not None and theirs.status == "rejected", theirs
        assert theirs.reason_code == "idempotency_conflict"
        assert theirs.reason_field == "Idempotency-Key" and theirs.position is None
        assert "another principal" in (theirs.reason or "")
        # the same principal through the other journal: a replay, applied once
        third = Ledger(settings.model_copy(update={
            "journal_path": tmp_path / "third-journal.sqlite3"}), workers=False)
        try:
            asyncio.run(submit(third, "admin"))
            assert third.dispatcher is not None
            third.dispatcher.drain(timeout=30)
            again = third.journal.get("twin-key")
            assert again is not None and (again.status, again.position) == (
                "applied", mine.position)
        finally:
            third.stop()
    finally:
        first.stop()
        second.stop()


# -- errors ----------------------------------------------------------------------------------
BAD_REQUESTS: list[tuple[str, str, str, Any, str]] = [
    ("wrong type", "POST", "/executed_obs_units/start",
     {"obs_unit_id": 12, "instrument": "HARPS"}, "obs_unit_id"),
    ("wrong type in metadata", "POST", "/executed_obs_units/start",
     {"obs_unit_id": "OU", "instrument": "HARPS", "metadata": [1, 2]}, "metadata"),
    ("naive start time", "POST", "/executed_obs_units/start",
     {"obs_unit_id": "OU", "instrument": "HARPS", "start_time": "2026-11-21T23:00:00"},
     "start_time"),
    ("start time out of range in UTC", "POST", "/executed_obs_units/start",
     {"obs_unit_id": "OU", "instrument": "HARPS", "start_time": "0001-01-01T00:00:00+01:00"},
     "start_time"),
    ("unknown field", "POST", "/executed_obs_units/start",
     {"obs_unit_id": "OU", "instrument": "HARPS", "telescope": "UT1"}, "telescope"),
    ("missing field", "POST", "/executed_obs_units/start", {"instrument": "HARPS"},
     "obs_unit_id"),
    ("empty string", "POST", "/executed_obs_units/start",
     {"obs_unit_id": "", "instrument": "HARPS"}, "obs_unit_id"),
    ("NUL character", "POST", "/executed_obs_units/start",
     {"obs_unit_id": "OU\u0000", "instrument": "HARPS"}, "obs_unit_id"),
    ("NUL character in metadata", "POST", "/executed_obs_units/start",
     {"obs_unit_id": "OU", "instrument": "HARPS", "metadata": {"k": ["\u0000"]}},
     "metadata.k.0"),
    ("integer over 64 bits", "POST", "/executed_obs_units/start",
     {"obs_unit_id": "OU", "instrument": "HARPS", "metadata": {"k": 2**64}}, "metadata.k"),
    ("invalid finish status", "PUT", f"/executed_obs_units/{UNKNOWN}/finish",
     {"status": "running"}, "status"),
    ("bad id in path", "PUT", "/executed_obs_units/not-a-uuid/finish",
     {"status": "success"}, "path.id"),
    ("string size", "POST", "/raw_data_files", file_spec("a", size="big"), "size"),
    ("negative size", "POST", "/raw_data_files", file_spec("a", size=-1), "size"),
    ("size over 64 bits", "POST", "/raw_data_files", file_spec("a", size=2**70), "size"),
    ("short checksum", "POST", "/raw_data_files",
     file_spec("a", checksum={"algorithm": "sha256", "value": "ab" * 31}), "checksum"),
    ("md5 length for sha1", "POST", "/raw_data_files",
     file_spec("a", checksum={"algorithm": "sha1", "value": "0" * 32}), "checksum"),
    ("non-hex checksum", "POST", "/raw_data_files",
     file_spec("a", checksum={"algorithm": "md5", "value": "z" * 32}), "checksum.value"),
    ("unknown checksum algorithm", "POST", "/raw_data_files",
     file_spec("a", checksum={"algorithm": "crc64", "value": "0" * 16}),
     "checksum.algorithm"),
    ("absolute path", "POST", "/raw_data_files",
     file_spec("a", relative_path="/data/a.fits"), "relative_path"),
    ("parent in path", "POST", "/raw_data_files",
     file_spec("a", relative_path="night/../../etc/passwd"), "relative_path"),
    ("parent path", "POST", "/raw_data_files", file_spec("a", relative_path=".."),
     "relative_path"),
    ("bad file in bulk", "POST", "/raw_data_files/bulk",
     {"files": [file_spec(f"f{i}") for i in range(3)] + [file_spec("f3", size=-5)]},
     "files.3.size"),
    ("empty bulk", "POST", "/raw_data_files/bulk", {"files": []}, "files"),
    ("files not a list", "POST", "/raw_data_files/bulk", {"files": {"a": 1}}, "files"),
    ("package file_ids repeated", "POST", "/raw_data_package",
     {"name": "p", "file_ids": [fid("x"), fid("x")]}, "body"),
    ("package file_ids not uuids", "POST", "/raw_data_package",
     {"name": "p", "file_ids": ["nope"]}, "file_ids.0"),
    ("add no files", "POST", f"/raw_data_package/{UNKNOWN}/files", {"file_ids": []},
     "file_ids"),
    ("stage nothing", "POST", "/staging/stage", {"package_ids": [], "destination": "d"},
     "package_ids"),
    ("stage a package twice", "POST", "/staging/stage",
     {"package_ids": [UNKNOWN, UNKNOWN], "destination": "d"}, "package_ids"),
    ("negative progress", "PUT", f"/staging/{UNKNOWN}/progress",
     {"bytes_transferred": -1, "files_transferred": 0}, "bytes_transferred"),
    ("cancel through progress", "PUT", f"/staging/{UNKNOWN}/progress",
     {"status": "cancelled", "bytes_transferred": 0, "files_transferred": 0}, "status"),
    ("body is a list", "POST", "/executed_obs_units/start", [1, 2], "body"),
]


def test_validation_errors(client: TestClient) -> None:
    for what, method, path, body, field in BAD_REQUESTS:
        r = client.request(method, path, content=json.dumps(body),
                           headers={"Content-Type": "application/json"})
        try:
            assert_error(r, 422, field=field)
        except AssertionError as e:
            raise AssertionError(f"{what}: {e}") from None
    assert client.get("/health").json()["journal"]["commands"] == {}, "nothing journaled"


QUERY_ERRORS = [
    ("/executed_obs_units?limit=0", "query.limit"),
    ("/executed_obs_units?limit=1001", "query.limit"),
    ("/executed_obs_units?offset=-1", "query.offset"),
    ("/executed_obs_units?status=exploded", "query.status"),
    ("/executed_obs_units?start_from=yesterday", "query.start_from"),
    ("/executed_obs_units?min_position=-1", "query.min_position"),
    ("/raw_data_files?package_id=nope", "query.package_id"),
    ("/raw_data_files/not-a-uuid", "path.id"),
    (f"/staging/{UNKNOWN}?reason=%00", "query.reason"),
]


def test_conflicts_within_a_request_are_409(client: TestClient) -> None:
    """What a JSON schema cannot say of a request (two files of one name and instrument, a
    file both registered and named): the conflict a registered file would be, 409."""
    for path, body, field in [
            ("/raw_data_files/bulk", {"files": [file_spec("x"), file_spec("x")]},
             "files.1.name"),
            ("/raw_data_package", {"name": "p", "files": [file_spec("x"), file_spec("x")]},
             "files.1.name"),
            ("/raw_data_package", {"name": "p", "file_ids": [fid("x")],
                                   "files": [file_spec("x")]}, "file_ids")]:
        for content_type in ("application/json", "application/json; charset=utf-8"):
            r = client.post(path, content=json.dumps(body),
                            headers={"Content-Type": content_type})  # the lane, the stack
            assert_error(r, 409, field=field)
    assert client.get("/health").json()["journal"]["commands"] == {}, "nothing journaled"


def test_query_times_beyond_utc_are_its_ends(client: TestClient) -> None:
    """A bound before the first (after the last) time UTC holds selects what that first
    (last) time selects."""
    unit, position = start(client, "OU-EDGE")
    for query in ("start_from=0001-01-01T00:00:00%2B01:00",
                  "start_to=9999-12-31T23:59:59-05:00"):
        r = client.get(f"/executed_obs_units?{query}&min_position={position}")
        assert r.status_code == 200, (query, r.text)
        assert [i["id"] for i in r.json()["items"]] == [unit], (query, r.text)


def test_query_parameter_errors(client: TestClient) -> None:
    for path, field in QUERY_ERRORS:
        method = "DELETE" if path.startswith("/staging/") else "GET"
        assert_error(client.request(method, path), 422, field=field)


UNKNOWN_TARGETS = [
    ("PUT", f"/executed_obs_units/{UNKNOWN}/finish", {"status": "success"},
     "executed obs unit"),
    ("PUT", f"/raw_data_package/{UNKNOWN}/finalize", None, "raw data package"),
    ("POST", f"/raw_data_package/{UNKNOWN}/files", {"file_ids": [UNKNOWN]},
     "raw data package"),
    ("DELETE", f"/staging/{UNKNOWN}", None, "staging request"),
    ("PUT", f"/staging/{UNKNOWN}/progress", {"bytes_transferred": 0, "files_transferred": 0},
     "staging request"),
    ("GET", f"/executed_obs_units/execution/{UNKNOWN}", None, "executed obs unit"),
    ("GET", f"/raw_data_files/{UNKNOWN}", None, "raw data file"),
    ("GET", f"/raw_data_package/{UNKNOWN}", None, "raw data package"),
    ("GET", f"/staging/status/{UNKNOWN}", None, "staging request"),
    ("GET", "/commands/never-sent", None, "command"),
]


def test_unknown_ids_are_404(client: TestClient) -> None:
    for method, path, body, what in UNKNOWN_TARGETS:
        r = client.request(method, path + ("?wait=true" if method != "GET" else ""),
                           json=body)
        assert_error(r, 404, message=f"{what} ")
        assert r.json()["detail"].endswith("not found"), r.json()


def test_references_to_unknown_entities_are_404_once_waited_for(client: TestClient) -> None:
    r = client.post("/raw_data_files?wait=true",
                    json=file_spec("orphan.fits", unit=UNKNOWN))
    assert_error(r, 404, field="files.0.executed_obs_unit_id", message=UNKNOWN)
    r = client.post("/staging/stage?wait=true",
                    json={"package_ids": [UNKNOWN], "destination": "d"})
    assert_error(r, 404, field="package_ids.0")


def test_finishing_twice_is_409(client: TestClient) -> None:
    unit, _ = start(client, "OU-2X")
    applied(client.put(f"/executed_obs_units/{unit}/finish?wait=true",
                       json={"status": "success"}))
    r = client.put(f"/executed_obs_units/{unit}/finish?wait=true", json={"status": "failed"})
    assert_error(r, 409, message="success")

    unit, _ = start(client, "OU-FLIGHT")
    # the second finish is refused whether the first is still pending or already applied
    r1 = client.put(f"/executed_obs_units/{unit}/finish", json={"status": "success"})
    r2 = client.put(f"/executed_obs_units/{unit}/finish?wait=true", json={"status": "aborted"})
    assert r1.status_code == 202
    assert_error(r2, 409)


def test_cancelling_a_completed_staging_is_409(client: TestClient) -> None:
    pkg, _ = complete_package(client, ["s1.fits"])
    stg = stage(client, pkg)
    applied(client.put(f"/staging/{stg}/progress?wait=true", json={
        "status": "completed", "bytes_transferred": 100, "files_transferred": 1}))
    r = client.delete(f"/staging/{stg}?wait=true")
    assert_error(r, 409, message="completed")
    r = client.put(f"/staging/{stg}/progress?wait=true", json={
        "status": "in_progress", "bytes_transferred": 100, "files_transferred": 1})
    assert_error(r, 409)


def test_an_operator_retries_a_failed_staging_request(client: TestClient) -> None:
    pkg, _ = complete_package(client, ["r1.fits"])
    stg = stage(client, pkg)
    applied(client.put(f"/staging/{stg}/progress?wait=true", json={
        "status": "failed", "bytes_transferred": 60, "files_transferred": 0,
        "message": "destination disk full"}))
    r = client.post(f"/staging/{stg}/retry", json={"reason": "disk replaced"})
    assert r.status_code == 202, r.text
    shown = client.get(f"/staging/status/{stg}").json()  # read your own write
    assert (shown["status"], shown["bytes_transferred"], shown["message"]) == (
        "pending", 0, "disk replaced")
    deadline = time.monotonic() + 30
    while client.get(f"/commands/{r.json()['command_id']}").json()["status"] != "applied":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get(f"/staging/status/{stg}").json()["pending"] is False
    assert_error(client.post(f"/staging/{stg}/retry?wait=true", json={}), 409,
                 field="status", message="only a failed request")
    applied(client.put(f"/staging/{stg}/progress?wait=true", json={
        "status": "completed", "bytes_transferred": 100, "files_transferred": 1}))
    assert_error(client.post(f"/staging/{stg}/retry?wait=true", json={}), 409,
                 message="completed")
    assert_error(client.post(f"/staging/{UNKNOWN}/retry?wait=true", json={}), 404)
    assert_error(client.post(f"/staging/{stg}/retry", json={"reason": "x" * 2001}), 422,
                 field="reason")


def test_domain_refusals_over_http(client: TestClient) -> None:
    pkg, _ = complete_package(client, ["d1.fits", "d2.fits"], [10, 20])
    stg = stage(client, pkg)
    r = client.put(f"/staging/{stg}/progress?wait=true", json={
        "bytes_transferred": 31, "files_transferred": 0})
    assert_error(r, 422, field="bytes_transferred", message="exceeds")
    building = applied(client.post("/raw_data_package?wait=true", json={
        "name": "b", "files": [file_spec("d3.fits")]}))["ids"]["raw_data_package_id"]
    r = client.post("/staging/stage?wait=true",
                    json={"package_ids": [building], "destination": "d"})
    assert_error(r, 409, field="package_ids", message="only complete packages")
    r = client.post(f"/raw_data_package/{building}/files?wait=true",
                    json={"file_ids": [fid("d1.fits")]})
    assert_error(r, 409, field="file_ids", message="already belongs")
    r = client.post("/raw_data_files?wait=true", json=file_spec("d1.fits"))
    assert_error(r, 409, message="d1.fits")


def test_malformed_json_is_400(client: TestClient) -> None:
    for body in [b"{", b'{"obs_unit_id": "OU",', b"\xff\xfe", b"{'a': 1}",
                 b'{"obs_unit_id": "OU"} trailing']:
        for path in ("/executed_obs_units/start", f"/staging/{UNKNOWN}/progress"):
            method = "POST" if path.endswith("start") else "PUT"
            r = client.request(method, path, content=body,
                               headers={"Content-Type": "application/json"})
            assert_error(r, 400, field="body", message="malformed JSON")


BAD_HEADERS = [
    ("Idempotency-Key", "has space"),
    ("Idempotency-Key", "semi;colon"),
    ("Idempotency-Key", "x" * 201),
    ("Idempotency-Key", "quote\"d"),
    ("X-Correlation-ID", "a,b"),
]


def test_bad_header_characters_are_422(client: TestClient) -> None:
    for header, value in BAD_HEADERS:
        r = client.post("/executed_obs_units/start",
                        json={"obs_unit_id": "OU", "instrument": "H"}, headers={header: value})
        assert_error(r, 422, field=header)
    assert client.get("/health").json()["journal"]["depth"] == 0


def test_configured_limits(make_client: Callable[..., TestClient]) -> None:
    c = make_client(max_body_bytes=2048, max_bulk_files=2, package_size_limit_bytes=1000)
    # a body over max_body_bytes: 413, declared or streamed
    big = {"files": [file_spec(f"big{i}.fits") for i in range(20)]}
    assert len(json.dumps(big)) > 2048
    assert_error(c.post("/raw_data_files/bulk", json=big), 413, field="body",
                 message="2048 bytes")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        data = json.dumps(big).encode()
        for i in range(0, len(data), 500):
            yield data[i:i + 500]

    assert_error(c.post("/raw_data_files/bulk", content=chunks(),
                        headers={"Content-Type": "application/json"}), 413)
    assert c.get("/health").json()["journal"]["commands"] == {}
    small = {"files": [file_spec("small.fits")]}
    assert c.post("/raw_data_files/bulk", json=small).status_code == 202

    # more files than max_bulk_files
    r = c.post("/raw_data_files/bulk", json={"files": [file_spec(f"m{i}") for i in range(3)]})
    assert_error(r, 422, field="files", message="at most 2 files")

    # the package size limit, at creation, when adding files, at finalization
    r = c.post("/raw_data_package?wait=true", json={
        "name": "too-big", "files": [file_spec("l1.fits", 600), file_spec("l2.fits", 401)]})
    body = assert_error(r, 422, field="total_size")
    assert "1001 bytes" in body["detail"] and "limit of 1000 bytes" in body["detail"]
    assert_error(c.get(f"/raw_data_files/{fid('l1.fits')}"), 404)  # none registered

    pkg = applied(c.post("/raw_data_package?wait=true", json={
        "name": "fits", "files": [file_spec("l1.fits", 600)]}))["ids"]["raw_data_package_id"]
    applied(c.post("/raw_data_files?wait=true", json=file_spec("l3.fits", 401)))
    r = c.post(f"/raw_data_package/{pkg}/files?wait=true", json={"file_ids": [fid("l3.fits")]})
    assert_error(r, 422, message="limit of 1000 bytes")
    applied(c.post("/raw_data_files?wait=true", json=file_spec("l4.fits", 400)))
    applied(c.post(f"/raw_data_package/{pkg}/files?wait=true",
                   json={"file_ids": [fid("l4.fits"), fid("l4.fits")]}))  # counted once
    pos = applied(c.put(f"/raw_data_package/{pkg}/finalize?wait=true"))["position"]
    p = c.get(f"/raw_data_package/{pkg}?min_position={pos}").json()
    assert (p["total_size"], p["file_count"], p["status"]) == (1000, 2, "complete")


# -- lists -----------------------------------------------------------------------------------
def test_executed_obs_units_filters_and_pages(client: TestClient) -> None:
    c = client
    units = {}
    for i, (inst, status) in enumerate([("HARPS", "success"), ("HARPS", "failed"),
                                        ("ESPRESSO", "success"), ("HARPS", None),
                                        ("ESPRESSO", "aborted")]):
        uid, _ = start(c, f"OU-{i}", inst, T0 + timedelta(hours=i))
        units[i] = uid
        if status:
            pos = applied(c.put(f"/executed_obs_units/{uid}/finish?wait=true", json={
                "status": status, "end_time": (T0 + timedelta(hours=i, minutes=30)).isoformat()
            }))["position"]
    pos = applied(c.post("/executed_obs_units/start?wait=true", json={
        "obs_unit_id": "OU-0", "instrument": "HARPS",
        "start_time": (T0 + timedelta(hours=5)).isoformat()}))["position"]

    def ids(query: str) -> list[str]:
        r = c.get(f"/executed_obs_units?{query}&min_position={pos}")
        assert r.status_code == 200, r.text
        page = r.json()
        assert page["read_model_position"] >= pos and page["pending_count"] == 0
        return [i["id"] for i in page["items"]]

    everything = ids("limit=100")
    assert len(everything) == 6
    assert everything[1:] == [units[i] for i in (4, 3, 2, 1, 0)]  # newest start first
    assert ids("status=success") == [units[2], units[0]]
    assert ids("status=running") == [everything[0], units[3]]
    assert ids("instrument=ESPRESSO") == [units[4], units[2]]
    assert ids("instrument=HARPS&status=failed") == [units[1]]
    assert ids("obs_unit_id=OU-0") == [everything[0], units[0]]
    frm = (T0 + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    to = (T0 + timedelta(hours=3)).isoformat().replace("+00:00", "Z")
    assert ids(f"start_from={frm}&start_to={to}") == [units[2], units[1]]  # [from, to)
    chile = "2026-11-21T22:00:00-03:00"  # = T0 + 2h in UTC
    assert ids(f"start_from={chile.replace('+', '%2B')}") == everything[:4]
    assert ids("start_to=2026-11-21T23:00:00") == []  # naive is UTC; start_to is exclusive
    r = c.get(f"/executed_obs_units?limit=2&offset=2&min_position={pos}").json()
    assert [i["id"] for i in r["items"]] == everything[2:4]
    assert (r["total"], r["limit"], r["offset"]) == (6, 2, 2)
    r = c.get(f"/executed_obs_units?limit=2&offset=6&min_position={pos}").json()
    assert r["items"] == [] and r["total"] == 6
    r = c.get(f"/executed_obs_units?instrument=HARPS&limit=1&min_position={pos}").json()
    assert r["total"] == 4 and len(r["items"]) == 1


def test_raw_data_files_filters_and_pages(client: TestClient) -> None:
    c = client
    u1, _ = start(c, "OU-F1")
    u2, _ = start(c, "OU-F2")
    applied(c.post("/raw_data_files/bulk?wait=true", json={"files": [
        file_spec(f"u1-{i}.fits", unit=u1, created_at=(T0 + timedelta(minutes=i)).isoformat())
        for i in range(5)] + [file_spec("u2.fits", unit=u2), file_spec("loose.fits")]}))
    pkg = applied(c.post("/raw_data_package?wait=true", json={
        "name": "P", "executed_obs_unit_id": u1,
        "file_ids": [fid("u1-0.fits"), fid("u1-1.fits")]}))
    pos = pkg["position"]
    pid = pkg["ids"]["raw_data_package_id"]

    def page(query: str) -> dict[str, Any]:
        r = c.get(f"/raw_data_files?{query}&min_position={pos}")
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    p = page(f"executed_obs_unit_id={u1}")
    assert p["total"] == 5
    assert [i["name"] for i in p["items"]] == [f"u1-{i}.fits" for i in (4, 3, 2, 1, 0)]
    assert [i["name"] for i in page(f"executed_obs_unit_id={u2}")["items"]] == ["u2.fits"]
    p = page(f"package_id={pid}")
    assert p["total"] == 2 and {i["name"] for i in p["items"]} == {"u1-0.fits", "u1-1.fits"}
    assert all(i["package_id"] == pid for i in p["items"])
    p = page(f"executed_obs_unit_id={u1}&limit=2&offset=1")
    assert [i["name"] for i in p["items"]] == ["u1-3.fits", "u1-2.fits"] and p["total"] == 5
    assert page("limit=1000")["total"] == 7
    assert page(f"executed_obs_unit_id={UNKNOWN}")["items"] == []
    assert [i["name"] for i in page("name=loose.fits")["items"]] == ["loose.fits"]


def test_lists_show_pending_commands(make_client: Callable[..., TestClient]) -> None:
    c = make_client(embedded_projector=False)  # nothing is projected: all stays pending
    r = c.post("/executed_obs_units/start?wait=true", json={"obs_unit_id": "OU-P",
                                                            "instrument": "HARPS"})
    body = applied(r)
    page = c.get("/executed_obs_units").json()
    assert page["total"] == 0 and page["pending_count"] == 1
    [item] = page["items"]
    assert item["id"] == body["ids"]["executed_obs_unit_id"]
    assert item["pending"] is True and item["command_status"] == "applied"
    assert item["pending_command_ids"] == [body["command_id"]]
    assert c.get("/executed_obs_units?offset=1").json()["items"] == []
    assert c.get("/executed_obs_units?status=success").json()["items"] == []
    assert c.get("/health").json()["projector"]["lag_events"] == 2


# -- operations and documentation ------------------------------------------------------------
def test_health_shape(client: TestClient) -> None:
    _, pos = start(client, "OU-HEALTH")
    deadline = time.monotonic() + 10
    while (h := client.get("/health").json())["projector"]["position"] < pos:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert set(h) == {"status", "down", "parts", "store", "journal", "dispatcher", "projector",
                      "kafka", "results", "downloader", "processing_worker", "object_store",
                      "request_audit", "processes"}
    assert h["processes"] is None  # alone: no journal slots (tests/faults/test_scaleout.py)
    assert h["request_audit"]["writer"] == "running"
    assert h["request_audit"]["writer_errors"] == 0 and h["request_audit"]["dropped"] == 0
    assert h["down"] == []
    assert {p: v["reachable"] for p, v in h["parts"].items()} == {
        "event_store": True, "read_models": True, "accounts": True}
    assert h["results"] == {"process_manager_position": h["results"][
        "process_manager_position"], "runs_requested": 0, "last_error": None}
    assert h["status"] == "ok"
    # no OBSLEDGER_KAFKA_BOOTSTRAP: no relay (tests/integration/test_kafka.py)
    assert h["kafka"] is None
    assert h["store"]["reachable"] is True and h["store"]["head_position"] == pos
    assert h["store"]["kind"] in ("sqlite", "postgres")
    assert h["journal"]["depth"] == 0 and h["journal"]["oldest_pending_age_s"] is None
    assert h["journal"]["commands"] == {"applied": 1}
    assert h["dispatcher"] == {"embedded": True, "store_reachable": True, "last_error": None}
    assert h["projector"] == {"source": "log", "position": pos, "lag_events": 0,
                              "last_error": None}


ROUTES = {
    ("post", "/executed_obs_units/start"), ("put", "/executed_obs_units/{id}/finish"),
    ("post", "/raw_data_files"), ("post", "/raw_data_files/bulk"),
    ("post", "/raw_data_package"), ("post", "/raw_data_package/{id}/files"),
    ("put", "/raw_data_package/{id}/finalize"), ("post", "/staging/stage"),
    ("put", "/staging/{id}/progress"), ("delete", "/staging/{id}"),
    ("get", "/executed_obs_units"), ("get", "/executed_obs_units/execution/{id}"),
    ("get", "/executed_obs_units/{obs_unit_id}"), ("get", "/raw_data_files"),
    ("get", "/raw_data_files/{id}"), ("get", "/raw_data_package/{id}"),
    ("get", "/staging/status/{id}"), ("get", "/commands/{command_id}"), ("get", "/health"),
    ("post", "/observation_results/materialize"), ("post", "/observation_results/{id}/dispatch"),
    ("put", "/observation_results/{id}/tasks/{task_id}"),
    ("post", "/observation_results/{id}/cancel"), ("post", "/observation_results/{id}/assets"),
    ("post", "/observation_results/{id}/runs"),
    ("put", "/observation_results/{id}/runs/{run_id}"), ("get", "/observation_results"),
    ("get", "/observation_results/due"), ("get", "/observation_results/counts"),
    ("get", "/observation_results/{id}"),
    ("post", "/ops/plan"), ("post", "/ops/ingest"), ("post", "/ops/process"),
    ("post", "/ops/catalog"), ("get", "/ops/jobs"), ("get", "/ops/jobs/{id}"),
    ("delete", "/ops/jobs/{id}"), ("get", "/ops/algorithms"), ("get", "/products"),
    ("get", "/products/{id}"), ("get", "/products/{id}/download"),
    ("get", "/products/{id}/lineage"),
}
REQUEST_MODELS: dict[str, type[BaseModel]] = {
    "StartExecutedObsUnitRequest": StartExecutedObsUnitRequest,
    "FinishExecutedObsUnitRequest": FinishExecutedObsUnitRequest,
    "RegisterRawDataFileRequest": RegisterRawDataFileRequest,
    "BulkRegisterRawDataFilesRequest": BulkRegisterRawDataFilesRequest,
    "CreateRawDataPackageRequest": CreateRawDataPackageRequest,
    "AddFilesToPackageRequest": AddFilesToPackageRequest,
    "StageRequest": StageRequest,
    "StagingProgressRequest": StagingProgressRequest,
    "RetryStagingRequest": RetryStagingRequest,
    "MaterializeObservationResultsRequest": MaterializeObservationResultsRequest,
    "DispatchObservationResultRequest": DispatchObservationResultRequest,
    "TaskOutcomeRequest": TaskOutcomeRequest,
    "CancelObservationResultRequest": CancelObservationResultRequest,
    "ContributeAssetRequest": ContributeAssetRequest,
    "StartProcessingRunRequest": StartProcessingRunRequest,
    "EndProcessingRunRequest": EndProcessingRunRequest,
    "TargetSearch": TargetSearch, "CoordinateSearch": CoordinateSearch,
    "ObservationSearch": ObservationSearch, "ProgramSearch": ProgramSearch,
    "StartDownloadRequest": StartDownloadRequest,
    "PlanRequest": PlanRequest, "IngestRequest": IngestRequest,
    "ProcessRequest": ProcessRequest, "CatalogRequest": CatalogRequest,
}


def test_openapi_schema_and_docs(client: TestClient) -> None:
    r = client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    routes = {(m, p) for p, ops in spec["paths"].items() for m in ops}
    assert routes >= ROUTES, ROUTES - routes
    schemas = spec["components"]["schemas"]
    bodies = set()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert op.get("summary"), (method, path)
            if "requestBody" not in op or path.startswith("/auth/"):  # commands only here
                continue
            media = op["requestBody"]["content"]["application/json"]
            # a model, or (POST /raw_data_files/bulk) a model or a bare list of its items
            name = (media["schema"].get("$ref") or media["schema"]["anyOf"][0]["$ref"]
                    ).rsplit("/", 1)[-1]
            bodies.add(name)
            examples = media.get("examples") or schemas[name].get("examples") or (
                [media["example"]] if "example" in media else [])
            assert examples, f"{method.upper()} {path}: {name} has no example"
            for example in examples:
                example = example.get("value", example) if "value" in example else example
                REQUEST_MODELS[name].model_validate(example)  # the example is valid
            answer = "200" if path.startswith(("/mast/search/", "/ops/plan")) else "202"
            assert {answer, "422"} <= set(op["responses"]), (method, path)
    assert bodies == set(REQUEST_MODELS)

    # the documented examples, sent as they are, get through validation
    for name in ("StartExecutedObsUnitRequest", "RegisterRawDataFileRequest"):
        path = {"StartExecutedObsUnitRequest": "/executed_obs_units/start",
                "RegisterRawDataFileRequest": "/raw_data_files"}[name]
        r = client.post(path, json=schemas[name]["examples"][0])
        assert r.status_code == 202, r.text

    # degraded answers (tests/faults/test_degraded.py): the header of a smart query's 200, the
    # Retry-After of a 503, the fields saying where the answer comes from
    smart = ("/executed_obs_units", "/executed_obs_units/execution/{id}",
             "/executed_obs_units/{obs_unit_id}", "/raw_data_files", "/raw_data_files/{id}",
             "/raw_data_package/{id}", "/staging/status/{id}", "/observation_results",
             "/observation_results/{id}", "/mast/download/progress/{job_id}",
             "/mast/download/jobs", "/mast/download/resumable", "/ops/jobs", "/ops/jobs/{id}")
    for path in smart:
        responses = spec["paths"][path]["get"]["responses"]
        assert "X-Read-Models" in responses["200"]["headers"], path
        assert "Retry-After" in responses["503"]["headers"], path
    for name in ("ExecutedObsUnitView", "RawDataFileView", "RawDataPackageView",
                 "StagingRequestView", "ObservationResultDetail", "RawDataFilePage",
                 "ExecutedObsUnitPage", "ExecutionsOfObsUnit", "DownloadJobView", "JobView"):
        assert schemas[name]["properties"]["read_models"]["enum"] == [
            "available", "unavailable"], name

    r = client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()
    assert_error(client.get("/no/such/route"), 404)
    assert_error(client.patch("/executed_obs_units/start"), 405)


# -- fuzzing ---------------------------------------------------------------------------------
EDGES = st.sampled_from([2**63 - 1, 2**63, -(2**63) - 1, 2**64, 10**30, -1, 0, "", "\x00",
                         "a\x00b", "..", "/abs", "0001-01-01T00:00:00+01:00",
                         "9999-12-31T23:59:59-01:00", "2026-11-21T23:00:00", UNKNOWN, 1e308])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20) | EDGES,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
ENDPOINTS = [
    ("POST", "/executed_obs_units/start", {"obs_unit_id": "OU", "instrument": "HARPS",
                                           "start_time": "2026-11-21T23:00:00Z",
                                           "metadata": {"airmass": 1.1, "tags": ["a"]}}),
    ("PUT", "/executed_obs_units/{id}/finish", {"status": "success", "metadata": {"n": 1}}),
    ("POST", "/raw_data_files", file_spec("fz.fits")),
    ("POST", "/raw_data_files/bulk", {"files": [file_spec("fz.fits")]}),
    ("POST", "/raw_data_package", {"name": "p", "files": [file_spec("fz.fits")]}),
    ("POST", "/raw_data_package/{id}/files", {"file_ids": [UNKNOWN]}),
    ("PUT", "/raw_data_package/{id}/finalize", {}),
    ("POST", "/staging/stage", {"package_ids": [UNKNOWN], "destination": "d"}),
    ("PUT", "/staging/{id}/progress", {"bytes_transferred": 0, "files_transferred": 0,
                                       "message": "m"}),
]


def _leaves(base: Any, p: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any]]:
    out: list[tuple[tuple[Any, ...], Any]] = [(p, base)]
    if isinstance(base, dict):
        for k, x in base.items():
            out += _leaves(x, (*p, k))
    elif isinstance(base, list):
        for n, x in enumerate(base):
            out += _leaves(x, (*p, n))
    return out


def _replaced(base: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    body = json.loads(json.dumps(base))
    target = body
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    return body


def _like(value: Any) -> st.SearchStrategy[Any]:
    """Arbitrary values of the type of ``value``: they pass the type checks and reach the
    deeper validators, the domain and the stores."""
    if isinstance(value, bool):
        return st.booleans()
    if isinstance(value, int | float):
        return st.integers() | EDGES.filter(lambda v: isinstance(v, int))
    if isinstance(value, str):
        return st.text(max_size=30) | EDGES.filter(lambda v: isinstance(v, str))
    if isinstance(value, dict):
        return st.dictionaries(st.text(max_size=10), JSON, max_size=3)
    return JSON


@st.composite
def _mutated(draw: st.DrawFn, base: dict[str, Any], typed: bool) -> Any:
    """A valid body with one (possibly nested) value replaced: by arbitrary JSON, or by an
    arbitrary value of the same type."""
    path, old = draw(st.sampled_from(_leaves(base)))
    return _replaced(base, path, draw(_like(old) if typed else JSON))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, str, bytes]:
    method, path, base = draw(st.sampled_from(ENDPOINTS))
    path = path.replace("{id}", draw(st.sampled_from([UNKNOWN, "x", "%00", str(uuid.uuid4())])))
    kind = draw(st.sampled_from(["json", "mutated", "text", "typed", "typed", "typed"]))
    if kind == "text":
        return method, path, draw(st.text(max_size=50)).encode("utf-8", "surrogatepass")
    strategy = {"json": JSON, "mutated": _mutated(base, typed=False),
                "typed": _mutated(base, typed=True)}[kind]
    body = draw(strategy)
    return method, path, json.dumps(body).encode()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(req=requests(), idem=st.one_of(
    st.none(), st.from_regex(r"[A-Za-z0-9._:@/+=-]{1,12}", fullmatch=True),
    st.text(max_size=8)))
def _fuzz(client: TestClient, req: tuple[str, str, bytes], idem: str | None) -> None:
    method, path, body = req
    headers = {"Content-Type": "application/json"}
    if idem:
        headers["Idempotency-Key"] = idem.encode("ascii", "ignore").decode() or "-"
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code < 500, (method, path, body, r.status_code, r.text)
    if r.status_code >= 400:
        data = r.json()
        assert set(data) >= ERROR_KEYS, data
        assert data["status_code"] == r.status_code
        assert isinstance(data["errors"], list)
    else:
        assert r.status_code == 202, r.text


def test_fuzz_command_endpoints(client: TestClient) -> None:
    _fuzz(client)
    # whatever got accepted, the workers digest it: no poison command stalls them
    deadline = time.monotonic() + 20
    while True:
        h = client.get("/health").json()
        if h["journal"]["depth"] == 0 and h["projector"]["lag_events"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.05)
    assert h["projector"]["last_error"] is None and h["dispatcher"]["last_error"] is None
    assert "internal" not in json.dumps(h)
    audit = client.app.state.ledger.request_audit  # type: ignore[attr-defined]
    audit.flush()  # every fuzzed request is in the request audit log, none holds it up
    assert audit.pending == 0 and not audit.failing


# -- the plain command lane ------------------------------------------------------------------
@pytest.fixture
def lane_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Records, for each command request the lane looked at, whether it answered it."""
    from api.app import ObsLedgerAPI

    calls: list[bool] = []
    original = ObsLedgerAPI._plain_lane

    async def spy(self: ObsLedgerAPI, *args: Any) -> Any:
        receive = await original(self, *args)
        calls.append(receive is None)
        return receive

    monkeypatch.setattr(ObsLedgerAPI, "_plain_lane", spy)
    return calls


def test_plain_lane_answers_as_the_regular_stack(client: TestClient,
                                                 lane_calls: list[bool]) -> None:
    body = {"obs_unit_id": "OU-LANE", "instrument": "HARPS", "start_time": T0.isoformat()}
    plain = client.post("/executed_obs_units/start", json=body)
    regular = client.post("/executed_obs_units/start", content=json.dumps(body),
                          headers={"Content-Type": "application/json; charset=utf-8"})
    assert lane_calls == [True, False]  # the second one is not plain: the regular stack
    for r in (plain, regular):
        assert r.status_code == 202, r.text
        answer = r.json()
        assert set(answer) == {"command_id", "status", "ids"} and answer["status"] == "accepted"
        assert r.headers["Location"] == f"/commands/{answer['command_id']}"
        assert r.headers["content-type"] == "application/json"
        # without X-Correlation-ID, the command id is the correlation id
        assert r.headers["X-Correlation-ID"] == answer["command_id"]
    a, b = plain.json()["ids"], regular.json()["ids"]
    assert a["executed_obs_unit_id"] != b["executed_obs_unit_id"]
    status = client.get(f"/commands/{plain.json()['command_id']}").json()
    assert status["correlation_id"] == plain.json()["command_id"]


def test_plain_lane_replays_what_it_does_not_answer(client: TestClient,
                                                    lane_calls: list[bool]) -> None:
    # invalid body: answered by the regular stack, in the error format
    assert_error(client.post("/executed_obs_units/start", json={"instrument": "HARPS"}),
                 422, "obs_unit_id")
    assert_error(client.post("/executed_obs_units/start", content=b"{not json",
                             headers={"Content-Type": "application/json"}), 400)
    # a query other than wait, a malformed context header
    assert_error(client.post("/executed_obs_units/start?wait=maybe",
                             json={"obs_unit_id": "OU-1", "instrument": "HARPS"}),
                 422, "query.wait")
    assert_error(client.post("/executed_obs_units/start",
                             json={"obs_unit_id": "OU-1", "instrument": "HARPS"},
                             headers={"X-Correlation-ID": "a b"}), 422, "X-Correlation-ID")
    assert lane_calls == [False, False, False, False]

    # idempotent repeat: answered by the lane; reuse with another body: refused (409) by the
    # regular stack, and nothing new is journaled
    key = {"Idempotency-Key": "night-1121-lane"}
    first = client.post("/executed_obs_units/start", headers=key,
                        json={"obs_unit_id": "OU-1", "instrument": "HARPS"})
    again = client.post("/executed_obs_units/start", headers=key,
                        json={"obs_unit_id": "OU-1", "instrument": "HARPS"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert_error(client.post("/executed_obs_units/start", headers=key,
                             json={"obs_unit_id": "OU-2", "instrument": "HARPS"}),
                 409, "Idempotency-Key")
    assert lane_calls[4:] == [True, True, False]
    page = client.get("/executed_obs_units", params={"obs_unit_id": "OU-2"}).json()
    assert page["items"] == []


def test_plain_lane_waits_for_the_outcome(client: TestClient, lane_calls: list[bool]) -> None:
    unit, position = start(client, "OU-LANE-WAIT")
    assert lane_calls == [True]
    row = client.get(f"/executed_obs_units/execution/{unit}",
                     params={"min_position": position}).json()
    assert row["pending"] is False and row["obs_unit_id"] == "OU-LANE-WAIT"


# -- JSON that cannot be stored ----------------------------------------------------------------
#: (route, JSON body with free-form JSON at __V__, the free-form field)
FREE_FORM = [
    ("POST", "/executed_obs_units/start",  # a plain request: the lane looks at it first
     '{"obs_unit_id": "OU", "instrument": "HARPS", "metadata": __V__}', "metadata"),
    ("PUT", f"/executed_obs_units/{UNKNOWN}/finish",
     '{"status": "success", "metadata": __V__}', "metadata"),
    ("POST", "/observation_results/materialize",
     '{"observation_id": 1, "request_id": 2, "spec_snapshot": __V__}', "spec_snapshot"),
    ("POST", "/ops/plan", f'{{"file_ids": ["{UNKNOWN}"], "parameters": __V__}}', "parameters"),
    ("PUT", f"/observation_results/{UNKNOWN}/runs/{UNKNOWN}",
     '{"end": "completed", "outputs": [{"name": "a.fits", "kind": "image", "metadata": __V__}]}',
     "outputs.0.metadata"),
]


def nested(levels: int) -> bytes:
    return b'{"x":' * levels + b"1" + b"}" * levels


#: (free-form value as JSON text, the field below the free-form one, words of the message)
UNSTORABLE: list[tuple[bytes, str, str]] = [
    (b'{"x": NaN}', "x", "finite number"),
    (b'{"x": [1, Infinity]}', "x.1", "finite number"),
    (b'{"x": -Infinity}', "x", "finite number"),
    (b'{"x": 1e999}', "x", "finite number"),
    (b'{"x": "a\\udfff"}', "x", "U+DFFF"),
    (b'{"x": ["\\ud800 high"]}', "x.0", "U+D800"),
    (b'{"x": "\xed\xbf\xbf"}', "x", "U+DFFF"),  # the surrogate's bytes, not its escape
    (b'{"\\udfff": 1}', "\\udfff", "in keys"),
    (nested(40), "x...", "deeper than 32"),  # x.x.x… down to level 33
    (nested(300), "x...", "deeper than 32"),
]


@pytest.mark.parametrize("method, path, template, field", FREE_FORM)
def test_json_that_cannot_be_stored_is_422_naming_the_field(
        client: TestClient, lane_calls: list[bool], method: str, path: str, template: str,
        field: str) -> None:
    """NaN, infinities, lone surrogates (escaped or as bytes) and nesting beyond 32 levels in
    free-form JSON: 422 naming the field, on the plain lane and the regular stack, for small
    bodies and for large ones (parsed off the event loop); nothing is journaled."""
    head, tail = template.encode().split(b"__V__")
    level = field.count(".") + 2  # of the free-form value (the body is level 1)
    for value, inner, words in UNSTORABLE:
        if inner == "x...":
            inner = ".".join(["x"] * (33 - level))
        for padding in (b"", b" " * 70_000):  # 70 kB: parsed in a worker thread
            r = client.request(method, path, content=head + value + tail + padding,
                               headers={"Content-Type": "application/json"})
            assert_error(r, 422, field=f"{field}.{inner}", message=words)
    # nested beyond what Python's json module reads: still 422, naming the body
    r = client.request(method, path, content=head + nested(100_000) + tail,
                       headers={"Content-Type": "application/json"})
    assert_error(r, 422, message="deeper than 32")
    assert not any(lane_calls), "the lane answered none of them"
    assert client.get("/health").json()["journal"]["commands"] == {}, "nothing journaled"


def test_other_bodies_refuse_json_that_cannot_be_stored(client: TestClient,
                                                         settings: Settings) -> None:
    """Bodies that are not commands (accounts, searches): lone surrogates, non-finite
    numbers and deep nesting are 422 naming the field too, not a 500 from what reads them."""
    admin = {**grant(settings, "account-admin", ("admin", "viewer")),
             "Content-Type": "application/json"}
    for path, body, field in [
            ("/auth/register", b'{"username": "bob", "password": "abcdefghijkl\\udfff", '
             b'"roles": ["viewer"]}', "password"),
            ("/auth/register", b'{"username": "bob", "password": "abcdefghijkl", '
             b'"roles": ["viewer"], "x": NaN}', "x"),
            ("/mast/search/target", b'{"target": "M\\ud800"}', "target"),
            ("/mast/search/coordinates", b'{"ra": Infinity, "dec": 0}', "ra"),
            ("/auth/service-accounts", b'{"name": ' + nested(40) + b"}", "name" + ".x" * 31)]:
        assert_error(client.post(path, content=body, headers=admin), 422, field=field)


def test_json_at_the_limits_is_accepted(client: TestClient) -> None:
    """32 levels (the body is level 1), surrogate pairs, large finite numbers."""
    accepted = [nested(31), b'{"x": "\\ud83d\\ude00 \xf0\x9f\x94\xad"}', b'{"x": -1.5e308}']
    for value in accepted:
        body = b'{"obs_unit_id": "OU", "instrument": "HARPS", "metadata": ' + value + b"}"
        r = client.post("/executed_obs_units/start?wait=true", content=body,
                        headers={"Content-Type": "application/json"})
        applied(r)
    assert_error(client.post(
        "/executed_obs_units/start", headers={"Content-Type": "application/json"},
        content=b'{"obs_unit_id": "OU", "instrument": "HARPS", "metadata": ' + nested(32)
        + b"}"), 422, message="deeper than 32")
    r = client.get("/audit/events?event_type=Started")
    metadata = [e["data"]["metadata"] for e in r.json()["items"]]
    assert metadata[1] == {"x": "\U0001f600 \U0001f52d"} and metadata[2] == {"x": -1.5e308}


def test_command_line_refuses_what_cannot_be_stored(tmp_path: Path) -> None:
    """Arguments reach the command line as text with lone surrogates when they are not UTF-8
    (``surrogateescape``): refused with a message and exit 2, never a traceback."""
    env = settings_env(make_settings(tmp_path, "sqlite"))
    job = str(uuid.uuid4())
    for args in ([b"cancel", job.encode(), b"--reason", b"lens cap \xff on"],
                 [b"pause", b"not-a-uuid"],
                 [b"start", b"--uri", b"mast:HST/product/a.fits", b"--idempotency-key",
                  b"key-\xff"]):
        done = subprocess.run([sys.executable.encode(), b"-m", b"api.cli", b"download", *args],
                              env=env, cwd=ROOT, capture_output=True, timeout=120)
        stderr = done.stderr.decode("utf-8", "replace")
        assert done.returncode == 2 and "Traceback" not in stderr, (args, stderr)
        assert stderr.startswith("obsledger download"), stderr
        assert args[0] != b"cancel" or "--reason: a lone surrogate (U+DCFF)" in stderr, stderr
    for args in ([b"state", b"not-a-uuid"], [b"trail", b"\xff"]):
        done = subprocess.run([sys.executable.encode(), b"-m", b"api.cli", *args],
                              env=env, cwd=ROOT, capture_output=True, timeout=120)
        stderr = done.stderr.decode("utf-8", "replace")
        assert done.returncode == 2 and "is not an id" in stderr, (args, stderr)
        assert "Traceback" not in stderr, stderr


# -- authentication before the body ------------------------------------------------------------
def body_routes(app: Any) -> list[tuple[str, str, frozenset[str]]]:
    """(method, path with ids filled in, roles) of every route that takes a JSON body and
    declares roles."""
    from fastapi import params
    from fastapi.routing import iter_route_contexts

    out = []
    for route in iter_route_contexts(app.routes):
        original = route.original_route
        field = getattr(original, "body_field", None)
        if field is None or isinstance(field.field_info, params.Form):
            continue
        roles = frozenset(s for d in original.dependencies if isinstance(d, params.Security)
                          for s in d.scopes or ())
        path = route.path
        while "{" in path:
            path = path[:path.index("{")] + UNKNOWN + path[path.index("}") + 1:]
        if roles:
            out.extend((m, path, roles) for m in route.methods)
    return out


def test_no_token_is_401_before_the_body_is_read(client: TestClient) -> None:
    """Every route with a body and roles: no token (or a token without the roles) is 401 (403)
    whatever the body, and the body is never read — not by the plain lane, not by the
    regular stack."""
    import asyncio

    app = client.app
    routes = body_routes(app)
    assert len(routes) > 25 and ("POST", "/executed_obs_units/start",
                                 frozenset({"automation", "operator"})) in routes, routes
    viewer = grant(client.app.state.ledger.settings, "viewer-only", ("viewer",))  # type: ignore[attr-defined]

    async def call(method: str, path: str, headers: list[tuple[bytes, bytes]],
                   body: bytes) -> tuple[int, int]:
        """(status, body messages the app asked for) of one request, at the ASGI level."""
        asked = 0
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal asked
            asked += 1
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": method, "scheme": "http", "path": path, "raw_path": path.encode(),
                 "query_string": b"", "root_path": "", "client": ("127.0.0.1", 9),
                 "server": ("testserver", 80), "state": {},
                 "headers": [(b"content-type", b"application/json"),
                             (b"content-length", str(len(body)).encode()), *headers]}
        await app(scope, receive, send)  # type: ignore[arg-type]
        return status, asked

    malformed = b'{"not json' + b"x" * 100
    for method, path, roles in routes:
        for headers, expected in (([], 401), ([(b"authorization", b"Bearer nope")], 401),
                                  ([(b"authorization", viewer["Authorization"].encode())],
                                   None)):
            if expected is None:  # a viewer: 403 where the roles exclude viewers
                if "viewer" in roles:
                    continue
                expected = 403
            status, asked = asyncio.run(call(method, path, headers, malformed))
            assert (status, asked) == (expected, 0), (method, path, headers, status, asked)
    # over HTTP: the documented 401 in the error format, not the 400 of a malformed body
    for path in ("/executed_obs_units/start", "/raw_data_files/bulk"):
        r = client.post(path, content=malformed, headers={
            "Content-Type": "application/json", "Authorization": ""})
        assert_error(r, 401)


# -- routing: fixed paths first, 405 with Allow ------------------------------------------------
def test_wrong_methods_are_405_with_allow(client: TestClient) -> None:
    """A fixed path is never taken for a template's parameter: a method it does not declare
    is 405 naming every method of the path, not the sibling route's 422 for a bad id."""
    spec = client.get("/openapi.json").json()
    methods = {"get", "put", "post", "delete", "patch", "options"}
    checked = 0
    for template, operations in spec["paths"].items():
        declared = {m.upper() for m in operations if m in methods}
        path = template.replace("{obs_unit_id}", "OU-1")
        while "{" in path:
            path = path[:path.index("{")] + UNKNOWN + path[path.index("}") + 1:]
        for method in sorted(methods - {m.lower() for m in declared}):
            r = client.request(method.upper(), path)
            assert_error(r, 405)
            assert set(r.headers["Allow"].split(", ")) == declared, (method, path, r.headers)
            checked += 1
    assert checked > 200
    for method, path, allow in [("DELETE", "/staging/stage", "POST"),
                                ("GET", "/raw_data_files/bulk", "POST"),
                                ("GET", "/executed_obs_units/start", "POST"),
                                ("DELETE", "/mast/download/jobs", "GET"),
                                ("PATCH", f"/ops/jobs/{UNKNOWN}", "DELETE, GET"),
                                ("PUT", "/raw_data_files", "GET, POST")]:
        r = client.request(method, path, json={"x": 1})
        assert_error(r, 405)
        assert r.headers["Allow"] == allow, (method, path)
    # every fixed route is reachable with its own methods
    assert client.get("/executed_obs_units").status_code == 200
    assert client.get("/mast/download/jobs").status_code == 200
    assert client.get("/observation_results/due").status_code == 200


# -- the schema and the validation agree ---------------------------------------------------------
SCHEMA_REFUSES: list[tuple[str, str, Any]] = [
    ("POST", "/raw_data_files", file_spec("a", checksum={"value": "0" * 32})),  # sha256: 64
    ("POST", "/raw_data_files", file_spec("a", checksum={"algorithm": "md5",
                                                        "value": "0" * 64})),
    ("POST", "/raw_data_files", file_spec("a", relative_path=" ../etc/passwd")),
    ("POST", "/raw_data_files", file_spec("a", relative_path="night/../../x")),
    ("POST", "/raw_data_files", file_spec(" ")),
    ("POST", "/raw_data_files", file_spec("a", size=2**63)),
    ("POST", "/executed_obs_units/start", {"obs_unit_id": "OU", "instrument": "HARPS",
                                           "metadata": {"a\u0000": 1}}),
    ("POST", "/executed_obs_units/start", {"obs_unit_id": "OU", "instrument": "HARPS",
                                           "metadata": {"a": 2**64}}),
    ("POST", "/executed_obs_units/start", {"obs_unit_id": "OU", "instrument": "HARPS",
                                           "start_time": "0001-01-01T00:00:00+01:00"}),
    ("POST", "/staging/stage", {"package_ids": [UNKNOWN, UNKNOWN], "destination": "d"}),
    ("POST", "/raw_data_package", {"name": "p", "file_ids": [UNKNOWN, UNKNOWN]}),
    ("POST", "/observation_results/materialize",
     {"observation_id": 1, "request_id": 1, "copies": 3}),
    ("POST", "/observation_results/materialize",
     {"observation_id": 1, "request_id": 1, "copies_mode": "all_eligible"}),
    ("POST", "/observation_results/materialize",
     {"observation_id": 1, "request_id": 1, "eligible_instruments": ["A", "A"]}),
    ("PUT", f"/observation_results/{UNKNOWN}/runs/{UNKNOWN}",
     {"end": "failed", "outputs": [{"name": "x", "kind": "y"}]}),
    ("PUT", f"/observation_results/{UNKNOWN}/runs/{UNKNOWN}",
     {"end": "completed", "error": "but it failed"}),
    ("POST", "/ops/ingest", {"file_ids": []}),
    ("POST", "/ops/plan", {"file_ids": [UNKNOWN], "algorithm": "no_such_thing"}),
    ("POST", "/ops/plan", {"file_ids": [UNKNOWN], "parameters": {"sigma": 99}}),
    ("POST", "/mast/download/start", {"products": [{"data_uri": "mast:HST/a.fits"}],
                                      "obs_id": "U9O40504M"}),
    ("POST", "/mast/download/start", {"products": [{"data_uri": "mast:HST/.hidden"}]}),
    ("POST", "/mast/download/start", {"obs_id": "U9", "destination": "../up"}),
    ("POST", "/mast/search/coordinates", {"ra": "", "dec": 0}),
    ("POST", "/mast/search/coordinates", {"ra": "25:00:00", "dec": 0}),
    ("POST", "/mast/search/coordinates", {"ra": 10, "dec": "+90:00:01"}),
]
SCHEMA_ACCEPTS: list[tuple[str, str, Any]] = [
    ("POST", "/raw_data_files", file_spec("sha256-by-default.fits",
                                          checksum={"value": "0" * 64})),
    ("POST", "/raw_data_files", file_spec("spaced.fits", relative_path=" night/a.fits ")),
    ("POST", "/executed_obs_units/start", {"obs_unit_id": "OU", "instrument": "HARPS",
                                           "metadata": {"a": [1.5e18, "x", None, True]},
                                           "start_time": "0001-01-02T00:00:00+23:59"}),
    ("POST", "/observation_results/materialize",
     {"observation_id": 1, "request_id": 1, "copies_mode": "count", "copies": 3}),
    ("PUT", f"/observation_results/{UNKNOWN}/runs/{UNKNOWN}", {"end": "failed",
                                                              "error": "no bias"}),
    ("POST", "/ops/plan", {"result_ids": [UNKNOWN], "algorithm_version": "1.1.0",
                           "parameters": {"sigma": 2.5}}),
]


def test_the_schema_states_what_the_service_refuses(client: TestClient) -> None:
    """Requests the service refuses are invalid by the OpenAPI schema; valid ones are not
    refused (404 for the unknown ids is fine): each rule the issue found missing from the
    schema, checked with a JSON Schema validator against the served schema."""
    from jsonschema import Draft202012Validator

    spec = client.get("/openapi.json").json()

    def validator(method: str, path: str) -> Any:
        template = next(t for t in spec["paths"] if method.lower() in spec["paths"][t]
                        and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", t), path))
        body = spec["paths"][template][method.lower()]["requestBody"]["content"]
        return Draft202012Validator({**body["application/json"]["schema"],
                                     "components": spec["components"]})

    for method, path, body in SCHEMA_REFUSES:
        assert not validator(method, path).is_valid(body), (path, body)
        r = client.request(method, path, json=body)
        assert r.status_code == 422, (path, body, r.text)
    for method, path, body in SCHEMA_ACCEPTS:
        assert validator(method, path).is_valid(body), (
            path, body, [e.message for e in validator(method, path).iter_errors(body)])
        template = next(t for t in spec["paths"] if method.lower() in spec["paths"][t]
                        and re.fullmatch(re.sub(r"\{[^}]+\}", "[^/]+", t), path))
        waits = any(p["name"] == "wait" for p in spec["paths"][template][method.lower()].get(
            "parameters", ()))  # a query parameter an endpoint does not declare is a 422
        r = client.request(method, path + ("?wait=true" if waits else ""), json=body)
        assert r.status_code in (200, 202, 404), (r.text, path, body)
    # two ids in the query of /audit/state are a valid request: bounds combine
    r = client.get(f"/audit/state/{UNKNOWN}?version=1&recorded_at=2026-11-21T23:00:00Z")
    assert r.status_code == 404, r.text


def test_command_times_are_iso_or_astronomical_never_bare_numbers(client: TestClient) -> None:
    """An MJD sent as a bare number was read as Unix seconds (61000.5 → 1970-01-01T16:56Z).
    Numbers, and numbers written as text, are refused; {"mjd": …}/{"jd": …} with a time
    scale are converted by astropy; every time is answered in UTC."""
    for when in (61000.5, "61000.5", 1_700_000_000, " 6.1e4 "):
        for path, body in (
                ("/executed_obs_units/start", {"obs_unit_id": "OU-T", "instrument": "HARPS",
                                               "start_time": when}),
                ("/raw_data_files", file_spec("t.fits", created_at=when))):
            assert_error(client.post(path, json=body), 422,
                         field="start_time" if "start" in path else "created_at",
                         message="bare number is not a time")
    for when, expected in (({"mjd": 61000.5}, "2025-11-21T12:00:00Z"),
                           ({"jd": 2461001.0, "scale": "utc"}, "2025-11-21T12:00:00Z"),
                           ({"mjd": 61000.5, "scale": "tai"}, "2025-11-21T11:59:23Z"),
                           ("2025-11-21T13:00:00+01:00", "2025-11-21T12:00:00Z")):
        r = client.post("/executed_obs_units/start?wait=true",
                        json={"obs_unit_id": "OU-T", "instrument": "HARPS", "start_time": when})
        body = applied(r)
        unit = body["ids"]["executed_obs_unit_id"]
        view = client.get(f"/executed_obs_units/execution/{unit}",
                          params={"min_position": body["position"]}).json()
        assert view["start_time"].replace("+00:00", "Z") == expected, (when, view)
    for bad in ({"mjd": 1e9}, {"mjd": 61000.5, "jd": 2461001.0}, {"mjd": 61000.5,
                                                                   "scale": "tcb"}):
        assert_error(client.post("/executed_obs_units/start", json={
            "obs_unit_id": "OU-T", "instrument": "HARPS", "start_time": bad}), 422,
            field="start_time")
