"""``/audit``: the read-only HTTP equivalents of replay, state, trail and verify, on SQLite
and PostgreSQL; bad input is a 4xx in the error format, never a 500."""

from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path
from typing import Any
from uuid import UUID, uuid4

import orjson
import pytest
from eventsourcing.persistence import StoredEvent
from fastapi.testclient import TestClient

from bootstrap.ledger import Ledger
from infra.settings import Settings
from tests.conftest import ROOT, grant, settings_env
from tests.integration.test_audit import set_state, state_of


def night(client: TestClient, settings: Settings) -> tuple[str, str]:
    """Two units started, one finished (applied) by the user night-script; returns (finished
    unit id, its finish command id)."""
    actor = grant(settings, "night-script", kind="user")
    ids = []
    for name in ("OU-A", "OU-B"):
        r = client.post("/executed_obs_units/start?wait=true", headers=actor,
                        json={"obs_unit_id": name, "instrument": "HARPS",
                              "start_time": "2026-11-21T23:00:00Z"})
        assert r.status_code == 200, r.text
        ids.append(r.json()["ids"]["executed_obs_unit_id"])
    r = client.put(f"/executed_obs_units/{ids[0]}/finish?wait=true",
                   headers={**actor, "Idempotency-Key": "finish-a",
                            "X-Correlation-ID": "night-1121"},
                   json={"status": "success", "end_time": "2026-11-21T23:45:00Z"})
    assert r.status_code == 200, r.text
    return ids[0], "finish-a"


def test_events_filters_and_pages(client: TestClient, settings: Settings) -> None:
    unit, command = night(client, settings)
    everything = client.get("/audit/events").json()
    assert everything["next_after"] is None
    positions = [e["position"] for e in everything["items"]]
    assert positions == sorted(positions) and len(positions) == 6  # 3 events, 3 receipts
    paged: list[dict[str, Any]] = []
    after = 0
    while True:
        r = client.get(f"/audit/events?limit=2&after={after}")
        assert r.status_code == 200, r.text
        paged += r.json()["items"]
        if r.json()["next_after"] is None:
            break
        after = r.json()["next_after"]
    assert paged == everything["items"]
    (finished,) = client.get("/audit/events?event_type=Finished").json()["items"]
    assert finished["aggregate_id"] == unit and finished["command_id"] == command
    assert finished["correlation_id"] == "night-1121" and finished["schema_version"] == 1
    assert finished["data"]["status"] == "success"
    mine = client.get(f"/audit/events?aggregate_id={unit}").json()["items"]
    assert [e["version"] for e in mine] == [1, 2]
    r = client.get("/audit/events?aggregate_type=ExecutedObsUnit&actor=night-script"
                   "&recorded_from=2000-01-01T00:00:00&observed_to=2026-11-21T23:30:00Z")
    assert [e["event_type"] for e in r.json()["items"]] == ["ExecutedObsUnit.Started"] * 2


