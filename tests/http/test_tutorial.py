"""docs/TUTORIAL.md runs as written: its Python blocks, in order, against a real
``obsledger serve`` (SQLite and PostgreSQL), with a service account's token in the
environment as the tutorial says."""

from __future__ import annotations

import re
from typing import Any

import pytest

from infra.settings import Settings
from tests.conftest import ROOT, ServerProcess, grant

TUTORIAL = ROOT / "docs" / "TUTORIAL.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_the_tutorial_records_a_night(live_server: ServerProcess, settings: Settings,
                                      monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    token = grant(settings, "telescope-automation", ("automation", "viewer"))[
        "Authorization"].removeprefix("Bearer ")
    monkeypatch.setenv("OBSLEDGER_URL", live_server.url)
    monkeypatch.setenv("OBSLEDGER_TOKEN", token)
    blocks = python_blocks(TUTORIAL.read_text(encoding="utf-8"))
    assert len(blocks) >= 6
    namespace: dict[str, Any] = {}
    for block in blocks:
        exec(compile(block, str(TUTORIAL), "exec"), namespace)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("accepted ")
    assert printed[1] == "3 frames registered"
    assert printed[2].startswith("applied ") and " applied " in printed[2]
    assert printed[3] == "success complete pending"
    assert printed[4] == "422 [('status', \"Input should be 'success', 'failed' or 'aborted'\")]"
    assert printed[5].startswith(f"executed obs unit {namespace['execution_id']} is success")
    assert "not found" in printed[6]
    # what the script recorded is there, once, with its actor
    staged = namespace["staged"]
    assert staged.applied and namespace["again"].replayed
    assert namespace["execution"]["started_by"] == "service:telescope-automation"
