"""The ccd_stack combine from disk, band by band, against a plain in-memory median.

1. ``--frames`` (50) frames of ``--size`` x ``--size`` (2048) float32 pixels — a star field on
   a flat background with Gaussian noise and cosmic rays — are written as FITS files into a
   temporary directory, one frame at a time.
2. ``combine``: in a child process, ``domain.reduction.combine_frames`` over
   ``infra.fits_products.open_image_rows`` of every file (band reads, default band: 64 MB of
   all frames), the clipped mean of ccd_stack.
3. ``median``: in another child process, the same files read into one ``(frames, size,
   size)`` float32 array, then ``numpy.median(stack, axis=0)``. ``median_s`` times the median
   only (the stack is already in memory); the time to read the stack is a ``#`` note.
4. Peak memory of each child: ``ru_maxrss`` of the child process (resident set high-water
   mark, includes the interpreter and imports — the baseline of each is a ``#`` note).

Each measurement runs ``--rounds`` times (alternating); the best time and the highest peak are
reported. Usage: ``python -m bench.processing [--frames 50] [--size 2048] [--rounds 1]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import bench, note, temp_dir

MB = 1024 * 1024


def rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def generate(directory: Path, frames: int, size: int, seed: int = 1) -> list[Path]:
    """One frame in memory at a time: stars + background + noise, then cosmic rays."""
    import numpy as np
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    sky = np.full((size, size), 1000.0, dtype=np.float32)
    for _ in range(200):  # stars, small stamps
        x, y = rng.uniform(10, size - 10, 2)
        x0, y0 = int(x) - 8, int(y) - 8
        stamp = (slice(y0, y0 + 17), slice(x0, x0 + 17))
        sky[stamp] += (rng.uniform(200, 5000) * np.exp(
            -((xx[stamp] - x) ** 2 + (yy[stamp] - y) ** 2) / (2 * 2.0**2))).astype(np.float32)
    del yy, xx
    paths = []
    for i in range(frames):
        frame = sky + rng.normal(0, 10, (size, size)).astype(np.float32)
        hits = rng.integers(0, size, (2, size))  # ~size cosmic-ray pixels a frame
        frame[hits[0], hits[1]] += rng.uniform(500, 30000, size).astype(np.float32)
        path = directory / f"frame_{i:03d}.fits"
        fits.PrimaryHDU(frame, header=fits.Header({"IMAGETYP": "LIGHT", "EXPTIME": 60.0})
                        ).writeto(path)
        paths.append(path)
    return paths


def child_combine(directory: Path, out: Path) -> dict[str, Any]:
    import numpy as np

    from domain.reduction import combine_frames
    from infra.fits_products import open_image_rows

    baseline = rss_now_mb()
    paths = sorted(directory.glob("frame_*.fits"))
    t0 = time.perf_counter()
    with ExitStack() as files:
        rows = [files.enter_context(open_image_rows(p)) for p in paths]
        result = combine_frames(rows)
    seconds = time.perf_counter() - t0
    peak = peak_rss_mb()
    np.save(out, result.image)
    return {"seconds": seconds, "peak_mb": peak, "baseline_mb": baseline,
            "chunk_rows": result.chunk_rows, "rejected_pixels": result.rejected_pixels}


def child_median(directory: Path, out: Path) -> dict[str, Any]:
    import numpy as np

    from infra.fits_products import open_image_rows

    baseline = rss_now_mb()
    paths = sorted(directory.glob("frame_*.fits"))
    t0 = time.perf_counter()
    stack: Any = None
    for i, p in enumerate(paths):
        with open_image_rows(p) as rows:
            if stack is None:
                stack = np.empty((len(paths), *rows.shape), dtype=np.float32)
            stack[i] = rows[0:rows.shape[0]]
    load = time.perf_counter() - t0
    t1 = time.perf_counter()
    median = np.median(stack, axis=0)
    seconds = time.perf_counter() - t1
    peak = peak_rss_mb()
    np.save(out, median)
    return {"seconds": seconds, "load_s": load, "peak_mb": peak, "baseline_mb": baseline}


def run_child(kind: str, directory: Path) -> dict[str, Any]:
    out = directory / f"{kind}.npy"
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(directory), str(out)],
                          check=True, capture_output=True, text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        kind, directory, out = argv[1], Path(argv[2]), Path(argv[3])
        result = (child_combine if kind == "combine" else child_median)(directory, out)
        print(json.dumps(result), flush=True)
        return 0
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--keep-dir", action="store_true")
    args = p.parse_args(argv)
    import numpy as np

    with temp_dir(args.keep_dir) as tmp:
        t0 = time.perf_counter()
        generate(tmp, args.frames, args.size)
        note(f"{args.frames} frames of {args.size}x{args.size} float32 written in "
             f"{time.perf_counter() - t0:.1f} s to {tmp}")
        combines, medians = [], []
        for _ in range(args.rounds):
            combines.append(run_child("combine", tmp))
            medians.append(run_child("median", tmp))
        combine = min(combines, key=lambda r: r["seconds"])
        median = min(medians, key=lambda r: r["seconds"])
        combine_peak = max(r["peak_mb"] for r in combines)
        median_peak = max(r["peak_mb"] for r in medians)
        note(f"combine: band of {combine['chunk_rows']} rows, {combine['rejected_pixels']} "
             f"values rejected; process baseline {combine['baseline_mb']:.0f} MB after imports")
        note(f"median: reading the stack took {median['load_s']:.2f} s (not in median_s); "
             f"process baseline {median['baseline_mb']:.0f} MB after imports")
        a, b = np.load(tmp / "combine.npy"), np.load(tmp / "median.npy")
        note(f"clipped mean - median: rms {float(np.sqrt(np.mean((a - b) ** 2))):.3f} "
             f"(noise per frame 10, {args.frames} frames)")
    bench("combine_s", combine["seconds"])
    bench("median_s", median["seconds"])
    bench("time_ratio", combine["seconds"] / median["seconds"])
    bench("combine_peak_mb", combine_peak)
    bench("median_peak_mb", median_peak)
    bench("memory_ratio", combine_peak / median_peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
