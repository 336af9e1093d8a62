"""obsledger_client against a real ``obsledger serve``: a lost answer is retried with the same
idempotency key and applied once, refusals are exceptions with the error format's fields,
``wait``/``min_position``/``wait_for_command``, a user's token renewed when it is refused,
an unreachable service said after the retries."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from infra.settings import Settings
from obsledger_client import (
    Conflict,
    NotFound,
    ObsLedgerClient,
    ServiceUnreachable,
    Unauthorized,
    ValidationFailed,
)
from tests.conftest import ServerProcess, grant
from tests.support.processes import free_port


class LosesFirstAnswer(httpx.HTTPTransport):
    """The real transport, except that the answer to the first command is lost on the way
    back (the service got it and applied it; the script sees a read timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.keys: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method != "GET":
            self.keys.append(request.headers.get("Idempotency-Key"))
            if len(self.keys) == 1:
                response.read()
                response.close()
                raise httpx.ReadTimeout("the answer was lost", request=request)
        return response


def _token(settings: Settings) -> str:
    return grant(settings, "telescope-automation", ("automation", "viewer"))[
        "Authorization"].removeprefix("Bearer ")


def test_a_lost_answer_is_retried_with_the_same_key_and_applied_once(
        live_server: ServerProcess, settings: Settings) -> None:
    transport = LosesFirstAnswer()
    with ObsLedgerClient(live_server.url, token=_token(settings), transport=transport) as c:
        started = c.start_execution("OU-RETRY", "HARPS", wait=True)
        assert started.replayed and started.applied  # the second attempt got the first answer
        assert len(transport.keys) == 2 and transport.keys[0] == transport.keys[1]
        assert started.command_id == transport.keys[0]
        runs = c.executions_of("OU-RETRY", min_position=started.position)["executions"]
        assert [r["id"] for r in runs] == [started.id("executed_obs_unit_id")]
        # another logical command gets another key
        other = c.start_execution("OU-RETRY", "HARPS")
        assert other.command_id != started.command_id and not other.replayed


def test_refusals_carry_the_error_format(live_server: ServerProcess,
                                         settings: Settings) -> None:
    with ObsLedgerClient(live_server.url, token=_token(settings)) as c:
        with pytest.raises(ValidationFailed) as bad:
            c.register_files([{"name": "x.fits"}])
        assert bad.value.status_code == 422 and bad.value.detail == "Validation failed"
        assert {e.field for e in bad.value.errors} >= {"files.0.size", "files.0.instrument"}
        with pytest.raises(NotFound) as missing:
            c.execution("6d3f1c9e-0000-4000-8000-000000000000")
        assert "not found" in missing.value.detail
        started = c.start_execution("OU-TWICE", "HARPS", wait=True)
        eid = started.id("executed_obs_unit_id")
        c.finish_execution(eid, "success", wait=True)
        with pytest.raises(Conflict) as twice:
            c.finish_execution(eid, "failed", wait=True)
        assert "is success" in twice.value.detail
    with ObsLedgerClient(live_server.url, token="not-a-token") as c, \
            pytest.raises(Unauthorized):
        c.executions()


def test_wait_for_command_and_min_position(live_server: ServerProcess,
                                           settings: Settings) -> None:
    with ObsLedgerClient(live_server.url, token=_token(settings)) as c:
        sent = c.start_execution("OU-LATER", "HARPS", idempotency_key="night-ou-later-start")
        assert sent.status == "accepted" and sent.command_id == "night-ou-later-start"
        status: dict[str, Any] = c.wait_for_command(sent.command_id, timeout=30)
        assert status["status"] == "applied" and c.last_position >= status["position"]
        row = c.execution(sent.id("executed_obs_unit_id"), min_position=status["position"])
        assert row["pending"] is False and row["obs_unit_id"] == "OU-LATER"


def test_a_user_logs_in_and_again_when_the_token_is_refused(
        live_server: ServerProcess, settings: Settings) -> None:
    password = (settings.data_dir / "admin-password").read_text().strip()
    with ObsLedgerClient(live_server.url, username="admin", password=password) as c:
        assert c.executions()["items"] == []
        c._token = "expired"  # as a 30-minute token is after a long night
        assert c.executions()["items"] == []  # logged in again, once


def test_an_unreachable_service_is_said_after_the_retries() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with ObsLedgerClient(url, token="t", attempts=2, retry_timeout=5) as c, \
            pytest.raises(ServiceUnreachable) as down:
        c.start_execution("OU-X", "HARPS")
    assert down.value.status_code == 0 and "ConnectError" in down.value.detail
