"""MAST download jobs: the commands (pydantic models), their handlers and ``CommandSpec``s.

People send ``request``, ``pause``, ``resume`` and ``cancel``; the downloader
(``workers/download_automation.py``) reports ``start_file``, ``checkpoint``,
``complete_file``, ``fail`` and ``purge_partials`` through the same journal → dispatcher path.
"""

from __future__ import annotations

import posixpath
import re
from enum import StrEnum
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator

from commands.models import CommandModel
from commands.spec import CommandSpec, Policy, Target, changes
from commands.unit_of_work import UnitOfWork
from domain.downloads import DownloadJob
from domain.provenance import Provenance


class DownloadCommand(StrEnum):
    """The command types of this feature, as the journal stores them."""

    DOWNLOAD_JOB_CANCEL = "download_job.cancel"
    DOWNLOAD_JOB_CHECKPOINT = "download_job.checkpoint"
    DOWNLOAD_JOB_COMPLETE_FILE = "download_job.complete_file"
    DOWNLOAD_JOB_FAIL = "download_job.fail"
    DOWNLOAD_JOB_PAUSE = "download_job.pause"
    DOWNLOAD_JOB_PURGE_PARTIALS = "download_job.purge_partials"
    DOWNLOAD_JOB_REQUEST = "download_job.request"
    DOWNLOAD_JOB_RESUME = "download_job.resume"
    DOWNLOAD_JOB_START_FILE = "download_job.start_file"


#: what commands/registry.py checks: every one of these has a CommandSpec below
COMMAND_TYPES = DownloadCommand

#: Default chunk (one HTTP Range request) of chunked downloads: 5 MB.
DEFAULT_CHUNK_SIZE = 5 * 1024 * 1024

Reason = Annotated[str, Field(min_length=1, max_length=2000)]

#: The longest name a file system takes (NAME_MAX, in bytes), and the suffix of partial files.
NAME_MAX_BYTES = 255
PARTIAL_SUFFIX = ".part"
#: The longest file name of a download: its partial file ``<name>.part`` must fit NAME_MAX.
MAX_FILENAME_BYTES = NAME_MAX_BYTES - len(PARTIAL_SUFFIX)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _name_bytes(value: str, what: str) -> int:
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not contain control characters (NUL, newline, …)")
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode (no lone surrogates)") from None


def check_relative(value: str, what: str = "destination") -> str:
    """A path below the download root: relative, no ``..``, no backslashes, control
    characters or directory names longer than the file system takes."""
    if value.startswith("/") or "\\" in value or ":" in value.split("/")[0]:
        raise ValueError(f"{what} must be a relative path below the download root")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise ValueError(f"{what} must not contain '..'")
    for part in parts:
        if _name_bytes(part, what) > NAME_MAX_BYTES:
            raise ValueError(f"{what}: a directory name is at most {NAME_MAX_BYTES} bytes")
    return posixpath.join(*parts) if parts else ""


#: A directory below the download root (checked by ``check_relative``).
Destination = Annotated[str, Field(max_length=1024), AfterValidator(check_relative)]

#: check_relative's rule as a JSON schema pattern (on the text before whitespace is stripped;
#: schema only: pydantic's patterns have no look-ahead).
RELATIVE_DIRECTORY = (r"^(?!\s*/)(?![^\x00]*\\)(?![^/]*:)(?!\s*\.\.(?:/|\s*$))"
                      r"(?![^\x00]*/\.\.(?:/|\s*$))[^\x00-\x1f\x7f]*$")
#: check_filename's rule as a pattern (after an optional MAST path).
_PLAIN_NAME = r"(?!\s*\.)[^/\\\x00-\x1f\x7f]*[^\s/\\\x00-\x1f\x7f][^/\\\x00-\x1f\x7f]*"
FILE_NAME = f"^{_PLAIN_NAME}$"
#: A MAST dataURI whose last part is a plain file name.
DATA_URI = r"^\s*mast:(?:[^\s\x00]*/(?![.]))?[^\s/\\\x00-\x1f\x7f]+\s*$"


