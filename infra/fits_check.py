"""Checks of downloaded files: sha256, and FITS structure and checksums with astropy."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fits.fz")


#: digests a recorded checksum may use (``(algorithm, hex value)``)
DIGESTS = ("sha256", "md5", "sha1", "sha512")


def file_digest(path: Path, algorithm: str = "sha256", block: int = 4 * 1024 * 1024) -> str:
    """Hex digest of a file, read in blocks; ``algorithm`` is one of ``DIGESTS``."""
    name = algorithm.lower().replace("-", "")
    if name not in DIGESTS:
        raise ValueError(f"unsupported checksum algorithm {algorithm!r} "
                         f"(supported: {', '.join(DIGESTS)})")
    h = hashlib.new(name)
    with open(path, "rb") as f:
        while data := f.read(block):
            h.update(data)
    return h.hexdigest()


def sha256_of(path: Path, block: int = 4 * 1024 * 1024) -> str:
    return file_digest(path, "sha256", block)


def is_fits_name(name: str) -> bool:
    return name.lower().endswith(FITS_SUFFIXES)


class FitsInvalid(Exception):
    """The file is not a readable FITS file, or a CHECKSUM/DATASUM does not match."""


def verify_fits(path: Path) -> dict[str, Any]:
    """Open every HDU with astropy (headers and data read), check that the file holds every
    HDU's data (astropy only warns about a short file) and verify CHECKSUM/DATASUM where the
    header has them. Returns a summary; raises ``FitsInvalid``."""
    from astropy.io import fits

    hdus: list[dict[str, Any]] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # memory-mapped and unscaled: a large file is checked without loading it whole
            with fits.open(path, memmap=True, do_not_scale_image_data=True,
                           checksum=False) as hdul:
                hdul.verify("exception")
                size = path.stat().st_size
                for i in range(len(hdul)):
                    info = hdul.fileinfo(i) or {}
                    needed = int(info.get("datLoc", 0)) + int(info.get("datSpan", 0))
                    if needed > size:  # astropy only warns, and pads the data
                        raise FitsInvalid(f"not a readable FITS file: truncated, HDU {i} "
                                          f"ends at byte {needed}, "
                                          f"the file has {size} bytes")
                for i, hdu in enumerate(hdul):
                    _ = hdu.data  # reads the data: a truncated file fails here
                    entry: dict[str, Any] = {"index": i, "name": hdu.name,
                                             "type": type(hdu).__name__}
                    for card, check in (("DATASUM", hdu.verify_datasum),
                                        ("CHECKSUM", hdu.verify_checksum)):
                        if card in hdu.header:
                            ok = check() == 1
                            entry[card.lower()] = "ok" if ok else "mismatch"
                            if not ok:
                                raise FitsInvalid(f"HDU {i} ({hdu.name}): {card} does not match")
                    hdus.append(entry)
    except FitsInvalid:
        raise
    except Exception as e:  # astropy raises many kinds for a damaged file
        raise FitsInvalid(f"not a readable FITS file: {type(e).__name__}: {e}") from e
    checked = sum(1 for h in hdus if "datasum" in h or "checksum" in h)
    return {"hdus": len(hdus), "checksums_verified": checked,
            "extensions": [h["name"] for h in hdus]}
