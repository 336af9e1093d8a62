"""Progress bars for long command-line work (tqdm, on stderr; off with --quiet or no TTY)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from tqdm import tqdm


@contextmanager
def position_bar(desc: str, total: int | None, quiet: bool = False, unit: str = "ev",
                 ) -> Iterator[Callable[..., None]]:
    """A bar over log positions (or other counts of ``unit``); yields
    ``advance(position, head=None)`` to move it to ``position`` (and stretch its total to
    ``head``)."""
    bar = tqdm(total=total or None, desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
               disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)

    def advance(position: int, head: int | None = None) -> None:
        if head is not None and head != bar.total:
            bar.total = head
        if position > bar.n:
            bar.update(position - bar.n)

    try:
        yield advance
    finally:
        bar.close()
