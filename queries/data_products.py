"""One data product for a reader: its row, where to download it (a presigned URL, or its
bytes from the local object store) and its lineage document. Refusals are
``queries.refusals``'."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from infra.lineage import to_prov_json
from infra.object_store import Area, ObjectStoreUnavailable
from queries.lineage import product_lineage
from queries.processing import ProcessingQueries
from queries.processing_plans import ProcessingSources
from queries.refusals import Refusal
from queries.rows import DataProductRow, PresignedDownloadRow

#: How long a presigned download URL lasts (the object store's default).
PRESIGNED_S = 3600
#: Retry-After of a download refused while the object store does not answer (seconds).
OBJECT_STORE_RETRY_S = 5


def product_row(processing: ProcessingQueries, product_id: Any) -> DataProductRow:
    """The product's row; refused when there is none."""
    row = processing.product(str(product_id))
    if row is None:
        raise Refusal("not_found", f"data product {product_id} not found")
    return row


@dataclass(frozen=True, slots=True)
class ProductDownload:
    """A product to download: a presigned ``url``, or else its bytes in ``chunks``."""

    product: DataProductRow
    url: str | None = None
    chunks: Iterator[bytes] | None = None

    def presigned(self) -> PresignedDownloadRow:
        """The answer of a presigned download (``DownloadView``)."""
        row = self.product
        return {"url": self.url, "expires_in_s": PRESIGNED_S, "media_type": row["media_type"],
                "size": row["size"], "checksum": row["checksum"]}


def product_download(sources: ProcessingSources, product_id: Any) -> ProductDownload:
    """Where to download the product: a presigned URL when the store gives one, else the
    object opened; refused for an unknown product, a missing object, or an object store that
    does not answer."""
    row = product_row(sources.processing, product_id)
    objects = sources.objects
    area = Area(row["area"])
    try:
        url = objects.presigned_url(area, row["key"], download_name=row["name"])
        if url is not None:
            return ProductDownload(row, url=url)
        if not objects.exists(area, row["key"]):
            raise Refusal("not_found", f"the object of data product {product_id} is missing")
        return ProductDownload(row, chunks=objects.open_stream(area, row["key"]))
    except ObjectStoreUnavailable as e:
        raise Refusal("unavailable", f"Object store unavailable: {e}",
                      retry_after_s=OBJECT_STORE_RETRY_S) from None


def lineage_document(processing: ProcessingQueries, product_id: Any,
                     format: Literal["json", "prov-json"]) -> dict[str, Any]:
    """The product's lineage: ``{root, nodes, edges}``, or a W3C PROV-JSON document; refused
    for an unknown product."""
    graph = product_lineage(processing, str(product_id))
    if graph is None:
        raise Refusal("not_found", f"data product {product_id} not found")
    return to_prov_json(graph) if format == "prov-json" else graph.to_json()
