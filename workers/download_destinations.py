"""Where a download job writes (a directory under the download root), and the check that a
new request would write over no file, nor into another job's partial file."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from commands.downloads import RequestDownload
from domain.errors import DuplicateEntity
from infra.read_model_db import ReadModelsUnavailable
from infra.settings import Settings
from queries.downloads import DownloadQueries

log = logging.getLogger("obsledger.downloader")

def job_dir(settings: Settings, destination: str) -> Path:
    root = settings.download_dir.resolve()
    path = (root / destination).resolve() if destination else root
    if path != root and root not in path.parents:
        raise ValueError(f"{destination} leaves the download root")
    return path


def same_files_precheck(queries: DownloadQueries, settings: Settings,
                        ) -> Callable[[RequestDownload], Awaitable[None]]:
    """The check of a new download request (``CommandService.prechecks``): refused (409)
    when a file it would write exists at its destination, or another job that may still
    write it (requested, running, paused, failed) has the same destination and file name.
    When the read models cannot tell, it is accepted: the downloader still never writes over
    a file that exists, nor two jobs into one partial file."""
    async def check(cmd: RequestDownload) -> None:
        names = [f.filename for f in cmd.files]
        directory = job_dir(settings, cmd.destination)
        where = cmd.destination or "."
        existing = await asyncio.to_thread(
            lambda: [n for n in names if os.path.lexists(directory / n)])
        if existing:
            raise DuplicateEntity(
                f"{where}/{existing[0]} exists: a downloaded file is never written over "
                f"(choose another destination, or move the file away)", field="destination")
        try:
            claims = await asyncio.to_thread(queries.claimants, cmd.destination, names)
        except (SQLAlchemyError, ReadModelsUnavailable) as e:
            log.info("download request: cannot check other jobs' files now: %s", e)
            return
        if claims:
            name, (job_id, status) = next(iter(claims.items()))
            raise DuplicateEntity(
                f"download job {job_id} ({status}) downloads {where}/{name} already: cancel "
                f"it, resume it, or choose another destination", field="destination")
    return check
