"""FITS I/O of the processing pipeline: ingest checks and header facts of raw data files,
row-band access to a file's science image, and the written products (combined image,
source catalogue) with their provenance.

Structure and CHECKSUM/DATASUM checks and file digests are ``infra.fits_check``'s."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from domain.reduction import DetectedSource
from infra.fits_check import FitsInvalid, file_digest, verify_fits

#: header keywords copied into a raw data file's metadata: metadata key → FITS keyword
HEADER_FACTS = {
    "telescope": "TELESCOP",
    "instrument": "INSTRUME",
    "date_obs": "DATE-OBS",
    "exptime": "EXPTIME",
    "object": "OBJECT",
}
#: keywords naming the kind of frame (bias, dark, flat, object), first found wins
FRAME_TYPE_KEYWORDS = ("IMAGETYP", "OBSTYPE")


class FitsRejected(FitsInvalid):
    """A raw data file the pipeline cannot use; ``reason`` says why, for a person."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class FitsIngestReport:
    path: Path
    metadata: dict[str, Any]  # JSON-serialisable header facts (see ``ingest_fits``)
    checksum: tuple[str, str] | None  # the recorded checksum, verified; None when not given
    hdus: int
    fits_checksums_verified: int  # HDUs whose DATASUM/CHECKSUM cards were verified


@dataclass(frozen=True)
class InputRecord:
    """One input of a product: the raw data file, its checksum, and how the algorithm used it
    (``role``: bias, dark, flat, science) and what said so (``classified_from``: ``file_type
    'raw_bias'``, ``IMAGETYP 'ZERO'``, ...); both None until the algorithm has classified it."""

    file_id: str
    name: str
    checksum: str  # "algorithm:value", or "unknown"
    role: str | None = None
    classified_from: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"file_id": self.file_id, "name": self.name, "checksum": self.checksum,
                "role": self.role, "classified_from": self.classified_from}


@dataclass(frozen=True)
class ProductProvenance:
    """Where a product comes from: written into its FITS header and catalogue metadata."""

    algorithm: str
    algorithm_version: str
    parameters: dict[str, Any]
    inputs: list[InputRecord]
    software: dict[str, str] = field(default_factory=lambda: software_versions())
    job_id: str | None = None
    run_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "algorithm_version": self.algorithm_version,
                "parameters": self.parameters, "inputs": [i.to_json() for i in self.inputs],
                "software": self.software, "job_id": self.job_id, "run_id": self.run_id}


def software_versions() -> dict[str, str]:
    """Versions of the software a product is made with."""
    out: dict[str, str] = {}
    for dist in ("obsledger", "numpy", "scipy", "astropy"):
        try:
            out[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            out[dist] = "unknown"
    return out


# -- reading -----------------------------------------------------------------------------------
def _json_value(value: Any) -> Any:
    """A header value as JSON: str/int/float/bool, None for undefined or non-finite."""
    if value is None or isinstance(value, bool | int | str):
        return value if not isinstance(value, str) else value.strip()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.generic):
        return _json_value(value.item())
    return str(value)


def _image_hdu_index(hdul: Any) -> int | None:
    """The science image: the first 2-D image HDU named SCI, else the first 2-D image HDU."""
    from astropy.io import fits

    images = [i for i, h in enumerate(hdul)
              if isinstance(h, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU)
              and h.header.get("NAXIS") == 2 and not isinstance(h, fits.GroupsHDU)]
    for i in images:
        if hdul[i].name == "SCI":
            return i
    return images[0] if images else None


def _header_fact(headers: Sequence[Any], keyword: str) -> Any:
    for header in headers:
        if keyword in header and header[keyword] is not None:
            value = _json_value(header[keyword])
            if value != "":
                return value
    return None


