"""The commands telescope automation sends, as pydantic models (also the OpenAPI schema).

A request model is what the client sends; the journaled command adds the ids the server
pre-generated (or the client chose), so the dispatcher needs nothing else to apply it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from datetime import UTC, date, datetime
from typing import Annotated, Any, Literal, Union
from uuid import UUID

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    RootModel,
    TypeAdapter,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from domain.errors import DuplicateEntity
from domain.provenance import utc
from domain.raw_data import raw_data_file_id
from domain.results import CopiesMode, copies_per_cell, leaf_cells

Name = Annotated[str, Field(min_length=1, max_length=255)]
Instrument = Annotated[str, Field(min_length=1, max_length=100, examples=["HARPS"])]

CHECKSUM_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128, "crc32c": 8, "xxh64": 16}


def _now() -> datetime:
    return datetime.now(UTC)


_INT64 = 2**63
#: How deep a command's JSON may nest (the body itself is level 1). Free-form fields
#: (``metadata``, ``spec_snapshot``, ``parameters``) stay far below what the encoders and
#: stores take (orjson: 254 levels, Python's json: ~1000) once wrapped in events and exports.
MAX_JSON_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")
#: A string without NUL characters (schema only: :func:`json_problem` enforces it).
NO_NUL = r"^[^\x00]*$"
#: ... that also has a character that is not whitespace (commands strip whitespace first).
NOT_BLANK = r"^[^\x00]*[^\s\x00][^\x00]*$"


def _text_problem(text: str, nul: bool = True) -> str | None:
    if nul and "\x00" in text:
        return "NUL characters are not allowed"
    if not text.isascii() and (bad := _SURROGATE.search(text)) is not None:
        return (f"a lone surrogate (U+{ord(bad.group()):04X}) is not text that can be stored "
                "as UTF-8")
    return None


def _key_path(path: str, key: Any) -> str:
    text = key if isinstance(key, str) else str(key)
    if not text.isascii():  # a field name that is itself unstorable, shown escaped
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return f"{path}.{text}" if path else text


def json_problem(value: Any, path: str = "", depth: int = 1,
                 *, command: bool = True) -> tuple[str, str] | None:
    """Where (a dotted field path) and why parsed JSON ``value`` cannot be stored, or None.

    Always refused: numbers that are not finite (NaN, infinities: not JSON, and the
    encoders write them as tokens no JSON parser reads back), lone surrogates (not UTF-8)
    and nesting deeper than :data:`MAX_JSON_DEPTH`. With ``command``, also what the stores
    cannot hold: NUL characters (PostgreSQL text and JSONB) and integers beyond 64 bits
    (BIGINT, orjson)."""
    if isinstance(value, str):
        if (problem := _text_problem(value, command)) is not None:
            return path or "body", problem
    elif isinstance(value, bool):
        return None
    elif isinstance(value, int):
        if command and not -_INT64 <= value < _INT64:
            return path or "body", "integers must fit in 64 bits"
    elif isinstance(value, float):
        if not math.isfinite(value):
            return path or "body", f"must be a finite number, not {value}"
    elif isinstance(value, dict | list | tuple):
        if depth > MAX_JSON_DEPTH:
            return path or "body", f"nested deeper than {MAX_JSON_DEPTH} levels"
        if isinstance(value, dict):
            for k, v in value.items():
                where = _key_path(path, k)
                if isinstance(k, str) and (problem := _text_problem(k, command)) is not None:
                    return where, f"{problem} in keys"
                if (found := json_problem(v, where, depth + 1, command=command)) is not None:
                    return found
        else:
            for i, v in enumerate(value):
                where = f"{path}.{i}" if path else str(i)
                if (found := json_problem(v, where, depth + 1, command=command)) is not None:
                    return found
    return None


def unstorable_error(field: str, message: str) -> PydanticCustomError:
    """The validation error of unstorable input: the HTTP layer names ``field`` (relative to
    where the error is raised) in its error format."""
    return PydanticCustomError("unstorable", "{field}: {message}",
                               {"field": field, "message": message})


# -- what the schema says of it ----------------------------------------------------------------
class _JsonKeys:
    """Schema only: an object's keys have no NUL characters."""

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = handler(core_schema)
        schema["propertyNames"] = {"pattern": NO_NUL}
        return schema


