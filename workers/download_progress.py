"""The downloader's live figures of the jobs it runs (bytes, speed, ETA), read by the API."""

from __future__ import annotations

import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

from domain.downloads import DownloadJob, FileStatus


class LiveProgress:
    """The downloader's in-memory progress of the jobs it runs: bytes received (ahead of the
    checkpoints, which stay the durable record), speed over the last seconds, ETA. Written
    by the downloader's loop, read by the API (``GET /mast/download/progress/{id}``, the live
    stream) from other threads: each figure is replaced whole, never changed in place."""

    WINDOW_S = 3.0

    def __init__(self) -> None:
        self.sizes: dict[str, list[int | None]] = {}
        self.done: dict[str, list[int]] = {}  # job → bytes per file
        self.samples: dict[tuple[str, int], deque[tuple[float, int]]] = {}

    def begin(self, job: DownloadJob) -> None:
        job_id = str(job.id)
        self.sizes[job_id] = [None if f.get("size") is None else int(f["size"])
                              for f in job.files]
        self.done[job_id] = [int(f["size"]) if f["status"] == FileStatus.COMPLETE
                             and f.get("size") is not None else int(f["bytes_done"] or 0)
                             for f in job.files]

    def moved(self, job_id: str, index: int, position: int, size: int | None = None) -> None:
        done = self.done.get(job_id)
        if done is None:
            return
        done[index] = position
        if size is not None:
            self.sizes[job_id][index] = size
        now = time.monotonic()
        window = self.samples.setdefault((job_id, index), deque())
        window.append((now, position))
        while len(window) > 2 and window[0][0] < now - self.WINDOW_S:
            window.popleft()

    def stalled(self, job_id: str, index: int) -> None:
        """The file is not being fetched now (completed, failed, stopped)."""
        self.samples.pop((job_id, index), None)

    def end(self, job_id: str) -> None:
        self.sizes.pop(job_id, None)
        self.done.pop(job_id, None)
        for key in [k for k in self.samples if k[0] == job_id]:
            self.samples.pop(key, None)

    def speed(self, job_id: str, index: int, now: float) -> float | None:
        window = self.samples.get((job_id, index))
        if not window:
            return None
        first_t, first_pos = window[0]
        last_t, last_pos = window[-1]
        if now - last_t > self.WINDOW_S:
            return 0.0  # nothing received for a while
        elapsed = now - first_t
        return round((last_pos - first_pos) / elapsed, 1) \
            if elapsed > 0 and last_pos > first_pos else None

    def job(self, job_id: str) -> dict[str, Any] | None:
        """One job's live figures (None: not running here)."""
        sizes, done = self.sizes.get(job_id), self.done.get(job_id)
        if sizes is None or done is None:
            return None
        now = time.monotonic()
        files = []
        for i, (size, got) in enumerate(zip(list(sizes), list(done), strict=True)):
            speed = self.speed(job_id, i, now)
            files.append({"index": i, "size": size, "bytes_done": got, "bytes_per_s": speed,
                          "percent": round(100.0 * got / size, 2) if size else None,
                          "eta_s": round((size - got) / speed, 1)
                          if size is not None and speed else None})
        total = None if None in sizes else sum(s for s in sizes if s is not None)
        got = sum(done)
        speeds = [f["bytes_per_s"] for f in files if f["bytes_per_s"]]
        speed = round(sum(speeds), 1) if speeds else None
        return {"id": job_id, "bytes_total": total, "bytes_done": got,
                "percent": round(100.0 * got / total, 2) if total else None,
                "bytes_per_s": speed,
                "eta_s": round((total - got) / speed, 1) if total is not None and speed
                else None, "files": files, "at": datetime.now(UTC)}

    def jobs(self) -> list[dict[str, Any]]:
        return [j for j in (self.job(i) for i in list(self.sizes)) if j is not None]
