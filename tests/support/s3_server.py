"""A real S3-protocol server for the tests: moto's ``moto_server`` (``moto[server]`` on PyPI)
in its own process on a free port. The object store talks to it with a real boto3 client over
HTTP — nothing is mocked in the test process. Its state lives in memory: a restarted server
is empty.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from infra.object_store import Area, S3ObjectStore
from tests.support.processes import free_port, stop_process, wait_for_port

ACCESS_KEY_ID = "obsledger-test"
SECRET_ACCESS_KEY = "obsledger-test-secret"


class S3Server:
    """``python -m moto.server`` on 127.0.0.1; ``stop()``/``start()`` for outages."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.workdir / "moto_server.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        wait_for_port(self.port, self.proc, timeout=30)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None

    def store(self, **kwargs: Any) -> S3ObjectStore:
        """An object store on this server with buckets of its own (unique names), so tests
        sharing the server never see each other's objects."""
        suffix = uuid.uuid4().hex[:12]
        buckets = {area: f"t-{suffix}-{area.value}" for area in Area}
        options: dict[str, Any] = {"endpoint_url": self.endpoint_url,
                                   "access_key_id": ACCESS_KEY_ID,
                                   "secret_access_key": SECRET_ACCESS_KEY,
                                   "buckets": buckets, "max_attempts": 1}
        return S3ObjectStore(**{**options, **kwargs})
