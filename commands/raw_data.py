"""Raw data: files registered (one or in bulk) and packages of them (created, added to,
finalized)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, ClassVar
from uuid import UUID

from pydantic import Field, field_validator, model_validator

from commands.models import (
    Checksum,
    CommandModel,
    Instrument,
    Name,
    UtcDatetime,
    utcnow,
    with_examples,
)
from commands.obs_units import check_executed_obs_unit
from commands.spec import CommandSpec, PendingRows, Policy, Row, Target, changes
from commands.unit_of_work import UnitOfWork
from domain.errors import DuplicateEntity
from domain.provenance import Provenance
from domain.raw_data import RawDataFile, RawDataPackage, raw_data_file_id
from infra.journal import JournalEntry


class RawDataCommand(StrEnum):
    """The command types of this feature, as the journal stores them."""

    RAW_DATA_FILE_REGISTER = "raw_data_file.register"
    RAW_DATA_FILE_REGISTER_BULK = "raw_data_file.register_bulk"
    RAW_DATA_PACKAGE_ADD_FILES = "raw_data_package.add_files"
    RAW_DATA_PACKAGE_CREATE = "raw_data_package.create"
    RAW_DATA_PACKAGE_FINALIZE = "raw_data_package.finalize"


#: what commands/registry.py checks: every one of these has a CommandSpec below
COMMAND_TYPES = RawDataCommand

FILE = "raw_data_file"
PACKAGE = "raw_data_package"


# -- the commands ----------------------------------------------------------------------------
#: A relative path (after whitespace is stripped: no leading "/", no ".." segment), for the
#: schema only (pydantic's patterns have no look-ahead); RawDataFileSpec._relative checks it.
RELATIVE_PATH = (r"^(?!\s*/)(?!\s*\.\.(?:/|\s*$))(?![^\x00]*/\.\.(?:/|\s*$))"
                 r"[^\x00]*[^\s\x00][^\x00]*$")


class RawDataFileSpec(CommandModel):
    name: Name
    relative_path: Annotated[str, Field(min_length=1, max_length=1024,
                                        json_schema_extra={"pattern": RELATIVE_PATH})]
    size: int = Field(ge=0, description="Size in bytes.")
    checksum: Checksum
    instrument: Instrument
    executed_obs_unit_id: UUID | None = None
    file_type: Annotated[str, Field(min_length=1, max_length=50, examples=["raw_science"])]
    created_at: UtcDatetime = Field(
        default_factory=utcnow, description="When the instrument wrote the file."
    )

    nested_only: ClassVar[bool] = True  # checked with the command it is a part of

    @field_validator("relative_path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError("must be a relative path inside the instrument's data root")
        return v

    @property
    def file_id(self) -> UUID:
        return raw_data_file_id(self.instrument, self.name)


_FILE_EXAMPLE: dict[str, Any] = {
    "name": "HARPS.2026-11-21T23:15:00.123.fits",
    "relative_path": "2026-11-21/HARPS.2026-11-21T23:15:00.123.fits",
    "size": 16_793_280,
    "checksum": {"algorithm": "md5", "value": "0f343b0931126a20f133d67c2b018a3b"},
    "instrument": "HARPS",
    "file_type": "raw_science",
    "created_at": "2026-11-21T23:15:00Z",
}


class RegisterRawDataFileRequest(RawDataFileSpec):
    model_config = with_examples(_FILE_EXAMPLE)
    nested_only: ClassVar[bool] = False  # a command of its own


def _unique_names(files: list[RawDataFileSpec]) -> None:
    """A file name is unique per instrument: a second one in the same command is the
    conflict a registered one would be (409; a JSON schema cannot say it)."""
    seen: dict[tuple[str, str], int] = {}
    for i, f in enumerate(files):
        key = (f.instrument, f.name)
        if key in seen:
            raise DuplicateEntity(
                f"files.{i}: {f.name} of {f.instrument} repeats files.{seen[key]}",
                field=f"files.{i}.name")
        seen[key] = i


class BulkRegisterRawDataFilesRequest(CommandModel):
    files: list[RawDataFileSpec] = Field(
        min_length=1, description="At most OBSLEDGER_MAX_BULK_FILES (the schema's maxItems); "
        "a name repeated for one instrument is 409, as a registered one would be.")

    model_config = with_examples({"files": [_FILE_EXAMPLE]})

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        """The operations seed's shape too: a bare JSON list of the files."""
        return {"files": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _names(self) -> BulkRegisterRawDataFilesRequest:
        _unique_names(self.files)
        return self


# -- raw data packages -------------------------------------------------------------------------
class CreateRawDataPackageRequest(CommandModel):
    id: UUID | None = Field(None, description="Pre-generated package id (server's if absent).")
    name: Name = Field(examples=["HARPS-2026-11-21-OU-2026-0412"])
    executed_obs_unit_id: UUID | None = None
    file_ids: list[UUID] = Field(
        default_factory=list, description="Already registered files to group.",
        json_schema_extra={"uniqueItems": True},
    )
    files: list[RawDataFileSpec] = Field(
        default_factory=list,
        description="Files registered by this same command and grouped into the package (a "
        "name repeated for one instrument, or a file also in file_ids, is 409).",
    )

    model_config = with_examples(
        {"name": "HARPS-2026-11-21-OU-2026-0412", "files": [_FILE_EXAMPLE]})

    @model_validator(mode="after")
    def _check(self) -> CreateRawDataPackageRequest:
        _unique_names(self.files)
        if len(set(self.file_ids)) != len(self.file_ids):
            raise ValueError("file_ids repeats an id")
        new_ids = {f.file_id for f in self.files}
        if both := new_ids & set(self.file_ids):
            raise DuplicateEntity(f"raw data file {min(both)} is both in files and file_ids",
                                  field="file_ids")
        return self


class CreateRawDataPackage(CreateRawDataPackageRequest):
    id: UUID


class AddFilesToPackageRequest(CommandModel):
    file_ids: list[UUID] = Field(min_length=1)

    model_config = with_examples({"file_ids": ["1c49d49d-34d9-5c36-be8c-62dcce3da68c"]})


class AddFilesToPackage(AddFilesToPackageRequest):
    id: UUID


class FinalizeRawDataPackage(CommandModel):
    id: UUID


# -- handlers --------------------------------------------------------------------------------
def _register_files(
    specs: list[RawDataFileSpec],
    uow: UnitOfWork,
    prov: Provenance,
    package_id: UUID | None = None,
) -> list[UUID]:
    ids = []
    for i, spec in enumerate(specs):
        check_executed_obs_unit(uow, spec.executed_obs_unit_id, f"files.{i}.executed_obs_unit_id")
        registered = RawDataFile.registration(
            name=spec.name,
            instrument=spec.instrument,
            relative_path=spec.relative_path,
            size=spec.size,
            checksum_algorithm=spec.checksum.algorithm,
            checksum_value=spec.checksum.value,
            executed_obs_unit_id=spec.executed_obs_unit_id,
            file_type=spec.file_type,
            created_at=spec.created_at,
            package_id=package_id,
            provenance=prov,
        )
        ids.append(uow.add_created(registered, f"raw data file {spec.name} of"))
    return ids


def register_raw_data_file(
    cmd: RegisterRawDataFileRequest, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    return _register_files([cmd], uow, prov)


def register_raw_data_files(
    cmd: BulkRegisterRawDataFilesRequest, uow: UnitOfWork, prov: Provenance, _: Policy
) -> list[UUID]:
    return _register_files(cmd.files, uow, prov)


def create_raw_data_package(
    cmd: CreateRawDataPackage, uow: UnitOfWork, prov: Provenance, limits: Policy
) -> list[UUID]:
    check_executed_obs_unit(uow, cmd.executed_obs_unit_id)
    existing = [
        uow.for_update(RawDataFile, fid, "raw data file", f"file_ids.{i}")
        for i, fid in enumerate(cmd.file_ids)
    ]
    new = [uow.get(RawDataFile, fid, "raw data file")
           for fid in _register_files(cmd.files, uow, prov, package_id=cmd.id)]
    package = RawDataPackage.create(
        package_id=cmd.id,
        name=cmd.name,
        executed_obs_unit_id=cmd.executed_obs_unit_id,
        files=existing + new,
        size_limit=limits.package_size_limit,
        provenance=prov,
    )
    uow.add(package, "raw data package")
    return [package.id, *(f.id for f in existing + new)]


def add_files_to_package(
    cmd: AddFilesToPackage, uow: UnitOfWork, prov: Provenance, limits: Policy
) -> list[UUID]:
    package = uow.for_update(RawDataPackage, cmd.id, "raw data package", "id")
    files = [
        uow.for_update(RawDataFile, fid, "raw data file", f"file_ids.{i}")
        for i, fid in enumerate(cmd.file_ids)
    ]
    package.add_files(files, limits.package_size_limit, prov)
    return [package.id, *(f.id for f in files)]


@changes(RawDataPackage, "raw data package")
def finalize_raw_data_package(package: RawDataPackage, cmd: FinalizeRawDataPackage,
                              prov: Provenance, limits: Policy) -> None:
    package.finalize(limits.package_size_limit, prov)


# -- subjects: how the journal indexes a pending command for smart queries -----------------
def _files_subjects(specs: list[RawDataFileSpec]) -> list[str]:
    out = []
    for f in specs:
        out.append(f"raw_data_file:{f.file_id}")
        if f.executed_obs_unit_id:
            out.append(f"executed_obs_unit:{f.executed_obs_unit_id}")
    return out


def _package_subjects(cmd: CreateRawDataPackage) -> list[str]:
    out = [f"raw_data_package:{cmd.id}", *_files_subjects(cmd.files)]
    out += [f"raw_data_file:{fid}" for fid in cmd.file_ids]
    return out


# -- how a pending command shows in smart queries --------------------------------------------
def _file_row(f: dict[str, Any], package_id: str | None = None) -> Row:
    return {
        "id": str(raw_data_file_id(f["instrument"], f["name"])), "name": f["name"],
        "instrument": f["instrument"], "relative_path": f["relative_path"], "size": f["size"],
        "checksum": f["checksum"], "executed_obs_unit_id": f.get("executed_obs_unit_id"),
        "package_id": package_id, "file_type": f["file_type"], "created_at": f["created_at"],
    }


def _registered(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    for f in p.get("files", [p]):
        row = _file_row(f)
        o.create(FILE, row["id"], row, e)


def _package_created(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    pid = p["id"]
    sizes: list[int | None] = []
    for f in p.get("files", []):
        row = _file_row(f, pid)
        sizes.append(f["size"])
        o.create(FILE, row["id"], row, e)
    for fid in p.get("file_ids", []):
        existing = o.base(FILE, fid)
        sizes.append(existing["size"] if existing else None)
        o.patch(FILE, fid, e, lambda r: r.update(package_id=pid))
    total = None if None in sizes else sum(s for s in sizes if s is not None)
    o.create(PACKAGE, pid, {
        "id": pid, "name": p["name"], "executed_obs_unit_id": p.get("executed_obs_unit_id"),
        "status": "building", "total_size": total, "file_count": len(sizes),
        "finalized_at": None}, e)


def _files_added(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    pid = p["id"]
    for fid in p["file_ids"]:
        o.patch(FILE, fid, e, lambda r: r.update(package_id=pid))

    def change(r: Row) -> None:
        r["file_count"] = r.get("file_count", 0) + len(p["file_ids"])
        r["total_size"] = None  # known once applied
    o.patch(PACKAGE, pid, e, change)


def _finalized(o: PendingRows, e: JournalEntry, p: dict[str, Any]) -> None:
    o.patch(PACKAGE, p["id"], e, lambda r: r.update(status="complete"))


_OPEN_PACKAGE = Target(PACKAGE, "raw data package", frozenset({"complete"}))

SPECS = [
    CommandSpec(
        RawDataCommand.RAW_DATA_FILE_REGISTER, RegisterRawDataFileRequest, register_raw_data_file,
        lambda c: _files_subjects([c]),
        ids=lambda c: {"raw_data_file_id": str(c.file_id)},
        overlay=_registered, shows=(FILE,),
    ),
    CommandSpec(
        RawDataCommand.RAW_DATA_FILE_REGISTER_BULK, BulkRegisterRawDataFilesRequest,
        register_raw_data_files, lambda c: _files_subjects(c.files),
        ids=lambda c: {"raw_data_file_ids": [str(f.file_id) for f in c.files]},
        overlay=_registered, shows=(FILE,),
    ),
    CommandSpec(
        RawDataCommand.RAW_DATA_PACKAGE_CREATE, CreateRawDataPackage, create_raw_data_package,
        _package_subjects, creates=PACKAGE,
        ids=lambda c: {"raw_data_package_id": str(c.id),
                       "raw_data_file_ids": [str(f.file_id) for f in c.files]},
        overlay=_package_created, shows=(FILE, PACKAGE),
    ),
    CommandSpec(
        RawDataCommand.RAW_DATA_PACKAGE_ADD_FILES, AddFilesToPackage, add_files_to_package,
        lambda c: [f"raw_data_package:{c.id}", *(f"raw_data_file:{f}" for f in c.file_ids)],
        target=_OPEN_PACKAGE, overlay=_files_added, shows=(FILE, PACKAGE),
    ),
    CommandSpec(
        RawDataCommand.RAW_DATA_PACKAGE_FINALIZE, FinalizeRawDataPackage,
        finalize_raw_data_package, lambda c: [f"raw_data_package:{c.id}"],
        target=_OPEN_PACKAGE, overlay=_finalized, shows=(PACKAGE,),
    ),
]