def ingest_fits(path: Path, recorded_checksum: tuple[str, str] | None) -> FitsIngestReport:
    """Check a raw data file and read its header facts.

    The recorded checksum ((algorithm, hex value): sha256, md5, sha1 or sha512) must match the
    file; every HDU must be readable and its DATASUM/CHECKSUM cards, where present, must match.
    ``metadata`` holds telescope, instrument, date_obs, exptime, object (None when the header
    lacks them; the image HDU's header first, then the primary header), frame_type (IMAGETYP or
    OBSTYPE), image_hdu (index, or None without a 2-D image), image_extname, shape ([rows,
    columns]), unit (BUNIT), bitpix, hdus and fits_checksums_verified.
    Raises ``FitsRejected`` with the reason."""
    if not path.is_file():
        raise FitsRejected(f"{path.name}: no such file")
    if recorded_checksum is not None:
        algorithm, expected = recorded_checksum
        try:
            actual = file_digest(path, algorithm)
        except ValueError as e:
            raise FitsRejected(f"{path.name}: {e}") from e
        if actual.lower() != expected.strip().lower():
            raise FitsRejected(f"{path.name}: {algorithm} checksum mismatch: recorded "
                               f"{expected}, the file has {actual}")
    try:
        summary = verify_fits(path)
    except FitsInvalid as e:
        raise FitsRejected(f"{path.name}: {e}") from e
    try:
        meta = read_header(path)
    except Exception as e:  # verify_fits read it; anything here is still a damaged file
        raise FitsRejected(f"{path.name}: not a readable FITS file: {type(e).__name__}: {e}") \
            from e
    meta["hdus"] = summary["hdus"]
    meta["fits_checksums_verified"] = summary["checksums_verified"]
    json.dumps(meta)  # JSON-serialisable by construction; fail loudly here if not
    return FitsIngestReport(path=path, metadata=meta, checksum=recorded_checksum,
                            hdus=summary["hdus"],
                            fits_checksums_verified=summary["checksums_verified"])


