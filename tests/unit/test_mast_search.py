"""The MAST lookups of a request (``queries.mast_search``) without a server: product rows as
the API shows them, the filters as MAST names them, and the files of a download request
given its products (each file name once, MAST's download URL, the configured chunk size)."""

from __future__ import annotations

from dataclasses import dataclass, field

from commands.downloads import ProductFilters, ProductRef, StartDownloadRequest
from infra.settings import Settings
from queries.mast_search import (
    download_job,
    observation_criteria,
    product_filters,
    product_view,
    resolve_files,
)


@dataclass
class Sources:
    settings: Settings = field(default_factory=lambda: Settings(
        mast_base_url="https://mast.example.org/", download_chunk_bytes=1 << 20))


@dataclass
class Filters:
    collection: list[str] | None = None
    instrument: list[str] | None = None
    calib_level: list[int] | None = None
    dataproduct_type: list[str] | None = None
    product_type: list[str] | None = None
    product_subgroup: list[str] | None = None
    extension: list[str] | None = None


def test_a_product_row_as_the_api_shows_it() -> None:
    row = {"dataURI": "mast:HST/product/u9o40504m_c3m.fits", "size": 207360,
           "obs_id": "U9O40504M", "obsID": 2003738726, "productType": "AUXILIARY",
           "productSubGroupDescription": "C3M", "obs_collection": "HST"}
    view = product_view(row)
    assert view["filename"] == "u9o40504m_c3m.fits"  # the URI's last part when not named
    assert view["obsid"] == "2003738726"
    assert (view["product_type"], view["product_subgroup"], view["collection"]) == (
        "AUXILIARY", "C3M", "HST")
    assert product_view({"productFilename": "x.fits"})["data_uri"] is None


def test_filters_as_mast_names_them() -> None:
    f = Filters(collection=["HST"], calib_level=[2, 3])
    assert observation_criteria(f) == {"obs_collection": ["HST"], "calib_level": [2, 3]}
    assert product_filters(ProductFilters(extension=["fits"])) == {
        "product_type": None, "product_subgroup": None, "calib_level": None,
        "extension": ["fits"]}


def test_the_files_of_a_request_each_name_once() -> None:
    body = StartDownloadRequest(products=[
        ProductRef(data_uri="mast:HST/product/a_flt.fits", size=10),
        ProductRef(data_uri="mast:HST/other/a_flt.fits"),
        ProductRef(data_uri="mast:HST/product/b.fits", filename="renamed.fits")])
    files = resolve_files(Sources(), body)
    assert [f.filename for f in files] == ["a_flt.fits", "renamed.fits"]
    assert files[0].url == ("https://mast.example.org/api/v0.1/Download/file"
                            "?uri=mast:HST/product/a_flt.fits")
    assert files[0].size == 10


def test_a_download_job_takes_the_configured_chunk_size_unless_given() -> None:
    body = StartDownloadRequest(products=[ProductRef(data_uri="mast:HST/product/a.fits")],
                                destination="hst/a")
    job = download_job(Sources(), body, "chunked")
    assert (job.mode, job.chunk_size, job.destination) == ("chunked", 1 << 20, "hst/a")
    given = body.model_copy(update={"chunk_size": 64 * 1024})
    assert download_job(Sources(), given, "stream").chunk_size == 64 * 1024