def check_filename(value: str) -> str:
    if "/" in value or "\\" in value or value in (".", "..") or value.startswith("."):
        raise ValueError("must be a plain file name (no directories, not hidden)")
    if _name_bytes(value, "the file name") > MAX_FILENAME_BYTES:
        raise ValueError(f"must be at most {MAX_FILENAME_BYTES} bytes in UTF-8 (its partial "
                         f"file, <name>{PARTIAL_SUFFIX}, must fit the file system's "
                         f"{NAME_MAX_BYTES})")
    return value


class DownloadFileSpec(CommandModel):
    """One file of a job, as resolved from the archive (the URL it is fetched from)."""

    url: Annotated[str, Field(min_length=8, max_length=4096, pattern=r"^https?://",
                              examples=["https://mast.stsci.edu/api/v0.1/Download/file?uri="
                                        "mast:HST/product/u9o40504m_c3m.fits"])]
    filename: Annotated[str, Field(min_length=1, max_length=MAX_FILENAME_BYTES,
                                   examples=["u9o40504m_c3m.fits"],
                                   description="A plain file name of at most 250 bytes in "
                                   "UTF-8 (<name>.part must fit the file system).")]
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
    destination: Destination
    mode: Literal["stream", "chunked"] = "chunked"
    chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=64 * 1024, le=1024 * 1024 * 1024)
    register_files: bool = True

    @model_validator(mode="after")
    def _unique(self) -> RequestDownload:
        names = [f.filename for f in self.files]
        if len(set(names)) != len(names):
            raise ValueError("two files have the same filename")
        return self


class ProductRef(CommandModel):
    """A product from a search answer (``products`` of a search with ``include_products``)."""

    data_uri: Annotated[str, Field(min_length=6, max_length=1024, pattern=r"^mast:[^\s]+$",
                                   json_schema_extra={"pattern": DATA_URI},
                                   examples=["mast:HST/product/u9o40504m_c3m.fits"],
                                   description="Ends in a plain file name (the file's name "
                                   "unless filename is given).")]
    filename: Annotated[str, Field(min_length=1, max_length=MAX_FILENAME_BYTES,
                                   json_schema_extra={"pattern": FILE_NAME},
                                   description="Default: the data_uri's last part. A plain "
                                   "file name of at most 250 bytes in UTF-8.")] | None = None
    size: int | None = Field(None, ge=0)
    obs_id: Annotated[str, Field(max_length=255)] | None = None
    obsid: Annotated[str, Field(max_length=64)] | None = None
    product_type: Annotated[str, Field(max_length=50)] | None = None
    instrument: Annotated[str, Field(max_length=80)] | None = None

    @field_validator("filename")
    @classmethod
    def _plain(cls, v: str | None) -> str | None:
        return None if v is None else check_filename(v)

    @field_validator("data_uri")
    @classmethod
    def _named(cls, v: str) -> str:
        check_filename(posixpath.basename(v))
        return v


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
    destination: Annotated[Destination, Field(
        examples=["hst/u9o40504m"], json_schema_extra={"pattern": RELATIVE_DIRECTORY})] = Field(
        "", description="A directory below OBSLEDGER_DOWNLOAD_ROOT: relative, no `..`, no "
        "backslash, no drive letter.")
    chunk_size: int | None = Field(None, ge=64 * 1024, le=1024 * 1024 * 1024,
                                   description="Bytes per Range request (chunked mode).")
    register_files: bool = Field(
        True, description="Register completed FITS files as raw data files.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "oneOf": [{"properties": {"products": {"type": "array"}}, "required": ["products"]},
                  {"properties": {"obs_id": {"type": "string"}}, "required": ["obs_id"]}],
        "examples": [
        {"products": [{"data_uri": "mast:HST/product/u9o40504m_c3m.fits", "size": 207360,
                       "obs_id": "U9O40504M", "product_type": "AUXILIARY"}],
         "destination": "hst/u9o40504m"},
        {"obs_id": "U9O40504M", "filters": {"product_type": ["SCIENCE"], "extension": ["fits"]},
         "destination": "hst/u9o40504m"}]})

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
#: the handler of a command to an existing job, from what it does to the job
_changes_job = changes(DownloadJob, "download job")