def test_state_trail_and_verify(client: TestClient, settings: Settings) -> None:
    unit, _ = night(client, settings)
    r = client.get(f"/audit/state/{unit}?version=1")
    assert r.status_code == 200 and r.json()["state"]["status"] == "running"
    assert len(r.json()["events"]) == 1
    now = client.get(f"/audit/state/{unit}").json()
    assert now["state"]["status"] == "success" and len(now["events"]) == 2
    recorded = now["events"][0]["recorded_at"]
    r = client.get(f"/audit/state/{unit}", params={"recorded_at": recorded})
    assert r.json()["state"]["status"] == "running"
    r = client.get(f"/audit/state/{unit}?observed_at=2026-11-21T23:50:00Z")
    assert r.json()["state"]["status"] == "success"
    # bounds combine: the longest prefix meeting every one given
    for query in ({"version": 2, "recorded_at": recorded},
                  {"version": 1, "observed_at": "2026-11-21T23:50:00Z"},
                  {"recorded_at": now["events"][1]["recorded_at"],
                   "observed_at": "2026-11-21T23:30:00Z"}):
        r = client.get(f"/audit/state/{unit}", params=query)
        assert r.status_code == 200 and r.json()["state"]["status"] == "running", (query, r.text)
        assert len(r.json()["events"]) == 1

    trail = client.get(f"/audit/trail/{unit}").json()["items"]
    assert [(t["event_type"], t["command_type"]) for t in trail] == [
        ("ExecutedObsUnit.Started", "executed_obs_unit.start"),
        ("ExecutedObsUnit.Finished", "executed_obs_unit.finish")]

    ledger: Ledger = client.app.state.ledger  # type: ignore[attr-defined]
    assert ledger.chain is not None
    ledger.chain.catch_up()
    r = client.get("/audit/verify")
    assert r.status_code == 200 and r.json()["ok"] is True and r.json()["events"] == 6
    set_state(ledger, 1, state_of(ledger, 1).replace(b"HARPS", b"HARPX"))
    body = client.get("/audit/verify").json()
    assert body["ok"] is False
    assert (body["finding"]["position"], body["finding"]["kind"]) == (1, "modified")


@pytest.mark.parametrize("path, status, field", [
    ("/audit/events?aggregate_id=not-a-uuid", 422, "query.aggregate_id"),
    ("/audit/events?limit=0", 422, "query.limit"),
    ("/audit/events?limit=5000", 422, "query.limit"),
    ("/audit/events?after=-1", 422, "query.after"),
    ("/audit/events?recorded_from=yesterday", 422, "query.recorded_from"),
    ("/audit/state/not-a-uuid", 422, "path.aggregate_id"),
    ("/audit/state/6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21", 404, None),
    ("/audit/state/6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21?version=-1", 422, "query.version"),
    ("/audit/state/6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21?version=1"
     "&observed_at=2026-11-21T23:00:00Z", 404, None),  # bounds combine (none is refused)
    ("/audit/trail/6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21", 404, None),
    ("/audit/trail/42", 422, "path.entity_id"),
])
def test_bad_input_is_4xx_in_the_error_format(client: TestClient, path: str, status: int,
                                               field: str | None) -> None:
    r = client.get(path)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"detail", "status_code", "errors"} and body["status_code"] == status
    if field:
        assert field in [e["field"] for e in body["errors"]], body


def test_openapi_documents_the_audit_routes(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/audit/events", "/audit/state/{aggregate_id}", "/audit/trail/{entity_id}",
                 "/audit/verify"):
        op = spec["paths"][path]["get"]
        assert op["summary"] and op["tags"] == ["audit"]
        assert {"200", "422"} <= set(op["responses"])
    schemas = spec["components"]["schemas"]
    for name in ("AuditEventPage", "AuditStateView", "AuditTrailView", "VerificationView"):
        assert schemas[name].get("examples"), name


# -- events an older version let through ------------------------------------------------------
def store_raw(ledger: Ledger, aggregate_id: UUID, version: int, topic: str,
              state: bytes) -> None:
    """Write an event straight into the event store, as an older version (or a hand in SQL)
    could have: nothing checks it."""
    assert ledger.store is not None
    ledger.store.recorder.insert_events([StoredEvent(
        originator_id=aggregate_id, originator_version=version, topic=topic, state=state)])


