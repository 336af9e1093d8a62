"""The processing algorithms, registered by name and version, each with a pydantic parameter
schema: ``algorithm(name, version)`` finds one, ``describe`` tells clients about it
(``GET /ops/algorithms``), ``plan`` checks inputs without touching data, ``run`` makes the
products in a work directory.

``ccd_stack`` 1.1.0: classify the frames (bias, dark, flat, science), build master calibration
frames, calibrate the science frames, sigma-clip combine them band by band, estimate background
and noise, detect sources, and write the combined image (FITS) and the source catalogue (ECSV).
"""

from __future__ import annotations

import dataclasses
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from domain.errors import InvalidCommand
from domain.reduction import (
    CalibratedFrame,
    FrameRows,
    ReductionCancelled,
    background_and_noise,
    combine_frames,
    detect_sources,
    master_bias,
    master_dark,
    master_flat,
)
from infra.fits_check import is_fits_name
from infra.fits_products import (
    InputRecord,
    ProductProvenance,
    open_image_rows,
    read_header,
    write_combined_image,
    write_source_catalog,
)


class UnknownAlgorithm(InvalidCommand):
    """No algorithm is registered under that name (and version)."""


@dataclass(frozen=True)
class AlgorithmInput:
    """What the worker hands an algorithm: a raw data file made local."""

    file_id: UUID
    name: str
    path: Path
    size: int
    checksum: tuple[str, str] | None  # recorded (algorithm, value) of the raw data file
    file_type: str | None  # the raw data file's file_type, e.g. "science", "bias", "flat"
    metadata: dict[str, Any] = field(default_factory=dict)  # ingest adds FITS header facts


@dataclass(frozen=True)
class PlannedProduct:
    kind: str
    name: str
    media_type: str
    description: str


@dataclass(frozen=True)
class AlgorithmPlan:
    steps: list[str]
    products: list[PlannedProduct]
    notes: list[str]


@dataclass
class ProductFile:
    kind: str
    path: Path
    media_type: str
    metrics: dict[str, float | int | str]
    #: the inputs it was made from, each with the role the algorithm gave it
    inputs: list[InputRecord] = field(default_factory=list)


class StepReporter(Protocol):
    def step(self, name: str) -> AbstractContextManager[None]: ...  # started / completed

    def progress(self, fraction: float) -> None: ...  # 0..1 within the run

    def cancelled(self) -> bool: ...  # cooperative cancel


class LocalReporter:
    """A ``StepReporter`` kept in memory: the steps run (in order), the last progress, and a
    cancel flag (``cancel()``, thread-safe). Used where no job records the run (command line,
    benchmarks, tests); ``on_step`` sees each step name as it starts."""

    def __init__(self, on_step: Callable[[str], None] | None = None) -> None:
        self.steps: list[str] = []
        self.completed: list[str] = []
        self.fraction = 0.0
        self._cancel = threading.Event()
        self._on_step = on_step

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        self.steps.append(name)
        if self._on_step is not None:
            self._on_step(name)
        yield
        self.completed.append(name)

    def progress(self, fraction: float) -> None:
        self.fraction = fraction

    def cancel(self) -> None:
        self._cancel.set()

    def cancelled(self) -> bool:
        return self._cancel.is_set()


class Algorithm(ABC):
    name: ClassVar[str]
    version: ClassVar[str]
    summary: ClassVar[str]
    Parameters: ClassVar[type[BaseModel]]
    #: every step ``run`` may report, in order (``plan`` lists the ones a run will take)
    all_steps: ClassVar[tuple[str, ...]]

    def parameters(self, raw: Mapping[str, Any] | None) -> BaseModel:
        """The validated parameters; ``InvalidCommand`` naming the field when they are not."""
        try:
            return self.Parameters.model_validate(dict(raw or {}))
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise InvalidCommand(
                f"invalid parameters for {self.name} {self.version}: {loc}: {first['msg']}",
                field=f"parameters.{loc}" if loc else "parameters") from e

    @abstractmethod
    def plan(self, inputs: list[AlgorithmInput], params: BaseModel) -> AlgorithmPlan: ...

    @abstractmethod
    def run(self, inputs: list[AlgorithmInput], params: BaseModel, workdir: Path,
            reporter: StepReporter, provenance: ProductProvenance) -> list[ProductFile]: ...