#: A JSON value :func:`json_problem` accepts, for the schema: text without NUL, numbers in
#: 64 bits (larger floats are accepted too: JSON Schema cannot tell 1e30 from a 31-digit
#: integer, which is refused), any nesting of those up to :data:`MAX_JSON_DEPTH` levels.
class JsonValue(RootModel[Union[  # noqa: UP007 - the forward references need Union
        Annotated[str, Field(pattern=NO_NUL)],
        Annotated[float, Field(ge=-_INT64, lt=_INT64)],
        bool,
        list["JsonValue"],
        Annotated[dict[str, "JsonValue"], _JsonKeys()],
        None]]):
    pass


_FREE_JSON_SCHEMA = TypeAdapter(Annotated[dict[str, JsonValue], _JsonKeys()]).core_schema


class _FreeJson:
    """Schema only: a free-form JSON object (validated as ``dict[str, Any]`` and checked by
    :func:`json_problem`, which the schema says as :data:`JsonValue`)."""

    def __get_pydantic_json_schema__(self, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return handler(_FREE_JSON_SCHEMA)


FreeJson = Annotated[dict[str, Any], _FreeJson()]
_DEPTH = f"At most {MAX_JSON_DEPTH} levels deep (the request body is level 1)."
Metadata = Annotated[
    FreeJson,
    Field(default_factory=dict, description=f"Free JSON metadata. {_DEPTH}",
          examples=[{"airmass": 1.12}]),
]


#: Text with a character that is not whitespace (models that strip whitespace first).
ANY_NOT_BLANK = r"^[\s\S]*\S[\s\S]*$"


def document_storable(schema: dict[str, Any], command: bool = True) -> None:
    """Say in a model's JSON schema what stripping whitespace makes of a length floor (not
    blank) and, for a command, what :func:`json_problem` enforces: text without NUL,
    integers in 64 bits."""
    for value in schema.get("properties", {}).values():
        _document_value(value, command)


def _document_value(schema: dict[str, Any], command: bool) -> None:
    if "$ref" in schema:  # another model: it documents itself
        return
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in schema.get(key, ()):
            _document_value(sub, command)
    if isinstance(schema.get("items"), dict):
        _document_value(schema["items"], command)
    kind = schema.get("type")
    if kind == "string" and not {"pattern", "format", "enum", "const"} & set(schema):
        floor = schema.get("minLength", 0) >= 1
        if command:
            schema["pattern"] = NOT_BLANK if floor else NO_NUL
        elif floor:
            schema["pattern"] = ANY_NOT_BLANK
    elif kind == "integer" and command:
        if "minimum" not in schema and "exclusiveMinimum" not in schema:
            schema["minimum"] = -_INT64
        if "maximum" not in schema and "exclusiveMaximum" not in schema:
            schema["exclusiveMaximum"] = _INT64


_EDGE_DAYS = (date(1, 1, 1), date(9999, 12, 31))


def _utc_representable(value: datetime, info: ValidationInfo) -> datetime:
    # the first and last days of the calendar: a time there may not exist in UTC, and a
    # JSON schema pattern can only refuse whole days. A journaled command holds the instant
    # already in UTC, which may fall on an edge day (0001-01-02T00:00+23:59 is
    # 0001-01-01T00:01Z): it was checked as the client wrote it when it was accepted.
    journaled = bool(info.context and info.context.get("journaled"))
    if value.date() in _EDGE_DAYS and not journaled:
        raise ValueError("must not be on 0001-01-01 or 9999-12-31")
    # in UTC from the edge on: the journal, pending rows and events all hold the same instant
    # in the same form, whatever offset the client wrote
    return value.astimezone(UTC)


#: Astronomical date numbers a time may be given as, with the range of days they may name
#: (0001-01-03 to 9999-12-29 in their scale: a day inside the times a command may carry
#: whatever the scale's offset from UTC), and the time scales they may be in.
_DATE_NUMBERS = {"mjd": (-678573.0, 2973481.0), "jd": (1721427.5, 5373482.5)}
_SCALES = ("utc", "tai", "tt")
_ISO_HINT = "an ISO 8601 date-time with its offset, e.g. 2026-11-21T23:00:00Z"
#: A number written as text ("61000.5"): pydantic would read it as Unix seconds.
_NUMBER_TEXT = re.compile(r"^\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*$")


def _astronomical_time(value: Any) -> Any:
    """A command's time as sent: ISO 8601 text passes on; ``{"mjd": …}`` or ``{"jd": …}``
    (``"scale"`` ``utc`` (default), ``tai`` or ``tt``) becomes that instant in UTC (astropy
    ``Time``); a bare number is refused: it is not said whether it is Unix seconds, an MJD
    or a JD (an MJD read as Unix seconds lands in 1970)."""
    if isinstance(value, int | float) or (
            isinstance(value, str) and _NUMBER_TEXT.match(value)):
        raise PydanticCustomError(
            "time_number", "a bare number is not a time: send {hint}, or {\"mjd\": "
            "61000.5} / {\"jd\": 2461001.0} (with \"scale\": utc, tai or tt)",
            {"hint": _ISO_HINT})
    if not isinstance(value, dict):
        return value
    kinds = [k for k in _DATE_NUMBERS if k in value]
    extra = set(value) - {*_DATE_NUMBERS, "scale"}
    number = value.get(kinds[0]) if len(kinds) == 1 else None
    scale = value.get("scale", "utc")
    if (len(kinds) != 1 or extra or scale not in _SCALES or isinstance(number, bool)
            or not isinstance(number, int | float) or not math.isfinite(number)):
        raise PydanticCustomError(
            "time_object", "a time object is {\"mjd\": number} or {\"jd\": number}, "
            "with an optional \"scale\" of utc, tai or tt", {})
    low, high = _DATE_NUMBERS[kinds[0]]
    if not low <= number <= high:
        raise PydanticCustomError(
            "time_range", "{kind} must be between {low} and {high} (0001-01-03 to 9999-12-29)",
            {"kind": kinds[0], "low": low, "high": high})
    from astropy.time import Time  # heavy: imported when a client first sends such a time

    instant = Time(number, format=kinds[0], scale=scale).utc.to_datetime()
    return instant.replace(tzinfo=UTC)


_TIME_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "format": "date-time",
         "pattern": r"^(?!0001-01-01|9999-12-31)(?!" + _NUMBER_TEXT.pattern[1:] + ")"},
        *({"type": "object", "additionalProperties": False, "required": [kind],
           "properties": {kind: {"type": "number", "minimum": low, "maximum": high},
                          "scale": {"enum": list(_SCALES), "default": "utc"}}}
          for kind, (low, high) in _DATE_NUMBERS.items()),
    ],
    "description": "ISO 8601 with an offset (stored and answered in UTC), or an MJD / JD "
                   "object with its time scale (astropy Time). Bare numbers are refused.",
}