def test_events_that_cannot_be_rendered_are_shown_raw(client: TestClient, settings: Settings,
                                                       tmp_path: Path) -> None:
    """NaN and infinities (not JSON), nesting beyond what the encoders write, bytes that are
    not JSON at all: every audit route and the command line answer, showing such an event
    with its bytes (base64) and why; nothing is a 500 or a traceback."""
    night(client, settings)
    ledger: Ledger = client.app.state.ledger  # type: ignore[attr-defined]
    assert ledger.store is not None
    stored = ledger.store.select_notifications(0, 100)
    started = next(n for n in stored if n.topic.endswith("ExecutedObsUnit.Started"))
    finished = next(n for n in stored if n.topic.endswith("ExecutedObsUnit.Finished"))
    nan_unit, junk_unit = uuid4(), uuid4()
    with_nan = bytes(started.state).replace(b'"metadata":{}',
                                            b'"metadata":{"airmass":NaN,"seeing":-Infinity}')
    deep = bytes(finished.state).replace(b'"metadata":{}', b'"metadata":'
                                         + b'{"a":' * 250 + b"1" + b"}" * 250)
    assert with_nan != bytes(started.state) and deep != bytes(finished.state)
    store_raw(ledger, nan_unit, 1, started.topic, with_nan)
    store_raw(ledger, nan_unit, 2, finished.topic, deep)
    store_raw(ledger, junk_unit, 1, started.topic, b"\xff\xfe not JSON")

    everything = client.get("/audit/events?limit=1000")
    assert everything.status_code == 200, everything.text
    items = everything.json()["items"]
    shown = {(e["aggregate_id"], e["version"]): e for e in items}
    for (unit, version), state in (((nan_unit, 1), with_nan), ((nan_unit, 2), deep),
                                   ((junk_unit, 1), b"\xff\xfe not JSON")):
        e = shown[(str(unit), version)]
        assert e["unreadable"] and base64.b64decode(e["raw_state"]) == state, e
        assert e["data"] == {}
    # the provenance of a state Python's json module reads is still shown (and filtered on)
    assert shown[(str(nan_unit), 1)]["actor"] == "night-script"
    assert shown[(str(nan_unit), 1)]["recorded_at"] == shown[(str(nan_unit), 1)][
        "recorded_at"] is not None
    readable = [e for e in items if "unreadable" not in e or e["unreadable"] is None]
    assert len(readable) == 6 and all(e["raw_state"] is None for e in readable)
    after = 0
    for _ in range(len(items)):  # every page, whichever event it starts at
        r = client.get(f"/audit/events?limit=1&after={after}")
        assert r.status_code == 200, r.text
        if r.json()["next_after"] is None:
            break
        after = r.json()["next_after"]
    r = client.get("/audit/events?actor=night-script&event_type=Started")
    assert str(nan_unit) in [e["aggregate_id"] for e in r.json()["items"]]

    r = client.get(f"/audit/state/{nan_unit}?version=1")
    assert r.status_code == 200, r.text
    assert r.json()["state"]["metadata"] == {"airmass": None, "seeing": None}
    assert r.json()["events"][0]["unreadable"]
    r = client.get(f"/audit/state/{nan_unit}")
    assert r.status_code == 200 and "deeper than" in r.json()["incomplete"], r.text
    r = client.get(f"/audit/state/{junk_unit}")
    assert r.status_code == 200, r.text
    assert r.json()["state"] == {} and "position" in r.json()["incomplete"]
    for unit in (nan_unit, junk_unit):
        r = client.get(f"/audit/trail/{unit}")
        assert r.status_code == 200 and all(t["unreadable"] for t in r.json()["items"]), r.text

    env = settings_env(settings)
    out = tmp_path / "replay.jsonl"
    done = subprocess.run([sys.executable, "-m", "api.cli", "replay", "--format", "jsonl",
                           "--output", str(out), "--quiet"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr, done.stderr
    lines = [orjson.loads(line) for line in out.read_text().splitlines()]
    assert [e["position"] for e in lines] == [e["position"] for e in items]
    assert sum(1 for e in lines if "unreadable" in e) == 3
    for args in (["replay"], ["state", str(nan_unit)], ["state", str(junk_unit)],
                 ["trail", str(nan_unit)]):
        done = subprocess.run([sys.executable, "-m", "api.cli", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "Traceback" not in done.stderr, (args, done.stderr)
