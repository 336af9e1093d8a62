"""CCD reduction numerics: calibration, master frames, the chunked sigma-clipped combine,
background and noise, and source detection. Pure numpy / scipy.ndimage / astropy.stats; no I/O.

Frames are handed in as ``FrameRows``: anything with a ``shape`` that slices by rows
(``frame[r0:r1]`` gives an ndarray) — numpy arrays, ``np.memmap``, astropy ``hdu.section`` or
``infra.fits_products.open_image_rows``. The combine reads one band of rows of every frame at a
time, so its memory is bounded by the band, never by the whole stack.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

Image = NDArray[np.float32]

#: a band of all frames is kept near this size (bytes) when ``chunk_rows`` is not given
CHUNK_BYTES = 64 * 1024 * 1024
#: the clip works on slices of a band of about this size, bounding its temporaries
CLIP_BYTES = 16 * 1024 * 1024


class FrameRows(Protocol):
    """A 2-D frame that can be read a band of rows at a time."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice, /) -> Any: ...


class ReductionCancelled(Exception):
    """The reduction stopped because cancellation was requested (between steps or chunks)."""


@dataclass(frozen=True)
class CombineResult:
    """The combined image (float32, mean of the values surviving the clip)."""

    image: Image
    rejected_pixels: int  # frame values rejected by the clip, summed over the image
    nframes: int
    chunk_rows: int
    noise: NoiseModel | None = None  # the cosmic-ray guard's noise model (None: no guard)


@dataclass(frozen=True)
class BackgroundEstimate:
    background: float  # sigma-clipped median of the image
    noise: float  # robust standard deviation (MAD) of the sigma-clipped pixels
    mean: float  # sigma-clipped mean
    npix_used: int  # pixels surviving the clip


@dataclass(frozen=True)
class DetectedSource:
    id: int
    x: float  # 0-based pixel centroid, column
    y: float  # 0-based pixel centroid, row
    flux: float  # background-subtracted sum over the (grown) footprint
    peak: float  # highest background-subtracted pixel
    npix: int  # pixels above the detection threshold


def _check_cancel(cancelled: Callable[[], bool] | None) -> None:
    if cancelled is not None and cancelled():
        raise ReductionCancelled("reduction cancelled")


def frame_shape(frame: FrameRows) -> tuple[int, int]:
    shape = tuple(int(n) for n in frame.shape)
    if len(shape) != 2:
        raise ValueError(f"a frame must be a 2-D image, this one has shape {shape}")
    return shape[0], shape[1]