UtcDatetime = Annotated[AwareDatetime, BeforeValidator(_astronomical_time),
                        AfterValidator(_utc_representable), WithJsonSchema(_TIME_SCHEMA)]


class CommandModel(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema = super().__get_pydantic_json_schema__(core_schema, handler)
        document_storable(handler.resolve_ref_schema(schema))
        return schema

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any, info: ValidationInfo) -> Any:
        # parts of a command were checked with the command, and a journaled command was
        # checked before the journal took it (the dispatcher passes JOURNALED)
        if cls not in _NESTED_ONLY and not (info.context and info.context.get("journaled")):
            found = json_problem(data)
            if found is not None:
                raise unstorable_error(*found)
        return data


#: Validation context of a command read back from the journal (checked when accepted).
JOURNALED = {"journaled": True}


# -- executed obs units ----------------------------------------------------------------------
class StartExecutedObsUnitRequest(CommandModel):
    id: UUID | None = Field(
        None, description="Pre-generated execution id; the server generates one if absent."
    )
    obs_unit_id: Annotated[str, Field(min_length=1, max_length=100, examples=["OU-2026-0412"])]
    instrument: Instrument
    start_time: UtcDatetime = Field(
        default_factory=_now, description="When the execution started at the telescope (UTC)."
    )
    metadata: Metadata

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "obs_unit_id": "OU-2026-0412",
                    "instrument": "HARPS",
                    "start_time": "2026-11-21T23:14:05Z",
                    "metadata": {"airmass": 1.12, "seeing_arcsec": 0.8},
                }
            ]
        },
    )


