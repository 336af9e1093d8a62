"""A rebuild's events decoded in worker processes.

Filling fresh read-model tables from position 0 is mostly decoding: the stored state's JSON,
its UUIDs and datetimes, the upcasters, the event object, then the event's rows. One process
does that at one core's speed, so ``build_fresh`` hands pages of stored events, as plain
tuples (position, originator id, version, topic, state bytes), to decoder processes
(``concurrent.futures.ProcessPoolExecutor``, started by *spawn*: nothing of the parent's
threads or connections is inherited). Each decodes with the application's mapper
(``infra.event_store.event_mapper``) and the projector's own event → row translation on a set
of tables named like the parent's, and answers compact operations: ``(statement key,
parameters)``, no SQLAlchemy statement. The parent looks the statement up by its key and
writes the page exactly as the single-process path does (same operations in the same order).

What a statement key alone cannot carry goes back undecoded and the parent decodes it itself:
an operation without parameters (an expression update, values inline) and the first event
that uses a statement key in a decoder process (the parent learns that key's statement from
it). A decoder process handles its pages in submission order, so the parent has always
decoded a key's first use before any page that uses it in compact form.

Pages are submitted ahead (two per decoder) and their answers taken in log order. A decoder
that dies (killed, out of memory) breaks the pool: the rebuild fails at once with
``DecoderDied`` (the fresh tables are dropped, nothing is switched), never waits.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Any
from uuid import UUID

#: A stored event as the decoders get it: position, originator id (a UUID's 128-bit integer:
#: a UUID object is pickled by Python code, an int by C), version, topic, state.
Row = tuple[int, int, int, str, bytes]
#: An event's answer: its position and its operations ``(key, parameters)``, or None when
#: the parent must decode the event itself.
Answer = tuple[int, list[tuple[Any, dict[str, Any]]] | None]
Op = tuple[Any, Any, dict[str, Any]]  # (statement key, statement, parameters)

#: Below this many events a rebuild decodes in its own process: starting decoders (~1 s of
#: imports each) would cost more than they save.
MIN_EVENTS = 20_000


class DecoderDied(RuntimeError):
    """A rebuild's decoder process ended without answering (killed, out of memory)."""


def default_workers() -> int:
    """Decoder processes when none are configured: one per CPU beside the one the
    rebuilding process keeps busy (reading, writing, unpickling the answers). On 2 CPUs
    that is 1, i.e. decode in the rebuilding process: measured on this 2-core machine
    (bench/replay.py, 1,000,000 events, shared with other work), 2 decoders took 84 s
    against 48 s in-process; the parent's pickling and unpickling outweigh what they save."""
    return max(1, (os.cpu_count() or 1) - 1)


def table_of(key: Any) -> str:
    """The table a statement key writes (inserts are keyed by their table's name)."""
    return key if isinstance(key, str) else key[0]


# -- in a decoder process ------------------------------------------------------------------
_decoder: dict[str, Any] = {}


def _start_decoder(ops_factory: Callable[[Any, str], Any], generation: str, dialect: str,
                   only: frozenset[str] | None) -> None:
    from infra.event_store import event_mapper
    from projections.tables import build_tables

    tables = build_tables(generation=generation, table_suffix="_" + generation)
    _decoder.update(ops=ops_factory(tables, dialect), mapper=event_mapper(), only=only,
                    sent=set())


def _decode_page(rows: list[Row]) -> list[Answer]:
    """The compact operations of ``rows`` (events without any operation are left out)."""
    from eventsourcing.persistence import Notification

    ops = _decoder["ops"].ops
    to_domain_event = _decoder["mapper"].to_domain_event
    only: frozenset[str] | None = _decoder["only"]
    sent: set[Any] = _decoder["sent"]
    out: list[Answer] = []
    for position, originator_id, version, topic, state in rows:
        event = to_domain_event(Notification(id=position, originator_id=UUID(int=originator_id),
                                             originator_version=version, topic=topic,
                                             state=state))
        compact: list[tuple[Any, dict[str, Any]]] | None = []
        for key, _stmt, params in ops(event, position):
            if only is not None and table_of(key) not in only:
                continue
            if compact is not None and params and key in sent:
                compact.append((key, params))
            else:
                compact = None  # the parent decodes this event: it learns the new keys
                if params:
                    sent.add(key)
        if compact is None or compact:
            out.append((position, compact))
    return out