def request_download(cmd: RequestDownload, uow: UnitOfWork, prov: Provenance,
                     policy: Policy) -> list[UUID]:
    assert cmd.id is not None
    job = DownloadJob.request(cmd.id, [f.model_dump(mode="json") for f in cmd.files],
                              cmd.destination, cmd.mode, cmd.chunk_size, cmd.register_files,
                              policy.clock(), prov)
    uow.add(job, "download job")
    return [job.id]


@_changes_job
def start_file(job: DownloadJob, cmd: DownloadFileStart, prov: Provenance, policy: Policy) -> None:
    job.start_file(cmd.index, cmd.size, cmd.etag, cmd.last_modified, cmd.restart_reason,
                   policy.clock(), prov)


@_changes_job
def checkpoint(job: DownloadJob, cmd: DownloadCheckpoint, prov: Provenance,
               policy: Policy) -> None:
    job.checkpoint(cmd.index, cmd.bytes_done, cmd.bytes_per_s, policy.clock(), prov)


@_changes_job
def complete_file(job: DownloadJob, cmd: DownloadFileComplete, prov: Provenance,
                  policy: Policy) -> None:
    job.complete_file(cmd.index, cmd.size, cmd.sha256, cmd.fits, policy.clock(), prov)


@_changes_job
def fail(job: DownloadJob, cmd: DownloadFail, prov: Provenance, policy: Policy) -> None:
    job.fail(cmd.reason, cmd.index, policy.clock(), prov)


@_changes_job
def pause(job: DownloadJob, cmd: DownloadControl, prov: Provenance, policy: Policy) -> None:
    job.pause(policy.clock(), prov)


@_changes_job
def resume(job: DownloadJob, cmd: DownloadControl, prov: Provenance, policy: Policy) -> None:
    job.resume(policy.clock(), prov)


@_changes_job
def cancel(job: DownloadJob, cmd: CancelDownload, prov: Provenance, policy: Policy) -> None:
    job.cancel(cmd.reason, policy.clock(), prov)


@_changes_job
def purge_partials(job: DownloadJob, cmd: PurgeDownloadPartials, prov: Provenance,
                   policy: Policy) -> None:
    job.purge_partials(cmd.removed, policy.clock(), prov)


def _subjects(cmd: Any) -> list[str]:
    return [f"download_job:{cmd.id}"]


JOB = "download_job"
_UNFINISHED = Target(JOB, "download job", frozenset({"completed", "cancelled"}))

SPECS = [
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_REQUEST, RequestDownload, request_download, _subjects,
                creates=JOB),
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_START_FILE, DownloadFileStart, start_file, _subjects,
                generated=()),
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_CHECKPOINT, DownloadCheckpoint, checkpoint, _subjects,
                generated=()),
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_COMPLETE_FILE, DownloadFileComplete, complete_file,
                _subjects, generated=()),
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_FAIL, DownloadFail, fail, _subjects, generated=()),
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_PAUSE, DownloadControl, pause, _subjects,
                generated=(), target=_UNFINISHED),
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_RESUME, DownloadControl, resume, _subjects,
                generated=(), target=_UNFINISHED),
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_CANCEL, CancelDownload, cancel, _subjects,
                generated=(), target=_UNFINISHED),
    CommandSpec(DownloadCommand.DOWNLOAD_JOB_PURGE_PARTIALS, PurgeDownloadPartials, purge_partials,
                _subjects, generated=()),
]