# -- ccd_stack -----------------------------------------------------------------------------------
FRAME_KINDS: dict[str, frozenset[str]] = {
    "bias": frozenset({"bias", "zero", "bias frame", "zero frame", "masterbias"}),
    "dark": frozenset({"dark", "dark frame", "dark current"}),
    "flat": frozenset({"flat", "flat field", "flatfield", "flat frame", "dome flat",
                       "domeflat", "sky flat", "skyflat", "twilight flat"}),
    "science": frozenset({"science", "object", "light", "light frame", "object frame",
                          "imaging", "spectroscopic", "target", "sci"}),
}
#: frame types ccd_stack cannot use
UNUSABLE_KINDS = frozenset({"arc", "comp", "comparison", "lamp", "wave", "wavecal", "focus",
                            "test", "acquisition", "acq", "guide"})


def _normalised(kind: str) -> str:
    text = kind.strip().lower().replace("_", " ").replace("-", " ")
    for prefix in ("raw ", "master "):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return " ".join(text.split())


def frame_kind(value: str | None) -> str | None:
    """bias / dark / flat / science for a file_type or IMAGETYP value; "unusable" for arcs,
    lamps, focus frames...; None when the value says nothing known."""
    if not value:
        return None
    text = _normalised(value)
    for kind, names in FRAME_KINDS.items():
        if text in names:
            return kind
    if text in UNUSABLE_KINDS or text.split(" ")[0] in UNUSABLE_KINDS:
        return "unusable"
    return None


@dataclass(frozen=True)
class _Frame:
    input: AlgorithmInput
    kind: str
    shape: tuple[int, int] | None  # None: not known before the file is read
    exptime: float | None
    unit: str | None
    how: str  # what said the kind: "file_type 'raw_bias'", "IMAGETYP 'ZERO'", ...


class CcdStackParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sigma: float = Field(3.0, gt=0, le=20, description=(
        "clip bound of the combine, in standard deviations around the median of each pixel"))
    maxiters: int = Field(5, ge=1, le=50, description="most clipping iterations per pixel")
    chunk_rows: int | None = Field(None, ge=1, description=(
        "rows per band of the combine; default: a band of every frame fits in 64 MB"))
    background_sigma: float = Field(3.0, gt=0, le=20, description=(
        "clip bound of the background and noise statistics of the combined image"))
    threshold_sigma: float = Field(5.0, gt=0, le=10000, description=(
        "detection threshold above the background, in noise standard deviations"))
    min_pixels: int = Field(5, ge=1, le=100000, description=(
        "fewest connected pixels above the threshold that make a source"))
    grow_pixels: float = Field(3.0, ge=0, le=100, description=(
        "pixels by which a source's footprint grows for its flux (takes in the wings)"))


