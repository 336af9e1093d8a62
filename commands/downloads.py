"""MAST download jobs: the commands (pydantic models), their handlers and ``CommandSpec``s.

People send ``request``, ``pause``, ``resume`` and ``cancel``; the downloader
(``commands/download_automation.py``) reports ``start_file``, ``checkpoint``,
``complete_file``, ``fail`` and ``purge_partials`` through the same journal → dispatcher path.
"""

from __future__ import annotations

import posixpath
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import ConfigDict, Field, field_validator, model_validator

from commands.handlers import COMMANDS, CommandSpec, Policy
from commands.models import CommandModel
from commands.unit_of_work import UnitOfWork
from domain.downloads import DownloadJob
from domain.provenance import Provenance

#: Default chunk (one HTTP Range request) of chunked downloads: 5 MB.
DEFAULT_CHUNK_SIZE = 5 * 1024 * 1024

Reason = Annotated[str, Field(min_length=1, max_length=2000)]


def check_relative(value: str, what: str = "destination") -> str:
    """A path below the download root: relative, no ``..``, no backslashes or NULs."""
    if value.startswith("/") or "\\" in value or ":" in value.split("/")[0]:
        raise ValueError(f"{what} must be a relative path below the download root")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"{what} must not contain '..'")
    return posixpath.join(*parts) if parts else ""


def check_filename(value: str) -> str:
    if "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
        raise ValueError("must be a plain file name (no directories, not hidden)")
    return value


class DownloadFileSpec(CommandModel):
    """One file of a job, as resolved from the archive (the URL it is fetched from)."""

    url: Annotated[str, Field(min_length=8, max_length=4096, pattern=r"^https?://",
                              examples=["https://mast.stsci.edu/api/v0.1/Download/file?uri="
                                        "mast:HST/product/u9o40504m_c3m.fits"])]
    filename: Annotated[str, Field(min_length=1, max_length=255,
                                   examples=["u9o40504m_c3m.fits"])]
    data_uri: Annotated[str, Field(max_length=1024)] | None = None
    obs_id: Annotated[str, Field(max_length=255)] | None = None
    obsid: Annotated[str, Field(max_length=64)] | None = Field(
        None, description="MAST's numeric id of the observation (parent of the product).")
    product_type: Annotated[str, Field(max_length=50)] | None = None
    instrument: Annotated[str, Field(max_length=80)] | None = None
    size: int | None = Field(None, ge=0, description="Size in bytes, if the archive says.")

    @field_validator("filename")
    @classmethod
    def _plain(cls, v: str) -> str:
        return check_filename(v)