def default_chunk_rows(nframes: int, ncols: int, budget: int = CHUNK_BYTES) -> int:
    """Rows per band so that one band of every frame (float32) fits in ``budget`` bytes."""
    return max(1, budget // max(1, nframes * ncols * 4))


# -- calibration -------------------------------------------------------------------------------
def calibrate_frame(frame: NDArray[Any], bias: NDArray[Any] | None = None,
                    dark: NDArray[Any] | None = None, flat: NDArray[Any] | None = None,
                    exptime: float | None = None, dark_exptime: float | None = None) -> Image:
    """``(frame - bias - dark * exptime/dark_exptime) / flat`` in float32.

    The dark is scaled by ``exptime / dark_exptime`` when both are known, else used as is. Flat
    pixels that are not positive and finite leave the pixel uncorrected (divided by 1)."""
    out = np.array(frame, dtype=np.float32, copy=True)
    if bias is not None:
        out -= np.asarray(bias, dtype=np.float32)
    if dark is not None:
        scale = 1.0
        if exptime is not None and dark_exptime:
            scale = float(exptime) / float(dark_exptime)
        out -= np.float32(scale) * np.asarray(dark, dtype=np.float32)
    if flat is not None:
        f = np.asarray(flat, dtype=np.float32)
        good = np.isfinite(f) & (f > 0)
        out /= np.where(good, f, np.float32(1.0))
    return out


class CalibratedFrame:
    """A frame calibrated band by band as it is read: a ``FrameRows`` itself.

    ``scale`` multiplies the calibrated rows (flats are normalised to their median this way)."""

    def __init__(self, raw: FrameRows, *, bias: NDArray[Any] | None = None,
                 dark: NDArray[Any] | None = None, flat: NDArray[Any] | None = None,
                 exptime: float | None = None, dark_exptime: float | None = None,
                 scale: float = 1.0) -> None:
        self.raw = raw
        self.bias, self.dark, self.flat = bias, dark, flat
        self.exptime, self.dark_exptime = exptime, dark_exptime
        self.scale = scale
        self.shape = frame_shape(raw)

    def __getitem__(self, key: slice, /) -> Image:
        rows = calibrate_frame(
            np.asarray(self.raw[key]),
            None if self.bias is None else self.bias[key],
            None if self.dark is None else self.dark[key],
            None if self.flat is None else self.flat[key],
            self.exptime, self.dark_exptime)
        if self.scale != 1.0:
            rows *= np.float32(self.scale)
        return rows


def master_bias(frames: Sequence[FrameRows], *, sigma: float = 3.0, maxiters: int = 5,
                chunk_rows: int | None = None,
                cancelled: Callable[[], bool] | None = None) -> Image:
    """The sigma-clipped mean of the bias frames."""
    return combine_frames(frames, sigma=sigma, maxiters=maxiters, chunk_rows=chunk_rows,
                          cancelled=cancelled).image


def master_dark(frames: Sequence[FrameRows], *, bias: NDArray[Any] | None = None,
                exptimes: Sequence[float | None] | None = None, sigma: float = 3.0,
                maxiters: int = 5, chunk_rows: int | None = None,
                cancelled: Callable[[], bool] | None = None) -> Image:
    """The bias-subtracted, sigma-clipped mean of the dark frames.

    With every exposure time known (``exptimes``) the master is a rate (counts per second:
    calibrate with ``dark_exptime=1``); otherwise it is in counts of the darks' exposure."""
    times = [float(t) for t in exptimes if t] if exptimes is not None else []
    rate = len(times) == len(frames)
    calibrated = [CalibratedFrame(f, bias=bias, scale=1.0 / times[i] if rate else 1.0)
                  for i, f in enumerate(frames)]
    return combine_frames(calibrated, sigma=sigma, maxiters=maxiters, chunk_rows=chunk_rows,
                          cancelled=cancelled).image


def master_flat(frames: Sequence[FrameRows], *, bias: NDArray[Any] | None = None,
                dark: NDArray[Any] | None = None,
                exptimes: Sequence[float | None] | None = None,
                dark_exptime: float | None = None, sigma: float = 3.0, maxiters: int = 5,
                chunk_rows: int | None = None,
                cancelled: Callable[[], bool] | None = None) -> Image:
    """Bias/dark-subtracted flats, each scaled to median 1, sigma-clip combined and normalised
    to median 1. Each flat is read once (one frame at a time) for its median."""
    scaled: list[FrameRows] = []
    for i, f in enumerate(frames):
        exptime = exptimes[i] if exptimes is not None else None
        cal = CalibratedFrame(f, bias=bias, dark=dark, exptime=exptime,
                              dark_exptime=dark_exptime)
        level = float(np.nanmedian(cal[0:cal.shape[0]]))
        if not np.isfinite(level) or level <= 0:
            raise ValueError(f"flat frame {i} has no positive signal (median {level:g})")
        scaled.append(CalibratedFrame(f, bias=bias, dark=dark, exptime=exptime,
                                      dark_exptime=dark_exptime, scale=1.0 / level))
        _check_cancel(cancelled)
    combined = combine_frames(scaled, sigma=sigma, maxiters=maxiters, chunk_rows=chunk_rows,
                              cancelled=cancelled).image
    norm = float(np.nanmedian(combined))
    return (combined / np.float32(norm)).astype(np.float32)


# -- the noise model of a stack ----------------------------------------------------------------
#: the standard deviation of a normal distribution per unit of median absolute deviation
MAD_TO_STD = 1.482602218505602
#: the cosmic-ray guard's bound, in standard deviations (at least ``sigma``)
GUARD_SIGMA = 5.0
#: the noise model reads this many bands of rows spread over the frames ...
NOISE_BANDS = 16
#: ... of about this many bytes in all (float32, every frame)
NOISE_BYTES = 16 * 1024 * 1024
#: fewest frame differences a noise model is made from (else the combine has no guard)
NOISE_MIN_SAMPLES = 200
#: fewest frame differences in a level bin of the noise model
NOISE_MIN_BIN = 100
#: a bin's differences are sigma-clipped at this bound before their standard deviation
NOISE_CLIP_SIGMA = 5.0
#: neighbouring level bins closer than this many of their sigmas are one bin
NOISE_MERGE_SIGMA = 5.0
#: the level bins' edges, as quantiles of the pixels' median levels: fine at the top, where
#: the few bright pixels (stars) are
NOISE_QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999,
                   0.9995, 0.9998, 0.9999, 1.0)