class CcdStack(Algorithm):
    name = "ccd_stack"
    version = "1.1.0"
    summary = ("Calibrate CCD frames with master bias, dark and flat frames found among the "
               "inputs, sigma-clip combine the science frames band by band, estimate "
               "background and noise, and detect sources")
    Parameters = CcdStackParameters
    all_steps = ("classify", "master_bias", "master_dark", "master_flat", "combine",
                 "background", "detect", "write_products")
    products = (
        PlannedProduct("combined_image", "combined_image.fits", "application/fits",
                       "the calibrated, sigma-clipped mean of the science frames; HISTORY "
                       "cards give inputs with checksums, algorithm, parameters, software"),
        PlannedProduct("source_catalog", "source_catalog.ecsv", "text/x-ecsv",
                       "detected sources: 0-based pixel centroid, flux, peak, pixels"),
    )

    def _classify(self, inputs: list[AlgorithmInput]) -> tuple[list[_Frame], list[str]]:
        if not inputs:
            raise InvalidCommand("ccd_stack needs at least one science frame; no inputs given",
                                 field="inputs")
        frames: list[_Frame] = []
        notes: list[str] = []
        for inp in inputs:
            if not is_fits_name(inp.name):
                raise InvalidCommand(f"{inp.name} is not a FITS file (ccd_stack reads FITS "
                                     "images)", field="inputs")
            meta = dict(inp.metadata)
            if "shape" not in meta and inp.path.is_file():
                try:
                    meta = {**read_header(inp.path), **meta}
                except Exception as e:  # astropy raises many kinds for a damaged file
                    raise InvalidCommand(f"{inp.name} is not a readable FITS file: {e}",
                                         field="inputs") from e
            kind, how = frame_kind(inp.file_type), f"file_type {inp.file_type!r}"
            if kind is None:
                keyword = meta.get("frame_type_keyword") or "header"  # ingested before 1.1.0
                kind, how = frame_kind(meta.get("frame_type")), \
                    f"{keyword} {meta.get('frame_type')!r}"
            if kind is None:
                kind, how = "science", "no known frame type: taken as science"
                notes.append(f"{inp.name}: no known frame type (file_type {inp.file_type!r}, "
                             f"header {meta.get('frame_type')!r}): taken as a science frame")
            if kind == "unusable":
                raise InvalidCommand(f"{inp.name} is a {how} frame, which ccd_stack cannot use "
                                     "(it takes bias, dark, flat and science frames)",
                                     field="inputs")
            shape: tuple[int, int] | None = None
            if "shape" in meta:
                raw_shape = meta["shape"]
                if not raw_shape or len(raw_shape) != 2:
                    raise InvalidCommand(f"{inp.name} is not an image: it has no 2-D image HDU",
                                         field="inputs")
                shape = (int(raw_shape[0]), int(raw_shape[1]))
            else:
                notes.append(f"{inp.name}: shape not known yet (not ingested): checked when "
                             "the file is read")
            exptime = meta.get("exptime")
            frames.append(_Frame(inp, kind, shape,
                                 float(exptime) if isinstance(exptime, int | float) else None,
                                 meta.get("unit"), how))
        science = [f for f in frames if f.kind == "science"]
        if not science:
            kinds = ", ".join(f"{f.input.name} ({f.kind})" for f in frames)
            raise InvalidCommand(f"no science frame among the inputs: {kinds}", field="inputs")
        shapes = {f.shape for f in frames if f.shape is not None}
        if len(shapes) > 1:
            listed = ", ".join(f"{f.input.name} {f.shape[0]}x{f.shape[1]}"
                               for f in frames if f.shape is not None)
            raise InvalidCommand(f"frames differ in shape (rows x columns): {listed}",
                                 field="inputs")
        return frames, notes

    def _steps(self, frames: list[_Frame]) -> list[str]:
        kinds = {f.kind for f in frames}
        return ["classify", *(f"master_{k}" for k in ("bias", "dark", "flat") if k in kinds),
                "combine", "background", "detect", "write_products"]

    def plan(self, inputs: list[AlgorithmInput], params: BaseModel) -> AlgorithmPlan:
        frames, notes = self._classify(inputs)
        counts = {k: sum(1 for f in frames if f.kind == k)
                  for k in ("science", "bias", "dark", "flat")}
        notes.insert(0, ", ".join(f"{n} {k}" for k, n in counts.items() if n))
        if counts["science"] == 1:
            notes.append("one science frame: the combined image is that frame, calibrated")
        for k in ("bias", "dark", "flat"):
            if not counts[k]:
                done_to = "flat-fielded" if k == "flat" else f"{k}-subtracted"
                notes.append(f"no {k} frames: not {done_to}")
        if counts["dark"] and not self._dark_as_rate(frames):
            notes.append("exposure times not all known: the master dark is subtracted unscaled")
        return AlgorithmPlan(steps=self._steps(frames), products=list(self.products),
                             notes=notes)

    @staticmethod
    def _dark_as_rate(frames: list[_Frame]) -> bool:
        return all(f.exptime for f in frames if f.kind != "bias")

    def run(self, inputs: list[AlgorithmInput], params: BaseModel, workdir: Path,
            reporter: StepReporter, provenance: ProductProvenance) -> list[ProductFile]:
        """The products; ``InvalidCommand`` when the data turn out unusable (a flat without
        signal, an image without finite pixels, a file cut short), ``ReductionCancelled``
        when cancelled."""
        try:
            return self._run(inputs, params, workdir, reporter, provenance)
        except ValueError as e:  # the numerics' and readers' refusals of the data
            raise InvalidCommand(f"ccd_stack cannot reduce these inputs: {e}",
                                 field="inputs") from e

    def _run(self, inputs: list[AlgorithmInput], params: BaseModel, workdir: Path,
             reporter: StepReporter, provenance: ProductProvenance) -> list[ProductFile]:
        p = CcdStackParameters.model_validate(params.model_dump())
        classified = self._classify(inputs)[0]
        records = [dataclasses.replace(r, role=f.kind, classified_from=f.how)
                   for r, f in zip(input_records(inputs), classified, strict=True)]
        provenance = dataclasses.replace(
            provenance, algorithm=self.name, algorithm_version=self.version,
            parameters=p.model_dump(), inputs=records)
        steps = self._steps(classified)
        done = 0

        def check() -> None:
            if reporter.cancelled():
                raise ReductionCancelled("cancelled between steps")

        def advance(within: float = 1.0) -> None:
            reporter.progress(min(1.0, (done + within) / len(steps)))

        clip: dict[str, Any] = {"sigma": p.sigma, "maxiters": p.maxiters,
                                "chunk_rows": p.chunk_rows, "cancelled": reporter.cancelled}
        workdir.mkdir(parents=True, exist_ok=True)
        with ExitStack() as files:
            with reporter.step("classify"):
                frames = self._read_frames(inputs, files)
            done += 1
            advance(0.0)
            by_kind = {k: [f for f in frames if f[0].kind == k]
                       for k in ("bias", "dark", "flat", "science")}
            rate = self._dark_as_rate([f[0] for f in frames])
            bias = dark = flat = None
            dark_exptime: float | None = None
            if by_kind["bias"]:
                check()
                with reporter.step("master_bias"):
                    bias = master_bias([r for _, r in by_kind["bias"]], **clip)
                done += 1
                advance(0.0)
            if by_kind["dark"]:
                check()
                with reporter.step("master_dark"):
                    dark = master_dark([r for _, r in by_kind["dark"]], bias=bias,
                                       exptimes=[f.exptime for f, _ in by_kind["dark"]]
                                       if rate else None, **clip)
                dark_exptime = 1.0 if rate else None
                done += 1
                advance(0.0)
            if by_kind["flat"]:
                check()
                with reporter.step("master_flat"):
                    flat = master_flat([r for _, r in by_kind["flat"]], bias=bias, dark=dark,
                                       exptimes=[f.exptime for f, _ in by_kind["flat"]],
                                       dark_exptime=dark_exptime, **clip)
                done += 1
                advance(0.0)
            check()
            with reporter.step("combine"):
                science: list[FrameRows] = [
                    CalibratedFrame(r, bias=bias, dark=dark, flat=flat, exptime=f.exptime,
                                    dark_exptime=dark_exptime)
                    if bias is not None or dark is not None or flat is not None else r
                    for f, r in by_kind["science"]]
                combined = combine_frames(science, progress=advance, **clip)
            done += 1
        check()
        with reporter.step("background"):
            estimate = background_and_noise(combined.image, sigma=p.background_sigma)
        done += 1
        advance(0.0)
        check()
        with reporter.step("detect"):
            sources = detect_sources(combined.image, estimate.background, estimate.noise,
                                     threshold_sigma=p.threshold_sigma,
                                     min_pixels=p.min_pixels, grow_pixels=p.grow_pixels)
        done += 1
        advance(0.0)
        check()
        metrics: dict[str, float | int | str] = {
            "noise": estimate.noise, "background": estimate.background,
            "source_count": len(sources), "rejected_pixels": combined.rejected_pixels,
            "nframes": combined.nframes,
            "calibration_frames": sum(len(by_kind[k]) for k in ("bias", "dark", "flat")),
        }
        unit = next((f.unit for f, _ in by_kind["science"] if f.unit), None)
        with reporter.step("write_products"):
            image_path = workdir / self.products[0].name
            catalog_path = workdir / self.products[1].name
            write_combined_image(image_path, combined.image, provenance=provenance,
                                 metrics=metrics, unit=unit)
            write_source_catalog(catalog_path, sources, provenance=provenance)
        reporter.progress(1.0)
        return [ProductFile(self.products[0].kind, image_path, self.products[0].media_type,
                            dict(metrics), records),
                ProductFile(self.products[1].kind, catalog_path, self.products[1].media_type,
                            {"source_count": len(sources)}, records)]

    def _read_frames(self, inputs: list[AlgorithmInput], files: ExitStack
                     ) -> list[tuple[_Frame, FrameRows]]:
        """Open every input's image (row-band access) and check the shapes on the data."""
        frames, _ = self._classify(inputs)
        opened: list[tuple[_Frame, FrameRows]] = []
        for f in frames:
            try:
                rows = files.enter_context(open_image_rows(f.input.path))
            except Exception as e:  # FitsRejected or astropy's errors for a damaged file
                raise InvalidCommand(f"{f.input.name} cannot be read as an image: {e}",
                                     field="inputs") from e
            opened.append((dataclasses.replace(f, shape=rows.shape), rows))
        shapes = {f.shape for f, _ in opened}
        if len(shapes) > 1:
            listed = ", ".join(f"{f.input.name} {f.shape[0]}x{f.shape[1]}"
                               for f, _ in opened if f.shape is not None)
            raise InvalidCommand(f"frames differ in shape (rows x columns): {listed}",
                                 field="inputs")
        return opened