class RequestDownload(CommandModel):
    """The journaled command: the resolved files and their destination."""

    id: UUID | None = None  # pre-generated before journaling
    files: list[DownloadFileSpec] = Field(min_length=1, max_length=10_000)
    destination: Annotated[str, Field(max_length=1024)]
    mode: Literal["stream", "chunked"] = "chunked"
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=64 * 1024, le=1024 * 1024 * 1024)
    register_files: bool = True

    @field_validator("destination")
    @classmethod
    def _relative(cls, v: str) -> str:
        return check_relative(v)

    @model_validator(mode="after")
    def _unique(self) -> RequestDownload:
        names = [f.filename for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("two files have the same filename")
        return self


class ProductRef(CommandModel):
    """A product from a search answer (``products`` of a search with ``include_products``)."""

    data_uri: Annotated[str, Field(min_length=6, max_length=1024, pattern=r"^mast:[^\s]+$",
                                   examples=["mast:HST/product/u9o40504m_c3m.fits"])]
    filename: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    size: int | None = Field(None, ge=0)
    obs_id: Annotated[str, Field(max_length=255)] | None = None
    obsid: Annotated[str, Field(max_length=64)] | None = None
    product_type: Annotated[str, Field(max_length=50)] | None = None
    instrument: Annotated[str, Field(max_length=80)] | None = None

    @field_validator("filename")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        return None if v is None else check_filename(v)


class ProductFilters(CommandModel):
    """Which products of an observation to fetch (MAST's product fields)."""

    product_type: list[Annotated[str, Field(max_length=50)]] | None = Field(
        None, max_length=20, examples=[["SCIENCE"]], description="productType, e.g. SCIENCE.")
    product_subgroup: list[Annotated[str, Field(max_length=50)]] | None = Field(
        None, max_length=50, examples=[["RAW", "FLT"]], description="productSubGroupDescription")
    calib_level: list[Annotated[int, Field(ge=0, le=4)]] | None = Field(None, max_length=5)
    extension: list[Annotated[str, Field(max_length=20)]] | None = Field(
        None, max_length=20, examples=[["fits"]])
    max_files: int = Field(100, ge=1, le=10_000)


class StartDownloadRequest(CommandModel):
    """What a client sends: products, or an observation (obs_id) and filters."""

    id: UUID | None = Field(None, description="Pre-generated job id (the server's if absent).")
    products: list[ProductRef] | None = Field(None, min_length=1, max_length=10_000)
    obs_id: Annotated[str, Field(min_length=1, max_length=255)] | None = Field(
        None, examples=["U9O40504M"], description="Fetch this observation's products.")
    filters: ProductFilters = Field(default_factory=lambda: ProductFilters())
    destination: Annotated[str, Field(max_length=1024, examples=["hst/u9o40504m"])] = Field(
        "", description="A directory below OBSLEDGER_DOWNLOAD_ROOT.")
    chunk_size: int | None = Field(None, ge=64 * 1024, le=1024 * 1024 * 1024,
                                   description="Bytes per Range request (chunked mode).")
    register_files: bool = Field(
        True, description="Register completed FITS files as raw data files.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"products": [{"data_uri": "mast:HST/product/u9o40504m_c3m.fits", "size": 207360,
                       "obs_id": "U9O40504M", "product_type": "AUXILIARY"}],
         "destination": "hst/u9o40504m"},
        {"obs_id": "U9O40504M", "filters": {"product_type": ["SCIENCE"], "extension": ["fits"]},
         "destination": "hst/u9o40504m"}]})

    @field_validator("destination")
    @classmethod
    def _relative(cls, v: str) -> str:
        return check_relative(v)

    @model_validator(mode="after")
    def _one_source(self) -> StartDownloadRequest:
        if (self.products is None) == (self.obs_id is None):
            raise ValueError("give either products or obs_id")
        return self


class DownloadFileStart(CommandModel):
    id: UUID
    index: int = Field(ge=0)
    size: int | None = Field(None, ge=0)
    etag: Annotated[str, Field(max_length=1024)] | None = None
    last_modified: Annotated[str, Field(max_length=100)] | None = None
    restart_reason: Annotated[str, Field(max_length=2000)] | None = None


class DownloadCheckpoint(CommandModel):
    id: UUID
    index: int = Field(ge=0)
    bytes_done: int = Field(ge=0)
    bytes_per_s: float | None = Field(None, ge=0)


class DownloadFileComplete(CommandModel):
    id: UUID
    index: int = Field(ge=0)
    size: int = Field(ge=0)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    fits: dict[str, Any] | None = None


class DownloadFail(CommandModel):
    id: UUID
    reason: Reason
    index: int | None = Field(None, ge=0)


class DownloadControl(CommandModel):
    """Pause or resume (no body)."""

    id: UUID


class CancelDownloadRequest(CommandModel):
    reason: Annotated[str, Field(max_length=2000)] | None = None


class CancelDownload(CancelDownloadRequest):
    id: UUID


class PurgeDownloadPartials(CommandModel):
    id: UUID
    removed: list[Annotated[str, Field(max_length=2048)]] = Field(default_factory=list)


# -- handlers --------------------------------------------------------------------------------
def _job(uow: UnitOfWork, job_id: UUID) -> DownloadJob:
    return uow.for_update(DownloadJob, job_id, "download job", "id")


