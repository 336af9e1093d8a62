"""Structured logs: one JSON object per line, with the command id and correlation id of the
command being handled (HTTP request, dispatcher, results automation) on every line.

The ids travel in context variables, so any log call made while a command is handled carries
them without passing them around; lines outside any command have them as ``null``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from typing import IO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

command_id_var: ContextVar[str | None] = ContextVar("command_id", default=None)
correlation_id_var: ContextVar[str | None] = ContextVar("correlation_id", default=None)


@contextlib.contextmanager
def command_context(command_id: str | None, correlation_id: str | None) -> Iterator[None]:
    """Log lines inside carry these ids."""
    tokens = (command_id_var.set(command_id), correlation_id_var.set(correlation_id))
    try:
        yield
    finally:
        correlation_id_var.reset(tokens[1])
        command_id_var.reset(tokens[0])


class CommandContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.command_id = command_id_var.get()
        record.correlation_id = correlation_id_var.get()
        return True


class BrokerClientTracebacks(logging.Filter):
    """kafka-python logs a lost connection it recovers from itself at ERROR, with the
    traceback of its network thread (e.g. a socket closed under a read it had started): the
    line stays, with the exception's type and text, but no traceback reaches an operator's
    log or a command line's stderr."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and (record.name == "kafka" or record.name.startswith("kafka.")):
            error = record.exc_info[1]
            message = record.getMessage()
            if error is not None:
                message = f"{message} ({type(error).__name__}: {error})"
            record.msg, record.args = message, None
            record.exc_info, record.exc_text = None, None
        return True


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "{levelname}{name}{message}{command_id}{correlation_id}", style="{",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp="time",  # ISO 8601, UTC
        reserved_attrs=[*RESERVED_ATTRS, "color_message"], json_ensure_ascii=False)


def configure_logging(fmt: str = "json", level: int = logging.INFO,
                      stream: IO[str] | None = None) -> logging.Handler:
    """Root logging for obsledger processes: ``json`` (default) or ``text``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(CommandContextFilter())
    handler.addFilter(BrokerClientTracebacks())
    handler.setFormatter(json_formatter() if fmt == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s [%(command_id)s %(correlation_id)s]: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # connection chatter at INFO
    # Alembic says what it does at INFO on import and every start ("setup plugin", "Context
    # impl SQLiteImpl."): noise on a command line's stderr; its warnings and errors still show.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    return handler