# -- the registry ------------------------------------------------------------------------------
_REGISTRY: dict[str, dict[str, Algorithm]] = {}


def register(a: Algorithm) -> Algorithm:
    _REGISTRY.setdefault(a.name, {})[a.version] = a
    return a


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("."))


def algorithm(name: str, version: str | None = None) -> Algorithm:
    """The algorithm registered as ``name`` (``version``; the latest when None)."""
    versions = _REGISTRY.get(name)
    if not versions:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        raise UnknownAlgorithm(f"no algorithm named {name!r} (registered: {known})",
                               field="algorithm")
    if version is None:
        return versions[max(versions, key=_version_key)]
    if version not in versions:
        raise UnknownAlgorithm(f"{name} has no version {version!r} (registered: "
                               f"{', '.join(sorted(versions, key=_version_key))})",
                               field="version")
    return versions[version]


def registered_algorithms() -> list[Algorithm]:
    return [_REGISTRY[name][v] for name in sorted(_REGISTRY)
            for v in sorted(_REGISTRY[name], key=_version_key)]


def describe(a: Algorithm) -> dict[str, Any]:
    """What ``GET /ops/algorithms`` says about an algorithm."""
    return {"name": a.name, "version": a.version, "summary": a.summary,
            "parameters": a.Parameters.model_json_schema(), "steps": list(a.all_steps),
            "products": [dataclasses.asdict(p) for p in getattr(a, "products", ())]}


def input_records(inputs: list[AlgorithmInput]) -> list[InputRecord]:
    """Provenance records of the inputs (file id, name, "algorithm:value"; no role yet: the
    algorithm gives each one its role when it classifies them)."""
    return [InputRecord(str(i.file_id), i.name,
                        f"{i.checksum[0]}:{i.checksum[1]}" if i.checksum else "unknown")
            for i in inputs]


def validate_inputs(name: str, version: str | None, inputs: list[AlgorithmInput],
                    parameters: Mapping[str, Any] | None
                    ) -> tuple[Algorithm, BaseModel, AlgorithmPlan]:
    """Look up the algorithm, validate its parameters and plan the inputs: the synchronous
    check of a processing request. Raises ``UnknownAlgorithm`` or ``InvalidCommand``."""
    a = algorithm(name, version)
    params = a.parameters(parameters)
    return a, params, a.plan(inputs, params)


register(CcdStack())