# -- in the rebuilding process -------------------------------------------------------------
class ParallelDecoder:
    """Decoder processes for one fresh build: ``ops_factory(tables, dialect)`` is the
    projector's event → operations translator (a module-level class or function, which the
    processes import), ``ops`` the parent's own one on the same tables."""

    def __init__(self, workers: int, ops_factory: Callable[[Any, str], Any], ops: Any,
                 generation: str, dialect: str, decode: Callable[[Any], Any],
                 only: frozenset[str] | None = None) -> None:
        self.workers = workers
        self.ops = ops
        self.decode = decode
        self.only = only
        self.statements: dict[Any, Any] = {}
        self._pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_decoder, initargs=(ops_factory, generation, dialect, only))

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ParallelDecoder:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def page_ops(self, pages: Iterable[Sequence[Any]],
                 handled: Collection[str]) -> Generator[tuple[list[Op], int], None, None]:
        """Each page's operations, in log order, with the page's last position; events of
        topics not in ``handled`` (receipts) are not sent, not decoded."""
        ahead: deque[tuple[Sequence[Any], Future[list[Answer]]]] = deque()
        pages = iter(pages)
        more = True
        while more or ahead:
            while more and len(ahead) < 2 * self.workers:
                page = next(pages, None)
                if page is None:
                    more = False
                    break
                rows = [(n.id, _uuid_int(n.originator_id), n.originator_version, n.topic,
                         n.state) for n in page if n.topic.rpartition(":")[2] in handled]
                ahead.append((page, self._submit(rows)))
            if not ahead:
                return
            page, future = ahead.popleft()
            yield self._ops(page, self._answer(future)), page[-1].id

    def _submit(self, rows: list[Row]) -> Future[list[Answer]]:
        try:
            return self._pool.submit(_decode_page, rows)
        except BrokenProcessPool as e:
            raise DecoderDied(_died(e)) from e

    @staticmethod
    def _answer(future: Future[list[Answer]]) -> list[Answer]:
        try:
            return future.result()
        except BrokenProcessPool as e:
            raise DecoderDied(_died(e)) from e

    def _ops(self, page: Sequence[Any], answers: list[Answer]) -> list[Op]:
        statements = self.statements
        out: list[Op] = []
        by_position: dict[int, Any] | None = None
        for position, compact in answers:
            if compact is not None:
                out.extend((key, statements[key], params) for key, params in compact)
                continue
            if by_position is None:
                by_position = {n.id: n for n in page}
            for key, stmt, params in self.ops.ops(self.decode(by_position[position]), position):
                if self.only is not None and table_of(key) not in self.only:
                    continue
                if params:
                    statements.setdefault(key, stmt)
                out.append((key, stmt, params))
        return out


def _uuid_int(originator_id: Any) -> int:
    """A stored originator id as an integer (PostgreSQL gives UUIDs, SQLite hex strings)."""
    return originator_id.int if isinstance(originator_id, UUID) else UUID(originator_id).int


def _died(e: BaseException) -> str:
    return (f"a rebuild decoder process ended without answering ({e}); the fresh tables "
            "were dropped and nothing was switched: run the rebuild again (fewer decoders "
            "with OBSLEDGER_REBUILD_WORKERS if memory is short)")


@contextmanager
def parallel_pages(projector: Any, ops: Any, ops_factory: Callable[[Any, str], Any],
                   generation: str, pages: Iterable[Sequence[Any]], head: int,
                   only: frozenset[str] | None,
                   ) -> Iterator[Iterator[tuple[list[Op], int]]]:
    """``build_fresh``'s pages as (operations, last position): decoded by
    ``projector.rebuild_workers`` processes (``default_workers()`` if None), or in this
    process when that is 1 or the log is shorter than ``MIN_EVENTS``."""
    workers = projector.rebuild_workers or default_workers()
    if workers <= 1 or head < MIN_EVENTS:
        yield ((list(projector._page_ops(ops, page, only)), page[-1].id) for page in pages)
        return
    with ParallelDecoder(workers, ops_factory, ops, generation, projector.engine.dialect.name,
                         projector.store.decode, only) as decoder:
        built = decoder.page_ops(pages, ops.handlers)
        try:
            yield built
        finally:
            built.close()
