"""The one pagination scheme of every list: ``limit`` + ``offset``, a ``total`` in the body and
RFC 8288 ``Link`` headers (``rel="next"``, ``rel="prev"``).
The audit event log pages by log position instead (``after``; its ``Link`` has ``next``).

Lists that took ``skip`` before (processing jobs, data products, the request audit log)
still take it, as a deprecated alias of ``offset``. A list answered from the journal alone
(the read models down) has a null ``total`` and only a first page: no ``next`` link.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import Query, Request, Response

LIMIT_DEFAULT = 100
LIMIT_MAX = 1000
OFFSET_MAX = 10_000_000

#: The ``Link`` header as documented on every list's 200.
LINK_HEADER: dict[str, Any] = {
    "Link": {"description": "RFC 8288 links to the neighbouring pages: "
             "`</raw_data_files?limit=100&offset=200>; rel=\"next\", "
             "</raw_data_files?limit=100&offset=0>; rel=\"prev\"` (relative to the request; "
             "`next` only while `offset + limit < total`, `prev` only after the first page; "
             "the audit event log: `next` with `after`).",
             "schema": {"type": "string"}}}


@dataclass(frozen=True, slots=True)
class PageRequest:
    limit: int
    offset: int


Limit = Annotated[int, Query(ge=1, le=LIMIT_MAX, description="Rows per page.")]
Offset = Annotated[int | None, Query(ge=0, le=OFFSET_MAX, description=(
    "Rows to skip (0: the first page, where rows of pending commands lead); follow the "
    "`Link` header's `next`."))]


async def paging(limit: Limit = LIMIT_DEFAULT, offset: Offset = None) -> PageRequest:
    """``limit`` and ``offset`` of a list."""
    return PageRequest(limit, offset or 0)


async def paging_with_skip(
    limit: Limit = LIMIT_DEFAULT, offset: Offset = None,
    skip: Annotated[int | None, Query(ge=0, le=OFFSET_MAX, deprecated=True, description=(
        "Deprecated alias of `offset` (this list's older name for it); `offset`, when given "
        "too, is the one used."))] = None,
) -> PageRequest:
    """``limit`` and ``offset`` of a list that called its offset ``skip`` before (any pair
    the schema allows is accepted: ``offset`` wins)."""
    return PageRequest(limit, offset if offset is not None else (skip or 0))


def link_header(request: Request, page: PageRequest, total: int | None) -> str | None:
    """The ``Link`` value for ``page`` of a list of ``total`` rows (None: no neighbour)."""
    links = []
    if total is not None and page.offset + page.limit < total:
        links.append((page.offset + page.limit, "next"))
    if page.offset > 0:
        links.append((max(0, page.offset - page.limit), "prev"))
    if not links:
        return None
    return ", ".join(f'<{same_query(request, limit=page.limit, offset=offset)}>; rel="{rel}"'
                     for offset, rel in links)


def same_query(request: Request, **given: Any) -> str:
    """The request's path and query with the parameters ``given`` (and without ``skip``,
    the older name of ``offset``): a link relative to the request, filters kept."""
    kept = [(k, v) for k, v in request.query_params.multi_items()
            if k not in given and k != "skip"]
    return f"{request.url.path}?{urlencode([*kept, *given.items()])}"


def next_after(request: Request, response: Response, position: int | None) -> None:
    """``Link: rel="next"`` of a list paged by log position (``after``), when more follow."""
    if position is not None:
        response.headers["Link"] = f'<{same_query(request, after=position)}>; rel="next"'


def paged(request: Request, response: Response, page: PageRequest, total: int | None) -> None:
    """Set the ``Link`` header of ``page``'s answer."""
    link = link_header(request, page, total)
    if link is not None:
        response.headers["Link"] = link
