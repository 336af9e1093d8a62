"""``/audit``: the read-only HTTP equivalents of replay, state, trail and verify, on SQLite
and PostgreSQL; bad input is a 4xx in the error format, never a 500."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.runtime import Ledger
from infra.settings import Settings
from tests.conftest import grant
from tests.test_audit import set_state, state_of


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
    ("/audit/events?observed_to=9999-12-31T23:59:59-05:00", 422, "query"),
    ("/audit/state/not-a-uuid", 422, "path.aggregate_id"),
    ("/audit/state/6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21", 404, None),
    ("/audit/state/6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21?version=-1", 422, "query.version"),
    ("/audit/state/6f1c0c7e-5b3f-4a55-9a1e-2f0f3c1d9b21?version=1"
     "&observed_at=2026-11-21T23:00:00Z", 422, "version"),
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