#: FITS BITPIX → the big-endian dtype of the stored values
BITPIX_DTYPES = {8: ">u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}


class ImageRows:
    """The science image of a FITS file, read a band of rows at a time (a
    ``domain.reduction.FrameRows``): ``rows[r0:r1]`` gives those rows as float32, scaled by
    BSCALE/BZERO, BLANK pixels as NaN.

    An uncompressed image is read with plain file reads of the band's bytes (no memory map:
    file pages stay in the page cache and never count against the process); a tile-compressed
    HDU or a gzipped file goes through astropy's lazy ``section``."""

    def __init__(self, path: Path, hdul: Any, index: int) -> None:
        from astropy.io import fits

        hdu = hdul[index]
        header = hdu.header
        self.header = header
        self.shape: tuple[int, int] = (int(hdu.shape[0]), int(hdu.shape[1]))
        info = hdul.fileinfo(index) or {}
        direct = (not isinstance(hdu, fits.CompImageHDU)
                  and getattr(info.get("file"), "compression", None) is None
                  and int(header["BITPIX"]) in BITPIX_DTYPES)
        self._section = None if direct else hdu.section
        self._file = open(path, "rb") if direct else None  # noqa: SIM115 (closed by close())
        self._offset = int(info.get("datLoc", 0))
        self._dtype = np.dtype(BITPIX_DTYPES.get(int(header["BITPIX"]), ">f4"))
        self._bscale = float(header.get("BSCALE", 1.0))
        self._bzero = float(header.get("BZERO", 0.0))
        blank = header.get("BLANK")
        self._blank = blank if isinstance(blank, int) and int(header["BITPIX"]) > 0 else None

    def __getitem__(self, key: slice, /) -> NDArray[np.float32]:
        r0, r1, step = key.indices(self.shape[0])
        ncols = self.shape[1]
        if self._file is not None and step == 1:
            count = max(0, r1 - r0) * ncols
            self._file.seek(self._offset + r0 * ncols * self._dtype.itemsize)
            raw = np.fromfile(self._file, dtype=self._dtype, count=count).reshape(-1, ncols)
            if raw.size != count:
                raise ValueError(f"{self._file.name}: truncated image data")
        elif self._section is not None:
            raw = np.asarray(self._section[key])  # unscaled: opened do_not_scale_image_data
        else:
            raise ValueError("image rows are read in contiguous bands")
        rows = raw.astype(np.float32)
        if self._bscale != 1.0:
            rows *= np.float32(self._bscale)
        if self._bzero != 0.0:
            rows += np.float32(self._bzero)
        if self._blank is not None:
            rows[raw == self._blank] = np.nan
        return rows

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@contextmanager
def open_image_rows(path: Path) -> Iterator[ImageRows]:
    """The file's science image (first 2-D image HDU, SCI first) as an ``ImageRows``."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hdul = fits.open(path, memmap=False, do_not_scale_image_data=True)
    rows: ImageRows | None = None
    try:
        index = _image_hdu_index(hdul)
        if index is None:
            raise FitsRejected(f"{path.name}: has no 2-D image HDU")
        rows = ImageRows(path, hdul, index)
        yield rows
    finally:
        if rows is not None:
            rows.close()
        hdul.close()


def _frame_facts(hdul: Any) -> dict[str, Any]:
    index = _image_hdu_index(hdul)
    headers = [hdul[0].header] if index is None else [hdul[index].header, hdul[0].header]
    meta: dict[str, Any] = {k: _header_fact(headers, kw) for k, kw in HEADER_FACTS.items()}
    meta["frame_type"] = meta["frame_type_keyword"] = None
    for kw in FRAME_TYPE_KEYWORDS:
        frame_type = _header_fact(headers, kw)
        if frame_type is not None:
            meta["frame_type"], meta["frame_type_keyword"] = frame_type, kw
            break
    meta["image_hdu"] = index
    image = None if index is None else hdul[index]
    meta["image_extname"] = None if image is None else (image.name or None)
    meta["shape"] = None if image is None else [int(n) for n in image.shape]
    meta["unit"] = _header_fact(headers, "BUNIT")
    meta["bitpix"] = None if image is None else int(image.header["BITPIX"])
    return meta


def read_header(path: Path) -> dict[str, Any]:
    """The frame facts ``ingest_fits`` records, read from the headers only (no checks)."""
    from astropy.io import fits

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path, memmap=True) as hdul:
            return _frame_facts(hdul)


# -- writing -----------------------------------------------------------------------------------
#: the text of a HISTORY card (80 characters less "HISTORY ")
HISTORY_WIDTH = 72
#: calibration roles and the keyword counting the frames of each in a combined image
CALIBRATION_KEYWORDS = {"bias": "NBIAS", "dark": "NDARK", "flat": "NFLAT"}


def fits_text(text: str) -> str:
    """Text as FITS headers and tables hold it (printable ASCII): anything else escaped as
    Python does (``café`` → ``caf\\xe9``)."""
    escaped = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else f"\\x{ord(c):02x}" for c in escaped)


def _history(header: Any, provenance: ProductProvenance) -> None:
    """HISTORY cards, one fact a card. Each input takes its own cards: ``input i/n <role>
    <name>``, ``input i/n from <what classified it>``, ``input i/n file_id=<id>``, then its
    checksum alone on a card (``sha256:<64 hex digits>``, 71 characters), whole, so that a
    search of the header for a hash finds it (a longer one — sha512 — cannot fit a card: it
    is whole in the PROVENANCE table)."""
    header.add_history(f"obsledger {provenance.algorithm} {provenance.algorithm_version}")
    if provenance.job_id:
        header.add_history(f"job {provenance.job_id}")
    if provenance.run_id:
        header.add_history(f"processing run {provenance.run_id}")
    for name, value in sorted(provenance.parameters.items()):
        header.add_history(f"parameter {name}={json.dumps(value)}")
    total = len(provenance.inputs)
    for n, i in enumerate(provenance.inputs, start=1):
        tag = f"input {n}/{total}"
        header.add_history(f"{tag} {i.role or 'input'} {fits_text(i.name)}")
        if i.classified_from:
            header.add_history(f"{tag} from {fits_text(i.classified_from)}"[:HISTORY_WIDTH])
        header.add_history(f"{tag} file_id={fits_text(i.file_id)}")
        if len(i.checksum) <= HISTORY_WIDTH:
            header.add_history(fits_text(i.checksum))
        else:
            header.add_history(f"{tag} {i.checksum.split(':')[0]}: see the PROVENANCE table")
    for dist, version in sorted(provenance.software.items()):
        header.add_history(f"software {dist} {version}")


def provenance_table(provenance: ProductProvenance) -> Any:
    """The inputs as a binary table HDU named PROVENANCE: one row an input, with its role,
    what classified it, name, file id and checksum (algorithm and hex value, whole)."""
    from astropy.io import fits
    from astropy.table import Table

    rows = [(n, i.role or "", fits_text(i.classified_from or ""), fits_text(i.name),
             fits_text(i.file_id), *(fits_text(i.checksum).split(":", 1)
                                     if ":" in i.checksum else ("", fits_text(i.checksum))))
            for n, i in enumerate(provenance.inputs, start=1)]
    table = Table(rows=rows or None, names=("INDEX", "ROLE", "CLASSIFIED_FROM", "NAME",
                                            "FILE_ID", "CHECKSUM_ALGORITHM", "CHECKSUM"),
                  dtype=(np.int32, str, str, str, str, str, str))
    hdu = fits.table_to_hdu(table)
    hdu.name = "PROVENANCE"
    return hdu


def write_combined_image(path: Path, image: NDArray[Any], *, provenance: ProductProvenance,
                         metrics: Mapping[str, float | int | str] | None = None,
                         unit: str | None = None) -> None:
    """The combined image as a float32 primary HDU, and the PROVENANCE table
    (``provenance_table``), each with DATASUM/CHECKSUM. HISTORY cards give the algorithm,
    parameters, every input with its role and checksum and the software versions; NCOMBINE
    (the science frames combined: inputs whose role is science — all inputs when none has a
    role), NBIAS, NDARK, NFLAT (the calibration frames of each kind), the algorithm keywords
    and the quality metrics are header keywords."""
    from astropy.io import fits

    hdu = fits.PrimaryHDU(np.asarray(image, dtype=np.float32))
    h = hdu.header
    roles = [i.role for i in provenance.inputs]
    science = roles.count("science") if any(roles) else len(roles)
    h["NCOMBINE"] = (science, "science frames combined")
    for role, keyword in CALIBRATION_KEYWORDS.items():
        h[keyword] = (roles.count(role), f"{role} frames in the master {role}")
    h["ALGNAME"] = (provenance.algorithm, "obsledger algorithm")
    h["ALGVERS"] = (provenance.algorithm_version, "algorithm version")
    if unit:
        h["BUNIT"] = unit
    if provenance.job_id:
        h["OBSLJOB"] = (provenance.job_id, "obsledger processing job")
    for key, value in (metrics or {}).items():
        card = ("Q" + key.upper().replace("_", ""))[:8]
        h[card] = (value, f"quality metric {key}")
    _history(h, provenance)
    fits.HDUList([hdu, provenance_table(provenance)]).writeto(path, overwrite=True,
                                                              checksum=True)


def write_source_catalog(path: Path, sources: Sequence[DetectedSource], *,
                         provenance: ProductProvenance) -> None:
    """The detected sources as an ECSV table (id, x, y 0-based pixels, flux, peak, npix) whose
    metadata carries the provenance."""
    from astropy.table import Table

    table = Table(rows=[(s.id, s.x, s.y, s.flux, s.peak, s.npix) for s in sources],
                  names=("id", "x", "y", "flux", "peak", "npix"),
                  dtype=(np.int64, np.float64, np.float64, np.float64, np.float64, np.int64))
    table["x"].description = "0-based pixel column of the flux-weighted centroid"
    table["y"].description = "0-based pixel row of the flux-weighted centroid"
    table["flux"].description = "background-subtracted sum over the grown footprint"
    table["peak"].description = "highest background-subtracted pixel"
    table["npix"].description = "pixels above the detection threshold"
    table.meta["provenance"] = provenance.to_json()
    table.write(path, format="ascii.ecsv", overwrite=True)
