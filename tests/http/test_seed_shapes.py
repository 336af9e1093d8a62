"""The request shapes clients written against the seeds send: a bare list of files to
``POST /raw_data_files/bulk`` (answered with ``count``), ``email`` at registration (stored,
also in an accounts table made before the column existed), ``metadata`` on ``POST
/ops/catalog`` (recorded on the products), a time window on ``POST /ops/plan`` (a selector of
raw data files). SQLite and PostgreSQL, through the HTTP API."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from eventsourcing.persistence import StoredEvent
from fastapi.testclient import TestClient
from sqlalchemy import JSON, Column, DateTime, MetaData, String, Table, Uuid, inspect

from api.app import create_app
from bootstrap.ledger import Ledger
from domain.processing import DataProduct, JobKind, ProcessingJob
from infra.accounts import AccountStore
from infra.read_model_db import create_read_model_engine
from infra.settings import Settings
from tests.conftest import grant
from tests.http.test_api import T0, applied, file_spec
from tests.integration.test_processing import (
    SAAO,
    proc_settings,
    register,
    sha256,
    submit,
    wait_job,
)
from tests.unit.test_domain import prov


@pytest.fixture
def ps(tmp_path: Path, store_kind: str, pg_database_if_needed: str | None) -> Settings:
    return proc_settings(tmp_path, store_kind, pg_database_if_needed)


@pytest.fixture
def pc(ps: Settings) -> Iterator[TestClient]:
    """The API with its processing worker, as a service account holding every role but
    admin."""
    with TestClient(create_app(ps), headers=grant(ps)) as c:
        yield c


def test_bulk_takes_a_bare_list_and_answers_the_count(client: TestClient) -> None:
    files = [file_spec(f"bare-{i}.fits") for i in range(3)]
    r = client.post("/raw_data_files/bulk", json=files,
                    headers={"Idempotency-Key": "seed-bulk-1"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["count"] == 3 and body["status"] == "accepted"
    assert len(body["ids"]["raw_data_file_ids"]) == 3
    again = client.post("/raw_data_files/bulk", json=files,
                        headers={"Idempotency-Key": "seed-bulk-1"})
    assert again.status_code == 202 and again.json() == body
    assert again.headers["Idempotent-Replayed"] == "true"
    # the same files as {"files": [...]}: the same command (no 409 for another body)
    same = client.post("/raw_data_files/bulk", json={"files": files},
                       headers={"Idempotency-Key": "seed-bulk-1"})
    assert same.status_code == 202 and same.json() == body
    done = applied(client.post("/raw_data_files/bulk?wait=true",
                               json={"files": [file_spec("wrapped.fits")]}))
    assert done["count"] == 1
    # the bare list is checked as the files are, field names and all
    bad = client.post("/raw_data_files/bulk", json=[file_spec("neg.fits", size=-1)])
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "files.0.size"
    assert client.post("/raw_data_files/bulk", json=[]).status_code == 422


def test_the_openapi_schema_says_both_bulk_shapes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/raw_data_files/bulk"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]
    assert body["anyOf"][0] == {"$ref": "#/components/schemas/BulkRegisterRawDataFilesRequest"}
    assert body["anyOf"][1]["type"] == "array" and body["anyOf"][1]["minItems"] == 1
    answer = schema["paths"]["/raw_data_files/bulk"]["post"]["responses"]["202"]["content"][
        "application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    assert "count" in schema["components"]["schemas"][answer]["required"]


def test_register_stores_the_email(client: TestClient, settings: Settings) -> None:
    admin = grant(settings, "root", ("admin",))
    r = client.post("/auth/register", headers=admin, json={
        "username": "night-operator", "password": "Kestrel-parallax-9-dome",
        "roles": ["operator"], "email": "night.operator@observatory.example.org"})
    assert r.status_code == 201, r.text
    assert r.json()["email"] == "night.operator@observatory.example.org"
    listed = {a["username"]: a for a in client.get("/auth/accounts", headers=admin).json()}
    assert listed["night-operator"]["email"] == "night.operator@observatory.example.org"
    assert listed["root"]["email"] is None
    bad = client.post("/auth/register", headers=admin, json={
        "username": "day-operator", "password": "Kestrel-parallax-9-dome",
        "roles": ["operator"], "email": "not an address"})
    assert bad.status_code == 422 and bad.json()["errors"][0]["field"] == "email"


def test_an_accounts_table_from_before_gains_the_email_column(settings: Settings) -> None:
    """An accounts database made by the previous release keeps working: the nullable
    ``email`` column is added, its accounts are read (no email), new ones stored with one."""
    settings.prepare_dirs()
    engine = create_read_model_engine(settings.read_model_database_url)
    try:
        old = MetaData()
        tz = DateTime(timezone=True)
        accounts = Table(  # the table as the previous release created it
            "accounts", old, Column("id", Uuid, primary_key=True),
            Column("username", String(100), nullable=False, unique=True),
            Column("kind", String(10), nullable=False), Column("roles", JSON, nullable=False),
            Column("password_hash", String(200)), Column("created_at", tz, nullable=False),
            Column("created_by", String(120), nullable=False), Column("disabled_at", tz),
            Column("disabled_by", String(120)), Column("tokens_valid_after", tz))
        old.create_all(engine)
        with engine.begin() as conn:
            conn.execute(accounts.insert().values(
                id=uuid.uuid4(), username="veteran", kind="user", roles=["viewer"],
                created_at=T0, created_by="tests"))
        store = AccountStore(engine)
        veteran = store.find(username="veteran")
        assert veteran is not None and veteran["email"] is None
        assert "email" in {c["name"] for c in inspect(engine).get_columns("accounts")}
        store.create("newcomer", "user", ["viewer"], None, "tests", "new@example.org")
        newcomer = AccountStore(engine).find(username="newcomer")  # another process
        assert newcomer is not None and newcomer["email"] == "new@example.org"
    finally:
        engine.dispose()


def test_plan_selects_raw_data_by_time_window(pc: TestClient, ps: Settings) -> None:
    def frame(name: str, hours: float) -> str:
        """A real frame where the instrument host keeps raw data, written ``hours`` after T0."""
        dest = ps.raw_data_dir / "2026-11-21" / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SAAO, dest)
        spec = file_spec(name, size=SAAO.stat().st_size, instrument="SAAO-CCD",
                         checksum={"algorithm": "sha256", "value": sha256(dest.read_bytes())},
                         created_at=(T0 + timedelta(hours=hours)).isoformat())
        return str(applied(pc.post("/raw_data_files?wait=true", json=spec))["ids"][
            "raw_data_file_id"])

    before, first, second, after = (frame("evening.fits", -1), frame("n1.fits", 1),
                                    frame("n2.fits", 2), frame("morning.fits", 12))
    window = {"start_time": T0.isoformat(),
              "end_time": (T0 + timedelta(hours=10)).isoformat()}
    r = pc.post("/ops/plan", json=window)
    assert r.status_code == 200, r.text
    assert [i["file_id"] for i in r.json()["inputs"]] == [first, second]
    r = pc.post("/ops/plan", json={"start_time": (T0 + timedelta(hours=11)).isoformat()})
    assert [i["file_id"] for i in r.json()["inputs"]] == [after]
    r = pc.post("/ops/plan", json={**window, "file_ids": [before, first]})
    assert [i["file_id"] for i in r.json()["inputs"]] == [before, first, second]
    empty = pc.post("/ops/plan", json={"start_time": (T0 + timedelta(days=9)).isoformat()})
    assert empty.status_code == 404 and empty.json()["errors"][0]["field"] == "start_time"
    backwards = pc.post("/ops/plan", json={"start_time": window["end_time"],
                                           "end_time": window["start_time"]})
    assert backwards.status_code == 422
    assert "end_time must be after start_time" in backwards.text
    assert pc.get("/ops/jobs").json()["items"] == []  # a plan records nothing


def test_catalog_records_metadata_on_the_products(pc: TestClient, ps: Settings) -> None:
    files = [register(pc, ps, SAAO, f"meta_{i}.fits") for i in range(3)]
    job = wait_job(pc, submit(pc, "/ops/process", {"file_ids": files}))
    assert job["status"] == "succeeded", job
    ids = [pc.get("/products", params={"status": "built", "job_id": job["id"]}).json()[
        "items"][i]["id"] for i in range(2)]
    cat = wait_job(pc, submit(pc, "/ops/catalog", {
        "product_ids": ids, "publish": True,
        "metadata": {"release": "DR1", "pi": "A. Observer", "seeing_arcsec": 1.1}}))
    assert cat["status"] == "succeeded", cat
    product: dict[str, Any] = pc.get(f"/products/{ids[0]}",
                                     params={"min_position": cat["last_position"]}).json()
    assert product["metadata"] == {"release": "DR1", "pi": "A. Observer",
                                   "seeing_arcsec": 1.1}
    again = wait_job(pc, submit(pc, "/ops/catalog", {
        "product_ids": [ids[0]], "archive": True, "metadata": {"release": "DR2"}}))
    product = pc.get(f"/products/{ids[0]}",
                     params={"min_position": again["last_position"]}).json()
    assert product["status"] == "archived"
    assert product["metadata"] == {"release": "DR2", "pi": "A. Observer",
                                   "seeing_arcsec": 1.1}
    assert pc.get(f"/products/{ids[1]}").json()["metadata"]["release"] == "DR1"


def test_events_stored_before_metadata_existed_read_as_none_given(ledger: Ledger) -> None:
    """``ProcessingJob.Requested`` and ``DataProduct.Catalogued`` version 1 (stored before
    ``metadata``): read by today's code with ``{}`` (docs/EVENT_SCHEMA.md)."""
    assert ledger.store is not None
    mapper = ledger.store.mapper
    job = ProcessingJob.request(uuid.uuid4(), JobKind.CATALOG, [], [uuid.uuid4()], None, None,
                                {}, None, None, False, True, False, 3, T0, prov(),
                                metadata={"release": "DR1"})
    current = mapper.to_stored_event(job.collect_events()[0])
    state = mapper.transcoder.decode(current.state)
    assert state.pop("class_version") == 2 and state.pop("metadata") == {"release": "DR1"}
    old = StoredEvent(originator_id=current.originator_id,
                      originator_version=current.originator_version, topic=current.topic,
                      state=mapper.transcoder.encode(state))
    ledger.store.recorder.insert_events([old])  # as the code before stored it
    loaded = ledger.store.get(job.id)
    assert isinstance(loaded, ProcessingJob) and loaded.metadata == {}
    catalogued: dict[str, Any] = {"status": "published"}
    DataProduct.Catalogued.upcast_v1_v2(catalogued)
    assert catalogued == {"status": "published", "metadata": {}}
    assert DataProduct.Catalogued.class_version == 2


def test_counts_sum_bytes_beyond_int64(client: TestClient) -> None:
    """Two frames of 2**62 bytes (the schema allows any int64 size): their sum, 2**63, is
    counted, not an SQLite "integer overflow" taken for the read models being down."""
    big = [file_spec(f"huge-{i}.fits", size=2**62) for i in range(2)]
    done = applied(client.post("/raw_data_files/bulk?wait=true", json=big))
    client.get("/raw_data_files", params={"min_position": done["position"]})  # projected
    counts = client.get("/raw_data_files/counts")
    assert counts.status_code == 200, counts.text
    assert counts.json()["bytes"] == 2**63
    assert client.get("/raw_data_files/counts").status_code == 200  # still up
