"""A night in miniature over real HTTP, on SQLite and on PostgreSQL."""

from __future__ import annotations

import httpx

from infra.settings import Settings
from tests.conftest import ServerProcess, grant


def test_night_over_real_http(live_server: ServerProcess, settings: Settings) -> None:
    with httpx.Client(base_url=live_server.url, timeout=30) as c:
        r = c.post("/executed_obs_units/start?wait=true",
                   json={"obs_unit_id": "OU-1", "instrument": "HARPS"},
                   headers=grant(settings, "night-script", kind="user"))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["status"] == "applied" and body["position"] >= 1
        eid = body["ids"]["executed_obs_unit_id"]
        r = c.get(f"/executed_obs_units/OU-1?min_position={body['position']}",
                  headers=grant(settings, "dashboard", ("viewer",)))
        assert r.status_code == 200
        [row] = r.json()["executions"]
        assert row["id"] == eid and row["pending"] is False and row["started_by"] == "night-script"
