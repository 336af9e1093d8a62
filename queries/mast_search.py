"""The MAST archive for a request: observation searches (with each observation's products)
and the files of a download request (its products, or the products of an observation),
through ``infra.mast_archive``. Nothing here touches the event store; MAST's refusals and
failures are ``infra.mast_archive.ArchiveError``s (404 unknown, 422 refused, 503 failing)."""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from typing import Any, Literal, Protocol

from commands.downloads import DownloadFileSpec, RequestDownload, StartDownloadRequest
from infra.mast_archive import ArchiveError, MastArchive, download_url, table_rows
from infra.settings import Settings


class ArchiveSources(Protocol):
    """Where the MAST server is configured (``bootstrap.ledger.Ledger`` is one)."""

    settings: Settings


class ProductCriteria(Protocol):
    """Which products of an observation (``commands.downloads.ProductFilters``)."""

    product_type: list[str] | None
    product_subgroup: list[str] | None
    calib_level: list[int] | None
    extension: list[str] | None


class ObservationCriteria(ProductCriteria, Protocol):
    """Which observations, and which of their products (a search's filters)."""

    collection: list[str] | None
    instrument: list[str] | None
    dataproduct_type: list[str] | None


class SearchRequest(Protocol):
    """What every search asks besides where to look: filters, products, how many."""

    include_products: bool
    limit: int

    @property
    def filters(self) -> ObservationCriteria: ...


def archive(sources: ArchiveSources) -> MastArchive:
    """The configured MAST server."""
    s = sources.settings
    return MastArchive(s.mast_base_url, s.mast_timeout_s)


def product_view(row: dict[str, Any]) -> dict[str, Any]:
    """A MAST product row as the API shows it (``MastProduct``)."""
    uri = row.get("dataURI")
    return {"data_uri": uri, "filename": row.get("productFilename") or (
                posixpath.basename(uri) if uri else None),
            "size": row.get("size"), "obs_id": row.get("obs_id"),
            "obsid": None if row.get("obsID") is None else str(row["obsID"]),
            "product_type": row.get("productType"),
            "product_subgroup": row.get("productSubGroupDescription"),
            "description": row.get("description"), "collection": row.get("obs_collection")}


def product_filters(f: ProductCriteria) -> dict[str, Any]:
    """The product filters ``MastArchive.products`` applies."""
    return {"product_type": f.product_type, "product_subgroup": f.product_subgroup,
            "calib_level": f.calib_level, "extension": f.extension}


def observation_filters(f: ObservationCriteria) -> dict[str, Any]:
    """The observation filters of a cone search (``MastArchive.by_target``, …)."""
    return {"collection": f.collection, "instrument": f.instrument,
            "calib_level": f.calib_level, "dataproduct_type": f.dataproduct_type}


def observation_criteria(f: ObservationCriteria) -> dict[str, Any]:
    """The filters given, as ``Observations.query_criteria`` names them."""
    return {k: v for k, v in {
        "obs_collection": f.collection, "instrument_name": f.instrument,
        "calib_level": f.calib_level, "dataproduct_type": f.dataproduct_type}.items()
        if v is not None}


def search(sources: ArchiveSources, body: SearchRequest,
           query: Callable[[MastArchive], Any]) -> dict[str, Any]:
    """Run ``query`` on the archive: the observations (at most ``body.limit``), and with
    ``include_products`` each one's products, filtered (``SearchResult``)."""
    mast = archive(sources)
    table = query(mast)
    rows = table_rows(table, body.limit)
    answer: dict[str, Any] = {"count": len(table), "observations": rows, "products": None}
    if body.include_products:
        obsids = [str(r["obsid"]) for r in rows if r.get("obsid") is not None]
        products: dict[str, list[dict[str, Any]]] = {o: [] for o in obsids}
        if obsids:
            table = mast.products(obsids, product_filters(body.filters))
            for row in table_rows(table):
                view = product_view(row)
                products.setdefault(view["obsid"] or "", []).append(view)
        answer["products"] = products
    return answer


def resolve_files(sources: ArchiveSources, body: StartDownloadRequest,
                  ) -> list[DownloadFileSpec]:
    """The files of a download request: its products, or the products of its obs_id (each
    file name once)."""
    base = sources.settings.mast_base_url
    if body.products is not None:
        products = [p.model_dump() for p in body.products]
    else:
        mast = archive(sources)
        table = mast.by_criteria("observation search", "obs_id", obs_id=body.obs_id)
        obsids = [str(r["obsid"]) for r in table_rows(table) if r.get("obsid") is not None]
        if not obsids:
            raise ArchiveError(404, f"MAST has no observation {body.obs_id}", "obs_id")
        products = [product_view(r) for r in table_rows(
            mast.products(obsids, product_filters(body.filters)))]
        products = [p for p in products if p["data_uri"]][:body.filters.max_files]
        if not products:
            raise ArchiveError(404, f"no product of {body.obs_id} matches the filters",
                               "filters")
    files = []
    seen: set[str] = set()
    for i, p in enumerate(products):
        name = p.get("filename") or posixpath.basename(p["data_uri"])
        if name in seen:
            continue
        seen.add(name)
        try:
            files.append(DownloadFileSpec(
                url=download_url(base, p["data_uri"]), filename=name, data_uri=p["data_uri"],
                obs_id=p.get("obs_id"), obsid=p.get("obsid"),
                product_type=p.get("product_type"), instrument=p.get("instrument"),
                size=p.get("size")))
        except ValueError as e:
            raise ArchiveError(422, f"product {i} ({name}): {e}", f"products.{i}") from e
    return files


def download_job(sources: ArchiveSources, body: StartDownloadRequest,
                 mode: Literal["stream", "chunked"]) -> RequestDownload:
    """The download job of a request: its files resolved, the configured chunk size unless
    it gives one."""
    files = resolve_files(sources, body)
    return RequestDownload.model_construct(
        id=body.id, files=files, destination=body.destination, mode=mode,
        chunk_size=body.chunk_size or sources.settings.download_chunk_bytes,
        register_files=body.register_files)
