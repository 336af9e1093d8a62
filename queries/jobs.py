"""What the smart queries of jobs (download jobs, processing jobs) share: one job with its
parts, and a page of jobs, each merged with the journal's not-yet-projected commands."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table, select

from infra.journal import JournalEntry
from queries.overlay import mark_pending
from queries.rows import changeable
from queries.service import PENDING_SCAN_LIMIT, QueryService, Reading

Row = dict[str, Any]


@dataclass(frozen=True)
class JobReads:
    """How one kind of job is read: its table and view, its parts (download files,
    processing steps) and how a pending command shows in it."""

    kind: str  #: the journal subject's kind, e.g. ``download_job``
    jobs: Table
    view: Callable[[Row], Mapping[str, Any]]  #: a typed row (``queries.rows``)
    parts_key: str  #: where a job view holds its parts, e.g. ``files``
    parts: Table
    part_view: Callable[[Row], Mapping[str, Any]]
    part_order: str  #: the parts' column to order them by
    request_type: str  #: the command that creates a job
    pending_job: Callable[[JournalEntry], Row]  #: the view of a job only requested so far
    #: Applies a pending command other than the request to a known job; False: the command
    #: does not show ahead (it shows once applied)
    control: Callable[[Row, JournalEntry], bool]
    #: What a single job shows once merged, beyond its view (download jobs: speed and ETA
    #: from their files); None: nothing more
    shown: Callable[[Row], Row] | None = None

    def overlay(self, job: Row | None, e: JournalEntry) -> Row | None:
        """Applies one pending command to a job view (None: the job is not known yet)."""
        if e.command_type == self.request_type:
            if job is not None and not job["pending"]:
                return job  # projected already
            job = self.pending_job(e)
        elif job is None:
            return None
        elif e.status == "applied" and (job["last_position"] or 0) >= (e.position or 0):
            return job  # the read model shows it already
        elif not self.control(job, e):
            return job
        return mark_pending(job, e)

    def job(self, r: Reading, job_id: str) -> Row | None:
        """One job with its parts, the pending commands applied (None: unknown)."""
        j, p = self.jobs, self.parts
        rows = r.rows(select(j).where(j.c.id == job_id))
        job = changeable(self.view(rows[0])) if rows else None
        if job is not None:
            job[self.parts_key] = [self.part_view(x) for x in r.rows(
                select(p).where(p.c.job_id == job_id).order_by(p.c[self.part_order]))]
        for e in r.unprojected(f"{self.kind}:{job_id}")[-PENDING_SCAN_LIMIT:]:
            job = self.overlay(job, e)
        job = r.entity(job, f"{self.kind.replace('_', ' ')} {job_id}")
        if job is None:
            return None
        job["read_model_position"] = r.position
        return job if self.shown is None else self.shown(job)

    def pending(self, r: Reading, jobs: dict[str, Row], command_types: Sequence[str],
                offset: int) -> list[Row]:
        """Applies the pending commands to the page's ``jobs`` (in place) and returns the
        jobs not projected yet, newest first (only on the first page)."""
        new: dict[str, Row] = {}
        for e in r.unprojected(None, command_types)[-PENDING_SCAN_LIMIT:]:
            jid = str(e.payload["id"])
            if jid in jobs:
                jobs[jid] = self.overlay(jobs[jid], e) or jobs[jid]
            elif e.command_type == self.request_type and not offset:
                row = self.overlay(None, e)
                if row is not None:
                    new[jid] = row
            elif jid in new:
                new[jid] = self.overlay(new[jid], e) or new[jid]
        return [*reversed(new.values())]


class JobQueries:
    """The smart queries a kind of job shares (one job, merged with its pending commands);
    its module adds its lists and the reads its workers need."""

    def __init__(self, queries: QueryService, reads: JobReads) -> None:
        self.q = queries
        self.reads = reads
        self.jobs = reads.jobs

    def job(self, job_id: str) -> Row | None:
        """One job with its parts, the pending commands applied (None: unknown)."""
        return self.q.read(lambda r: self.reads.job(r, job_id))
