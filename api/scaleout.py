"""The app of one ``obsledger serve --workers N`` process (uvicorn's factory). What each
process runs beside its journal — leadership, adoption of a dead process's journal — is
``bootstrap.scaleout``'s."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from api.app import create_app
from infra.logs import configure_logging
from infra.settings import Settings


def worker_app() -> FastAPI:
    """The app of one ``obsledger serve --workers N`` process (uvicorn's factory): the
    settings come from the environment the parent set, with journal slots on."""
    settings = Settings()
    configure_logging(settings.log_format, getattr(logging, settings.log_level))
    return create_app(settings)