class StartExecutedObsUnit(StartExecutedObsUnitRequest):
    id: UUID


class FinishExecutedObsUnitRequest(CommandModel):
    status: Literal["success", "failed", "aborted"] = Field(examples=["success"])
    end_time: UtcDatetime = Field(default_factory=_now)
    metadata: Metadata

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"status": "success", "end_time": "2026-11-22T00:02:40Z",
                 "metadata": {"exposures": 12}}
            ]
        },
    )


class FinishExecutedObsUnit(FinishExecutedObsUnitRequest):
    id: UUID


# -- raw data files --------------------------------------------------------------------------
def _checksum_schema(schema: dict[str, Any]) -> None:
    """Each algorithm's length, in the schema (sha256 when no algorithm is given)."""
    schema["oneOf"] = [
        {"properties": {"algorithm": {"const": name},
                        "value": {"minLength": digits, "maxLength": digits}},
         **({} if name == "sha256" else {"required": ["algorithm"]})}
        for name, digits in CHECKSUM_LENGTHS.items()]


class Checksum(CommandModel):
    algorithm: Literal["md5", "sha1", "sha256", "sha512", "crc32c", "xxh64"] = "sha256"
    value: Annotated[str, Field(pattern=r"^[0-9a-fA-F]+$", examples=["9f86d081884c7d65..."],
                                description="Hex digits: md5 32, sha1 40, sha256 64, sha512 "
                                "128, crc32c 8, xxh64 16.")]

    model_config = ConfigDict(json_schema_extra=_checksum_schema)

    @model_validator(mode="after")
    def _length(self) -> Checksum:
        expected = CHECKSUM_LENGTHS[self.algorithm]
        if len(self.value) != expected:
            raise ValueError(f"a {self.algorithm} checksum has {expected} hex digits")
        self.value = self.value.lower()
        return self


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
        default_factory=_now, description="When the instrument wrote the file."
    )

    @field_validator("relative_path")
    @classmethod
    def _relative(cls, v: str) -> str:
        if v.startswith("/") or ".." in v.split("/"):
            raise ValueError("must be a relative path inside the instrument's data root")
        return v

    @property
    def file_id(self) -> UUID:
        return raw_data_file_id(self.instrument, self.name)


_NESTED_ONLY: tuple[type[CommandModel], ...] = (Checksum, RawDataFileSpec)

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
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [_FILE_EXAMPLE]})


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

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"files": [_FILE_EXAMPLE]}]}
    )

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, data: Any) -> Any:
        """The operations seed's shape too: a bare JSON list of the files."""
        return {"files": data} if isinstance(data, list) else data

    @model_validator(mode="after")
    def _names(self) -> BulkRegisterRawDataFilesRequest:
        _unique_names(self.files)
        return self


# -- raw data packages -----------------------------------------------------------------------
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

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"name": "HARPS-2026-11-21-OU-2026-0412", "files": [_FILE_EXAMPLE]}]
        },
    )

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

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"file_ids": ["1c49d49d-34d9-5c36-be8c-62dcce3da68c"]}]},
    )


class AddFilesToPackage(AddFilesToPackageRequest):
    id: UUID


class FinalizeRawDataPackage(CommandModel):
    id: UUID


# -- staging ---------------------------------------------------------------------------------
class StageRequest(CommandModel):
    id: UUID | None = Field(None, description="Pre-generated staging request id.")
    package_ids: list[UUID] = Field(min_length=1, max_length=10_000,
                                    json_schema_extra={"uniqueItems": True})
    destination: Annotated[
        str, Field(min_length=1, max_length=1024, examples=["archive-transfer:/stage/night-1121"])
    ]

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "package_ids": ["3fb1d267-f9f6-4599-a97a-74fed41eaa02"],
            "destination": "archive-transfer:/stage/night-1121"}]},
    )

    @field_validator("package_ids")
    @classmethod
    def _unique(cls, v: list[UUID]) -> list[UUID]:
        if len(set(v)) != len(v):
            raise ValueError("package_ids repeats an id")
        return v