@dataclass(frozen=True)
class NoiseModel:
    """The noise of one frame's pixel as a function of its level (the pixel's median over the
    frames), measured on the stack itself: ``sigma`` at each of ``levels`` (increasing), taken
    between them by linear interpolation and held flat beyond the ends.

    ``sigmas`` never decrease with the level (a running maximum): CCD noise grows with the
    signal (read noise, then photon noise), and a bin that seems quieter than a fainter one
    (saturated pixels) must not lower the guard of the pixels above it."""

    levels: tuple[float, ...]
    sigmas: tuple[float, ...]
    samples: int  # frame differences measured

    def sigma(self, level: NDArray[Any]) -> NDArray[np.float32]:
        return np.interp(level, self.levels, self.sigmas).astype(np.float32)


def _sample_bands(nrows: int, ncols: int, nframes: int) -> list[tuple[int, int]]:
    """Row bands ``(r0, r1)`` the noise model reads: all rows when they fit in
    ``NOISE_BYTES``, else ``NOISE_BANDS`` bands spread evenly over the frames."""
    rows = max(1, NOISE_BYTES // max(1, ncols * nframes * 4))
    if rows >= nrows:
        return [(0, nrows)]
    per_band = max(1, rows // NOISE_BANDS)
    starts = np.unique(np.linspace(0, nrows - per_band, min(NOISE_BANDS, nrows)).astype(int))
    return [(int(r0), int(r0) + per_band) for r0 in starts]


def estimate_noise(frames: Sequence[FrameRows]) -> NoiseModel | None:
    """The noise model of equally shaped frames (None: fewer than three frames, or fewer than
    ``NOISE_MIN_SAMPLES`` finite pixels to measure it on).

    Rows spread over the frames (``_sample_bands``) are read; a pixel's level is its median
    over the frames (one cosmic ray does not move it); the frames are paired (0-1, 2-3, ...)
    and each pair's difference, less its median over the sampled pixels (a change of sky
    level between the exposures), has twice a frame's variance. The differences are binned
    by level (``NOISE_QUANTILES``, at least ``NOISE_MIN_BIN`` a bin); neighbouring bins whose
    levels lie within ``NOISE_MERGE_SIGMA`` of their noise are one bin (their levels differ by
    noise, not by signal, and a level picked by noise would bias the differences' spread). A
    bin's sigma is the standard deviation of its differences sigma-clipped at
    ``NOISE_CLIP_SIGMA`` (astropy's ``sigma_clipped_stats``: cosmic rays, a small minority of
    any bin, are clipped; integer data do not collapse it to 0 as a MAD would) over sqrt(2)."""
    from astropy.stats import sigma_clipped_stats

    n = len(frames)
    if n < 3:
        return None
    nrows, ncols = frame_shape(frames[0])
    pairs = n // 2
    levels: list[NDArray[np.float32]] = []
    diffs: list[list[NDArray[np.float32]]] = [[] for _ in range(pairs)]
    for r0, r1 in _sample_bands(nrows, ncols, n):
        block = np.empty((n, (r1 - r0) * ncols), dtype=np.float32)
        for i, f in enumerate(frames):
            block[i] = np.asarray(f[r0:r1], dtype=np.float32).reshape(-1)
        with warnings.catch_warnings():  # a pixel NaN in every frame
            warnings.simplefilter("ignore", RuntimeWarning)
            level = np.nanmedian(block, axis=0)
        for j in range(pairs):
            d = block[2 * j] - block[2 * j + 1]
            ok = np.isfinite(d) & np.isfinite(level)
            levels.append(level[ok])
            diffs[j].append(d[ok])
    offsets = []  # each pair's, over all sampled pixels
    for parts in diffs:
        joined = np.concatenate(parts)
        offsets.append(np.float32(np.median(joined)) if joined.size else np.float32(0.0))
    level_all = np.concatenate(levels)
    diff_all = np.concatenate([d - offsets[j] for parts in zip(*diffs, strict=True)
                               for j, d in enumerate(parts)])
    if diff_all.size < NOISE_MIN_SAMPLES:
        return None
    order = np.argsort(level_all, kind="stable")
    level_all, diff_all = level_all[order], diff_all[order]

    def sigma_of(a: int, b: int) -> float:
        _, _, std = sigma_clipped_stats(diff_all[a:b], sigma=NOISE_CLIP_SIGMA, maxiters=10,
                                        cenfunc="median", stdfunc="std")
        return float(std) / float(np.sqrt(2.0))

    edges = np.unique((np.asarray(NOISE_QUANTILES) * diff_all.size).astype(np.int64))
    bins: list[tuple[int, int]] = []
    for a, b in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        if bins and bins[-1][1] - bins[-1][0] < NOISE_MIN_BIN:
            bins[-1] = (bins[-1][0], b)  # too few: joined with the next
        else:
            bins.append((a, b))
    if len(bins) > 1 and bins[-1][1] - bins[-1][0] < NOISE_MIN_BIN:
        last = bins.pop()
        bins[-1] = (bins[-1][0], last[1])
    # bins whose levels differ by less than a few sigma are one bin
    merged: list[tuple[int, int]] = []
    base_level = base_sigma = 0.0
    for a, b in bins:
        bin_level = float(np.median(level_all[a:b]))
        if merged and bin_level - base_level <= NOISE_MERGE_SIGMA * base_sigma:
            merged[-1] = (merged[-1][0], b)
            continue
        merged.append((a, b))
        base_level, base_sigma = bin_level, sigma_of(a, b)
    bin_levels: list[float] = []
    bin_sigmas: list[float] = []
    for a, b in merged:
        bin_level, bin_sigma = float(np.median(level_all[a:b])), sigma_of(a, b)
        if bin_levels and bin_level <= bin_levels[-1]:  # tied levels (integer data)
            bin_sigmas[-1] = max(bin_sigmas[-1], bin_sigma)
            continue
        bin_levels.append(bin_level)
        bin_sigmas.append(bin_sigma)
    sigmas = np.maximum.accumulate(np.asarray(bin_sigmas))
    return NoiseModel(levels=tuple(bin_levels), sigmas=tuple(float(x) for x in sigmas),
                      samples=int(diff_all.size))


# -- the sigma-clipped combine -----------------------------------------------------------------


def _run_median(sa: NDArray[np.float32], la: NDArray[np.intp], ha: NDArray[np.intp]
                ) -> NDArray[np.float32]:
    """Median of each row's sorted run ``sa[i, la[i]:ha[i]]`` (the middle value, or the mean
    of the middle two)."""
    n = sa.shape[1]
    cnt = np.maximum(ha - la, 1)
    r = np.arange(sa.shape[0])
    i1 = np.minimum(la + (cnt - 1) // 2, n - 1)
    i2 = np.minimum(la + cnt // 2, n - 1)
    return ((sa[r, i1].astype(np.float64) + sa[r, i2]) * 0.5).astype(np.float32)


def _median_and_mad_std(sa: NDArray[np.float32], la: NDArray[np.intp],
                        ha: NDArray[np.intp], full: bool
                        ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Median and MAD-based standard deviation of each row's sorted run ``sa[i, la[i]:ha[i]]``
    (``full``: every run is the whole row)."""
    m, n = sa.shape
    cnt = np.maximum(ha - la, 1)
    r = np.arange(m)
    med = _run_median(sa, la, ha)
    dev = np.abs(sa - med[:, None])
    if not full:  # values outside the run sort last
        cols = np.arange(n, dtype=np.intp)
        dev[(cols < la[:, None]) | (cols >= ha[:, None])] = np.inf
    dev.sort(axis=1)
    mad = (dev[r, (cnt - 1) // 2] + dev[r, cnt // 2]) * np.float32(0.5)
    return med, mad * np.float32(MAD_TO_STD)


def _median_and_std(sa: NDArray[np.float32], la: NDArray[np.intp], ha: NDArray[np.intp]
                    ) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Median and standard deviation (about the mean, ddof 0) of each row's sorted run."""
    n = sa.shape[1]
    cnt = np.maximum(ha - la, 1)
    med = _run_median(sa, la, ha)
    # every row as if its run were the whole row, then the rows with a shorter run
    mean = sa.mean(axis=1, dtype=np.float32)
    dev = sa - mean[:, None]
    std = np.sqrt(np.einsum("ij,ij->i", dev, dev) / np.float32(n))
    del dev
    partial = np.flatnonzero((la > 0) | (ha < n))
    if partial.size:
        sp, lp, hp, cp = sa[partial], la[partial], ha[partial], cnt[partial]
        cols = np.arange(n, dtype=np.intp)
        keep = (cols >= lp[:, None]) & (cols < hp[:, None])
        pmean = np.where(keep, sp, np.float32(0.0)).sum(axis=1, dtype=np.float64) / cp
        pdev = np.where(keep, sp - pmean[:, None].astype(np.float32), np.float32(0.0))
        std[partial] = np.sqrt(np.einsum("ij,ij->i", pdev, pdev, dtype=np.float64) / cp)
    return med, std.astype(np.float32, copy=False)


def _run_means(s: NDArray[np.float32], lo: NDArray[np.intp], hi: NDArray[np.intp]
               ) -> NDArray[np.float32]:
    """Mean of each row's run ``s[i, lo[i]:hi[i]]`` (NaN for an empty run)."""
    n = s.shape[1]
    means = s.mean(axis=1, dtype=np.float32)  # right for the untouched rows
    partial = np.flatnonzero((lo > 0) | (hi < n))
    if partial.size:
        sp, lp, hp = s[partial], lo[partial], hi[partial]
        cols = np.arange(n, dtype=np.intp)
        keep = (cols >= lp[:, None]) & (cols < hp[:, None])
        cnt = hp - lp
        total = np.where(keep, sp, np.float32(0.0)).sum(axis=1, dtype=np.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            means[partial] = np.where(cnt > 0, total / np.maximum(cnt, 1), np.float32(np.nan))
    return means


def _clip_sorted(s: NDArray[np.float32], sigma: float, maxiters: int,
                 noise: NoiseModel | None = None) -> tuple[NDArray[np.float32], int]:
    """Sigma-clipped mean along axis 1 of ``s`` (pixels x frames), sorted along axis 1 with
    NaNs last. Per pixel:

    1. the cosmic-ray guard (with a ``noise`` model; for a pixel with 3 values or more):
       reject values outside ``median ± max(sigma, 5)·max(MAD-std, noise.sigma(median))``.
       The noise model, measured over the whole stack, is what makes this work with few
       frames: one cosmic ray inflates a pixel's standard deviation enough to hide itself
       (with fewer than 8 frames a lone outlier never lies 3 standard deviations out), and
       the MAD of 3 or 5 values is often far below the noise (a bound on it alone rejected
       2.8 % of Gaussian values at 5 frames). With the noise known, 5 sigma leaves Gaussian
       tails alone; the pixel's own MAD-std keeps the bound wide where the frames differ
       by more than the noise (a star's core under changing seeing);
    2. astropy's ``sigma_clip`` (median centre, standard deviation, ``sigma``, ``maxiters``),
       on the values the guard kept: up to ``maxiters`` times, bounds ``median ± sigma·std``
       of the surviving values, reject the values outside; stop when nothing more is rejected
       (or nothing is left);
    3. as in astropy's ``sigma_clip`` (its C path, used with an ``axis``), the last bounds
       decide over all values; the result is the mean of the values inside them.

    Without the guard this is ``sigma_clip(s, sigma, maxiters, axis=1)`` followed by the mean.
    Since the data are sorted, the survivors of each pixel are the contiguous run ``[lo, hi)``,
    and later iterations only revisit the pixels whose run still changes."""
    npix, n = s.shape
    lo = np.zeros(npix, dtype=np.intp)
    hi = np.full(npix, n, dtype=np.intp)
    if np.isnan(s[:, -1]).any():  # NaN (missing) values sort last
        hi -= np.count_nonzero(np.isnan(s), axis=1)
    end = hi.copy()  # end of each pixel's finite values
    n_missing = int((n - hi).sum())
    lower_final = np.full(npix, -np.inf, dtype=np.float32)
    upper_final = np.full(npix, np.inf, dtype=np.float32)
    active = np.flatnonzero(hi > lo)
    guard = noise is not None and n >= 3
    for iteration in range(maxiters + 1 if guard else maxiters):
        if active.size == 0:
            break
        sa = s if active.size == npix else s[active]
        la, ha = lo[active], hi[active]
        if guard and iteration == 0:
            assert noise is not None
            med, std = _median_and_mad_std(sa, la, ha, full=n_missing == 0)
            std = np.maximum(std, noise.sigma(med))
            std[ha - la < 3] = np.inf  # two values: either may be the odd one
            k = np.float32(max(sigma, GUARD_SIGMA))
        else:
            med, std = _median_and_std(sa, la, ha)
            k = np.float32(sigma)
        lower = med - k * std
        upper = med + k * std
        lower_final[active], upper_final[active] = lower, upper
        new_lo = np.maximum(la, np.count_nonzero(sa < lower[:, None], axis=1))
        # NaN > upper is False: the count is of finite values, which end at ``end``
        new_hi = np.minimum(ha, end[active] - np.count_nonzero(sa > upper[:, None], axis=1))
        new_hi = np.maximum(new_hi, new_lo)
        changed = (new_lo != la) | (new_hi != ha)
        lo[active], hi[active] = new_lo, new_hi
        if iteration > 0 or not guard:  # after the guard every pixel gets a sigma iteration
            active = active[changed & (new_hi > new_lo)]
    # the last bounds over all values (a value clipped early may be back inside them)
    touched = np.flatnonzero((lo > 0) | (hi < end))
    if touched.size:
        st = s[touched]
        lo[touched] = np.count_nonzero(st < lower_final[touched, None], axis=1)
        hi[touched] = np.maximum(lo[touched], end[touched] - np.count_nonzero(
            st > upper_final[touched, None], axis=1))
    rejected = int((n - (hi - lo)).sum()) - n_missing
    return _run_means(s, lo, hi), rejected


def combine_frames(frames: Sequence[FrameRows], *, sigma: float = 3.0, maxiters: int = 5,
                   chunk_rows: int | None = None,
                   progress: Callable[[float], None] | None = None,
                   cancelled: Callable[[], bool] | None = None, guard: bool = True,
                   noise: NoiseModel | None = None) -> CombineResult:
    """Sigma-clipped mean of equally shaped frames, a band of rows at a time.

    With ``guard`` (and 3 frames or more) a cosmic-ray guard comes first, on ``noise`` (by
    default ``estimate_noise`` of the frames: one pass over bands of rows spread over them);
    without it the combine is astropy's ``sigma_clip`` and a mean (see ``_clip_sorted``).
    Each band of all frames is read into one float32 block (pixels x frames), sorted along
    the frames, and clipped (``_clip_sorted``) in slices of ``CLIP_BYTES``. Memory: one band,
    ``chunk_rows x ncols x nframes x 4`` bytes (default: ``CHUNK_BYTES``, 64 MB), a few
    clip temporaries of ``CLIP_BYTES`` (16 MB), the noise model's sample (``NOISE_BYTES``,
    16 MB, freed before the first band) and the output image.
    ``cancelled()`` is polled before every band; ``progress(fraction)`` after each."""
    if not frames:
        raise ValueError("no frames to combine")
    if sigma <= 0 or maxiters < 1:
        raise ValueError("sigma must be positive and maxiters at least 1")
    shape = frame_shape(frames[0])
    for i, f in enumerate(frames[1:], start=1):
        if frame_shape(f) != shape:
            raise ValueError(f"frame {i} has shape {frame_shape(f)}, frame 0 has {shape}")
    nrows, ncols = shape
    n = len(frames)
    rows = chunk_rows if chunk_rows is not None else default_chunk_rows(n, ncols)
    if rows < 1:
        raise ValueError("chunk_rows must be at least 1")
    model = None
    if guard and n >= 3:
        model = noise if noise is not None else estimate_noise(frames)
    image = np.empty(shape, dtype=np.float32)
    rejected = 0
    block: NDArray[np.float32] | None = None
    for r0 in range(0, nrows, rows):
        _check_cancel(cancelled)
        r1 = min(nrows, r0 + rows)
        npix = (r1 - r0) * ncols
        if block is None or block.shape[0] != npix:
            block = np.empty((npix, n), dtype=np.float32)
        for i, f in enumerate(frames):
            block[:, i] = np.asarray(f[r0:r1], dtype=np.float32).reshape(-1)
        block.sort(axis=1)
        out = image[r0:r1].reshape(-1)
        step = max(1, CLIP_BYTES // (4 * n))
        for p0 in range(0, npix, step):  # pixels are independent: clip slice by slice
            out[p0:p0 + step], rej = _clip_sorted(block[p0:p0 + step], sigma, maxiters, model)
            rejected += rej
        if progress is not None:
            progress(r1 / nrows)
    return CombineResult(image=image, rejected_pixels=rejected, nframes=n, chunk_rows=rows,
                         noise=model)


# -- background, noise, sources ----------------------------------------------------------------
def background_and_noise(image: NDArray[Any], sigma: float = 3.0,
                         maxiters: int = 5) -> BackgroundEstimate:
    """Sigma-clipped statistics of the image: the background is the clipped median, the noise
    the MAD-based standard deviation of the clipped pixels (unbiased for Gaussian noise)."""
    from astropy.stats import mad_std, sigma_clip

    data = np.asarray(image, dtype=np.float32)
    clipped = sigma_clip(data, sigma=sigma, maxiters=maxiters, cenfunc="median",
                         stdfunc="mad_std", masked=False, axis=None)
    values = clipped[np.isfinite(clipped)]
    if values.size == 0:
        raise ValueError("the image has no finite pixels")
    return BackgroundEstimate(background=float(np.median(values)),
                              noise=float(mad_std(values)),
                              mean=float(np.mean(values, dtype=np.float64)),
                              npix_used=int(values.size))


def detect_sources(image: NDArray[Any], background: float, noise: float,
                   threshold_sigma: float = 5.0, min_pixels: int = 5,
                   grow_pixels: float = 3.0) -> list[DetectedSource]:
    """Sources as connected groups (8-connected) of at least ``min_pixels`` pixels above
    ``background + threshold_sigma x noise``. Centroid: flux-weighted mean position over the
    group; flux: background-subtracted sum over the group grown by ``grow_pixels`` (each pixel
    goes to its nearest group, so neighbours do not share flux) to take in the wings."""
    data = np.asarray(image, dtype=np.float32) - np.float32(background)
    finite = np.isfinite(data)
    data = np.where(finite, data, np.float32(0.0))
    above = finite & (data > threshold_sigma * noise)
    labels, count = ndimage.label(above, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index)
    keep = index[sizes >= min_pixels]
    if keep.size == 0:
        return []
    # relabel the kept groups 1..k
    relabel = np.zeros(count + 1, dtype=np.int32)
    relabel[keep] = np.arange(1, keep.size + 1, dtype=np.int32)
    labels = relabel[labels]
    k = np.arange(1, keep.size + 1)
    if grow_pixels > 0:
        dist, nearest = ndimage.distance_transform_edt(labels == 0, return_indices=True)
        grown = labels[nearest[0], nearest[1]]
        grown[dist > grow_pixels] = 0
        del dist, nearest
    else:
        grown = labels
    centroids = ndimage.center_of_mass(data, labels, k)
    fluxes = ndimage.sum_labels(data, grown, k)
    peaks = ndimage.maximum(data, labels, k)
    npix = ndimage.sum_labels(np.ones_like(labels), labels, k)
    return [DetectedSource(id=int(i), x=float(c[1]), y=float(c[0]), flux=float(f),
                           peak=float(p), npix=int(m))
            for i, c, f, p, m in zip(k, centroids, fluxes, peaks, npix, strict=True)]
