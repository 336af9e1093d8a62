"""What every command model shares: the base class :class:`CommandModel` (storable input
only, documented in its JSON schema), free JSON, times (ISO 8601 or MJD / JD), checksums.

Each feature module (``commands/obs_units.py``, ``raw_data.py``, …) declares its own commands
as pydantic models (also the OpenAPI schema): a request model is what the client sends; the
journaled command adds the ids the server pre-generated (or the client chose), so the
dispatcher needs nothing else to apply it.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, date, datetime
from typing import Annotated, Any, ClassVar, Literal, Union

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
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from domain.provenance import utc

Name = Annotated[str, Field(min_length=1, max_length=255)]
Instrument = Annotated[str, Field(min_length=1, max_length=100, examples=["HARPS"])]

CHECKSUM_LENGTHS = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128, "crc32c": 8, "xxh64": 16}


def utcnow() -> datetime:
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
JSON_DEPTH_NOTE = f"At most {MAX_JSON_DEPTH} levels deep (the request body is level 1)."
Metadata = Annotated[
    FreeJson,
    Field(default_factory=dict, description=f"Free JSON metadata. {JSON_DEPTH_NOTE}",
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
    #: Only ever a part of another command, which checks it whole: not checked again alone.
    nested_only: ClassVar[bool] = False

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
        if not cls.nested_only and not (info.context and info.context.get("journaled")):
            found = json_problem(data)
            if found is not None:
                raise unstorable_error(*found)
        return data


#: Validation context of a command read back from the journal (checked when accepted).
JOURNALED = {"journaled": True}


def with_examples(*examples: dict[str, Any]) -> ConfigDict:
    """A command model's configuration: no fields but its own, ``examples`` in its schema."""
    return ConfigDict(extra="forbid", json_schema_extra={"examples": list(examples)})


# -- checksums (of raw data files and data products) -----------------------------------------
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
    nested_only: ClassVar[bool] = True

    @model_validator(mode="after")
    def _length(self) -> Checksum:
        expected = CHECKSUM_LENGTHS[self.algorithm]
        if len(self.value) != expected:
            raise ValueError(f"a {self.algorithm} checksum has {expected} hex digits")
        self.value = self.value.lower()
        return self


def observed_at_of(payload: CommandModel) -> datetime | None:
    """When the command's change happened at the telescope, where the command says so."""
    fields = type(payload).model_fields
    for name in ("start_time", "end_time", "created_at"):
        value = payload.__dict__.get(name) if name in fields else None
        if isinstance(value, datetime):
            return utc(value)
    return None