class Stage(StageRequest):
    id: UUID


class StagingProgressRequest(CommandModel):
    status: Literal["in_progress", "completed", "failed"] = "in_progress"
    bytes_transferred: int = Field(ge=0)
    files_transferred: int = Field(ge=0)
    message: Annotated[str, Field(max_length=2000)] | None = None

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "status": "in_progress", "bytes_transferred": 8_396_640, "files_transferred": 1,
            "message": "transferring HARPS.2026-11-21T23:15:00.123.fits"}]},
    )


class ReportStagingProgress(StagingProgressRequest):
    id: UUID


class CancelStaging(CommandModel):
    id: UUID
    reason: Annotated[str, Field(max_length=2000)] | None = None


# -- observation results ---------------------------------------------------------------------
LeafIndex = Annotated[int, Field(ge=0, le=2**31 - 1)]


class MaterializeObservationResultsRequest(CommandModel):
    """A request spec: every (epoch, sample, copy) leaf cell becomes an observation result."""

    observation_id: LeafIndex
    request_id: LeafIndex
    epochs: int = Field(1, ge=1, le=100_000)
    samples: int = Field(1, ge=1, le=100_000)
    copies_mode: Literal["single", "all_eligible", "count"] = "single"
    copies: int = Field(1, ge=1, le=1000, description="Copies per cell with copies_mode=count.")
    eligible_instruments: list[Instrument] = Field(
        default_factory=list, max_length=100, json_schema_extra={"uniqueItems": True},
        description="all_eligible: one copy per instrument; otherwise the first, if any, is "
        "the result's instrument.")
    not_before: UtcDatetime | None = None
    spec_snapshot: FreeJson | None = Field(
        None, description=f"The request spec as it was when materialized (stored as is). "
        f"{_DEPTH}")

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "observation_id": 7, "request_id": 42, "epochs": 3, "samples": 2,
            "copies_mode": "all_eligible", "eligible_instruments": ["HARPS", "ESPRESSO"],
            "not_before": "2026-11-22T00:00:00Z", "spec_snapshot": {"exptime": 600}}],
            "description": "A request spec: every (epoch, sample, copy) leaf cell becomes an "
            "observation result; at most 100,000 cells (epochs x samples x copies) per "
            "command (422: JSON Schema cannot multiply).",
            # copies only with copies_mode=count; all_eligible needs eligible_instruments
            "oneOf": [
                {"properties": {"copies_mode": {"const": "single"}, "copies": {"const": 1}}},
                {"properties": {"copies_mode": {"const": "all_eligible"},
                                "copies": {"const": 1},
                                "eligible_instruments": {"minItems": 1}},
                 "required": ["copies_mode", "eligible_instruments"]},
                {"properties": {"copies_mode": {"const": "count"}},
                 "required": ["copies_mode"]}]},
    )

    @model_validator(mode="after")
    def _copies(self) -> MaterializeObservationResultsRequest:
        if self.copies_mode == "all_eligible" and not self.eligible_instruments:
            raise ValueError("copies_mode all_eligible needs eligible_instruments")
        if len(set(self.eligible_instruments)) != len(self.eligible_instruments):
            raise ValueError("eligible_instruments repeats an instrument")
        if self.copies_mode != "count" and "copies" in self.model_fields_set \
                and self.copies != 1:
            raise ValueError("copies is only meaningful with copies_mode=count")
        if self.cell_count() > MAX_RESULTS_PER_COMMAND:
            raise ValueError(f"the spec has {self.cell_count()} leaf cells; at most "
                             f"{MAX_RESULTS_PER_COMMAND} per command")
        return self

    def cells(self) -> Iterator[tuple[UUID, int, int, int, str | None]]:
        """(result id, epoch, sample, copy, instrument) of every leaf cell."""
        return leaf_cells(self.observation_id, self.request_id, self.epochs, self.samples,
                          self.copies_per_cell())

    def copies_per_cell(self) -> list[str | None]:
        return copies_per_cell(CopiesMode(self.copies_mode), self.copies,
                               self.eligible_instruments)

    def cell_count(self) -> int:
        return self.epochs * self.samples * len(self.copies_per_cell())


