"""What obsledger's log handler lets through to an operator's log and a command's stderr."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from infra.logs import configure_logging


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    configure_logging("json", logging.INFO, stream)
    yield stream
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_a_broker_clients_recovered_error_keeps_its_line_without_a_traceback(
        log_stream: io.StringIO) -> None:
    try:
        None.recv(4096)  # type: ignore[attr-defined]  # what kafka-python's network thread hit
    except AttributeError:
        logging.getLogger("kafka.net.transport").exception(
            "<KafkaTCPTransport [%s] (closed)>: Error receiving network data", "none")
    (line,) = _lines(log_stream)
    assert line["level"] == "ERROR" and line["logger"] == "kafka.net.transport"
    assert line["message"] == ("<KafkaTCPTransport [none] (closed)>: Error receiving network "
                               "data (AttributeError: 'NoneType' object has no attribute "
                               "'recv')")
    assert "Traceback" not in log_stream.getvalue() and "exc_info" not in line


def test_obsledgers_own_errors_keep_their_traceback(log_stream: io.StringIO) -> None:
    try:
        raise RuntimeError("projector failed")
    except RuntimeError:
        logging.getLogger("obsledger.projector").exception("projection stopped")
    (line,) = _lines(log_stream)
    assert line["message"] == "projection stopped"
    assert "Traceback" in str(line["exc_info"]) and "projector failed" in str(line["exc_info"])
