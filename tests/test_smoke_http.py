"""A night in miniature over real HTTP, on SQLite and on PostgreSQL."""

from __future__ import annotations

import httpx

from tests.conftest import ServerProcess


def test_night_over_real_http(live_server: ServerProcess) -> None:
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        r = c.post("/executed_obs_units/start?wait=true",
                   json={"obs_unit_id": "OU-1", "instrument": "HARPS"},
                   headers={"X-Obsledger-Actor": "night-script"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "applied" and body["position"] >= 1
        eid = body["ids"]["executed_obs_unit_id"]
        r = c.get(f"/executed_obs_units/OU-1?min_position={body['position']}")
        assert r.status_code == 200
        [row] = r.json()["executions"]
        assert row["id"] == eid and row["pending"] is False and row["started_by"] == "night-script"