MAX_RESULTS_PER_COMMAND = 100_000


class DispatchObservationResultRequest(CommandModel):
    task_id: UUID | None = Field(None, description="Pre-generated task id.")
    instrument_id: Instrument | None = None
    executed_obs_unit_id: UUID | None = Field(
        None, description="The executed obs unit carrying out the task, if known.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "instrument_id": "HARPS", "executed_obs_unit_id": "e433bda1-579b-4946-9f02-7a3e4a04efe2"}]})


class DispatchObservationResult(DispatchObservationResultRequest):
    id: UUID
    task_id: UUID


class TaskOutcomeRequest(CommandModel):
    outcome: Literal["succeeded", "partial", "failed", "canceled"]
    finished_at: UtcDatetime = Field(default_factory=_now)
    executed_obs_unit_id: UUID | None = None

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "outcome": "succeeded", "finished_at": "2026-11-22T03:10:00Z"}]})


class ReportTaskOutcome(TaskOutcomeRequest):
    id: UUID
    task_id: UUID


class CancelObservationResultRequest(CommandModel):
    reason: Annotated[str, Field(min_length=1, max_length=2000)]

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"reason": "request withdrawn by the PI"}]})


class CancelObservationResult(CancelObservationResultRequest):
    id: UUID


class ContributeAssetRequest(CommandModel):
    asset_id: Annotated[str, Field(min_length=1, max_length=255, description=(
        "What contributes (e.g. raw_data_file:<id>); counted once per result."))]

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "asset_id": "raw_data_file:1c49d49d-34d9-5c36-be8c-62dcce3da68c"}]})


class ContributeAsset(ContributeAssetRequest):
    id: UUID


class StartProcessingRunRequest(CommandModel):
    run_id: UUID | None = Field(None, description="Pre-generated processing run id.")

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"run_id": "0e5c1b1e-6f57-4d0c-9a53-3c3f4b7e2d11"}]})


class StartProcessingRun(StartProcessingRunRequest):
    id: UUID
    run_id: UUID


class ProductOutput(CommandModel):
    """One data product a run produced."""

    name: Name
    kind: Annotated[str, Field(min_length=1, max_length=50, examples=["combined_image"])]
    uri: Annotated[str, Field(max_length=2048)] | None = None
    size: int | None = Field(None, ge=0)
    checksum: Checksum | None = None
    metadata: Metadata


class EndProcessingRunRequest(CommandModel):
    end: Literal["completed", "failed", "blocked", "skipped"]
    outputs: list[ProductOutput] = Field(default_factory=list, max_length=10_000)
    error: Annotated[str, Field(max_length=4000)] | None = None

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        # a completed run has no error; another has no outputs
        "oneOf": [{"properties": {"end": {"const": "completed"}, "error": {"type": "null"}}},
                  {"properties": {"end": {"enum": ["failed", "blocked", "skipped"]},
                                  "outputs": {"maxItems": 0}}}],
        "examples": [
            {"end": "completed", "outputs": [{
                "name": "OR-7-42-0-1-0_combined.fits", "kind": "combined_image",
                "uri": "products/7/42/combined.fits", "size": 16793280,
                "checksum": {"algorithm": "sha256", "value": "ab" * 32}}]},
            {"end": "failed", "error": "no master bias among the inputs"}]})

    @model_validator(mode="after")
    def _consistent(self) -> EndProcessingRunRequest:
        if self.end == "completed" and self.error is not None:
            raise ValueError("a completed run has no error")
        if self.end != "completed" and self.outputs:
            raise ValueError(f"a {self.end} run has no outputs")
        return self


class EndProcessingRun(EndProcessingRunRequest):
    id: UUID
    run_id: UUID


def observed_at_of(payload: CommandModel) -> datetime | None:
    """When the command's change happened at the telescope, where the command says so."""
    fields = type(payload).model_fields
    for name in ("start_time", "end_time", "created_at"):
        value = payload.__dict__.get(name) if name in fields else None
        if isinstance(value, datetime):
            return utc(value)
    return None