def request_download(cmd: RequestDownload, uow: UnitOfWork, prov: Provenance,
                     policy: Policy) -> list[UUID]:
    assert cmd.id is not None
    job = DownloadJob.request(cmd.id, [f.model_dump(mode="json") for f in cmd.files],
                              cmd.destination, cmd.mode, cmd.chunk_size, cmd.register_files,
                              policy.clock(), prov)
    uow.add(job, "download job")
    return [job.id]


def start_file(cmd: DownloadFileStart, uow: UnitOfWork, prov: Provenance,
               policy: Policy) -> list[UUID]:
    job = _job(uow, cmd.id)
    job.start_file(cmd.index, cmd.size, cmd.etag, cmd.last_modified, cmd.restart_reason,
                   policy.clock(), prov)
    return [job.id]


def checkpoint(cmd: DownloadCheckpoint, uow: UnitOfWork, prov: Provenance,
               policy: Policy) -> list[UUID]:
    job = _job(uow, cmd.id)
    job.checkpoint(cmd.index, cmd.bytes_done, cmd.bytes_per_s, policy.clock(), prov)
    return [job.id]


def complete_file(cmd: DownloadFileComplete, uow: UnitOfWork, prov: Provenance,
                  policy: Policy) -> list[UUID]:
    job = _job(uow, cmd.id)
    job.complete_file(cmd.index, cmd.size, cmd.sha256, cmd.fits, policy.clock(), prov)
    return [job.id]


def fail(cmd: DownloadFail, uow: UnitOfWork, prov: Provenance, policy: Policy) -> list[UUID]:
    job = _job(uow, cmd.id)
    job.fail(cmd.reason, cmd.index, policy.clock(), prov)
    return [job.id]


def pause(cmd: DownloadControl, uow: UnitOfWork, prov: Provenance,
          policy: Policy) -> list[UUID]:
    job = _job(uow, cmd.id)
    job.pause(policy.clock(), prov)
    return [job.id]


def resume(cmd: DownloadControl, uow: UnitOfWork, prov: Provenance,
           policy: Policy) -> list[UUID]:
    job = _job(uow, cmd.id)
    job.resume(policy.clock(), prov)
    return [job.id]


def cancel(cmd: CancelDownload, uow: UnitOfWork, prov: Provenance,
           policy: Policy) -> list[UUID]:
    job = _job(uow, cmd.id)
    job.cancel(cmd.reason, policy.clock(), prov)
    return [job.id]


def purge_partials(cmd: PurgeDownloadPartials, uow: UnitOfWork, prov: Provenance,
                   policy: Policy) -> list[UUID]:
    job = _job(uow, cmd.id)
    job.purge_partials(cmd.removed, policy.clock(), prov)
    return [job.id]


def _subjects(cmd: Any) -> list[str]:
    return [f"download_job:{cmd.id}"]


DOWNLOAD_COMMANDS: dict[str, CommandSpec] = {
    spec.name: spec for spec in [
        CommandSpec("download_job.request", RequestDownload, request_download, _subjects),
        CommandSpec("download_job.start_file", DownloadFileStart, start_file, _subjects,
                    generated=()),
        CommandSpec("download_job.checkpoint", DownloadCheckpoint, checkpoint, _subjects,
                    generated=()),
        CommandSpec("download_job.complete_file", DownloadFileComplete, complete_file,
                    _subjects, generated=()),
        CommandSpec("download_job.fail", DownloadFail, fail, _subjects, generated=()),
        CommandSpec("download_job.pause", DownloadControl, pause, _subjects, generated=()),
        CommandSpec("download_job.resume", DownloadControl, resume, _subjects, generated=()),
        CommandSpec("download_job.cancel", CancelDownload, cancel, _subjects, generated=()),
        CommandSpec("download_job.purge_partials", PurgeDownloadPartials, purge_partials,
                    _subjects, generated=()),
    ]
}
COMMANDS.update(DOWNLOAD_COMMANDS)
