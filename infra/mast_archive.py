"""Searches of the MAST archive through astroquery's ``Observations`` API.

Each search builds its own ``ObservationsClass`` (cheap; no state shared between threads)
pointed at ``OBSLEDGER_MAST_BASE_URL``. A target name is resolved by the same MAST server's
name-lookup service (``Mast.Name.Lookup`` through the portal API), not by astroquery's
resolver, which lives at a fixed STScI address: a mirror or an offline replay of MAST then
serves target searches too. Answers are astropy tables, returned as JSON-safe rows.
Failures are ``ArchiveError`` with an HTTP status for the API: an unknown target 404, a
query MAST refuses 422, MAST unreachable or failing 503.
"""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import quote

MAST_PRODUCT_FIELDS = {"product_type": "productType", "product_subgroup":
                       "productSubGroupDescription", "calib_level": "calib_level",
                       "extension": "extension"}
OBSERVATION_FILTERS = {"collection": "obs_collection", "instrument": "instrument_name",
                       "calib_level": "calib_level", "dataproduct_type": "dataproduct_type"}


class ArchiveError(Exception):
    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field


def _json_value(v: Any) -> Any:
    if v is None or v is _masked():
        return None
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _masked() -> Any:
    import numpy as np

    return np.ma.masked


def table_rows(table: Any, limit: int | None = None) -> list[dict[str, Any]]:
    names = [n for n in table.colnames if n != "_selected_"]
    rows = []
    for i, row in enumerate(table):
        if limit is not None and i >= limit:
            break
        rows.append({n: _json_value(row[n]) for n in names})
    return rows


def download_url(base_url: str, data_uri: str) -> str:
    """Where MAST serves a product (what astroquery's ``download_file`` asks for)."""
    return f"{base_url.rstrip('/')}/api/v0.1/Download/file?uri={quote(data_uri, safe=':/')}"


class MastArchive:
    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _observations(self) -> Any:
        from astroquery.mast import ObservationsClass

        return self._pointed(ObservationsClass())

    def _pointed(self, query: Any) -> Any:
        """An astroquery MAST query object whose portal connection uses the configured base."""
        portal = query._portal_api_connection
        portal.MAST_REQUEST_URL = self.base_url + "/api/v0/invoke"
        portal.COLUMNS_CONFIG_URL = self.base_url + "/portal/Mashup/Mashup.asmx/columnsconfig"
        portal.MAST_DOWNLOAD_URL = self.base_url + "/api/v0.1/Download/file"
        portal.MAST_BUNDLE_URL = self.base_url + "/api/v0.1/Download/bundle"
        portal.TIMEOUT = self.timeout_s
        return query

    def _call(self, what: str, fn: Any, field: str | None = None) -> Any:
        import requests
        from astroquery.exceptions import (
            InvalidQueryError,
            RemoteServiceError,
            ResolverError,
        )

        try:
            return fn()
        except ResolverError as e:
            raise ArchiveError(404, f"unknown target: {e}", field) from e
        except InvalidQueryError as e:
            raise ArchiveError(422, f"MAST refused the {what}: {e}", field) from e
        except (requests.ConnectionError, requests.Timeout) as e:
            raise ArchiveError(503, f"MAST is unreachable: {type(e).__name__}") from e
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else 503
            if 400 <= code < 500:
                raise ArchiveError(422, f"MAST refused the {what}: HTTP {code}", field) from e
            raise ArchiveError(503, f"MAST failed the {what}: HTTP {code}") from e
        except RemoteServiceError as e:
            raise ArchiveError(503, f"MAST failed the {what}: {e}") from e
        except ArchiveError:
            raise
        except Exception as e:  # an answer astroquery could not read: MAST's side, not a 500
            raise ArchiveError(503, f"MAST's answer to the {what} could not be read: "
                               f"{type(e).__name__}: {e}") from e

    # -- searches --------------------------------------------------------------------------
    def resolve(self, target: str) -> Any:
        """The sky position (a SkyCoord) MAST's ``Mast.Name.Lookup`` service gives ``target``:
        the first of its resolvers that knows the name, as astroquery's resolver answers.
        An unknown name is ``ArchiveError`` 404 on the field ``target``."""
        from astropy.coordinates import SkyCoord
        from astroquery.exceptions import RemoteServiceError
        from astroquery.mast import MastClass

        mast = self._pointed(MastClass())

        def lookup() -> list[dict[str, Any]]:
            responses = mast.service_request_async(
                "Mast.Name.Lookup", {"input": target, "format": "json"})
            answer = responses[0].json()
            if answer.get("status") == "ERROR":
                raise RemoteServiceError(answer.get("msg") or "name lookup failed")
            return list(answer.get("resolvedCoordinate") or [])

        found = self._call("name lookup", lookup, "target")
        if not found:
            raise ArchiveError(404, f"unknown target: MAST's name lookup does not know "
                               f"{target!r}", "target")
        first = found[0]
        try:
            return SkyCoord(float(first["ra"]), float(first["decl"]), unit="deg",
                            frame="icrs")
        except (KeyError, TypeError, ValueError) as e:
            raise ArchiveError(503, f"MAST's name lookup answered no position for "
                               f"{target!r}: {first!r}") from e

    def by_target(self, target: str, radius_deg: float, filters: dict[str, Any],
                  ) -> Any:
        return self._around("target search", self.resolve(target), radius_deg, filters,
                            "target")

    def by_coordinates(self, coordinates: Any, radius_deg: float,
                       filters: dict[str, Any]) -> Any:
        return self._around("coordinate search", coordinates, radius_deg, filters)

    def _around(self, what: str, coordinates: Any, radius_deg: float,
                filters: dict[str, Any], field: str | None = None) -> Any:
        import astropy.units as u

        obs = self._observations()
        criteria = _criteria(filters)
        if criteria:
            return self._call(what, lambda: obs.query_criteria(
                coordinates=coordinates, radius=radius_deg * u.deg, **criteria), field)
        return self._call(what, lambda: obs.query_region(
            coordinates, radius=radius_deg * u.deg), field)

    def by_criteria(self, what: str, field: str, **criteria: Any) -> Any:
        obs = self._observations()
        return self._call(what, lambda: obs.query_criteria(**criteria), field)

    def products(self, obsids: list[str], filters: dict[str, Any]) -> Any:
        """The products of observations (MAST obsids), filtered like ``filter_products``."""
        obs = self._observations()
        table = self._call("product list", lambda: obs.get_product_list(obsids))
        mast_filters = {MAST_PRODUCT_FIELDS[k]: v for k, v in filters.items()
                        if v is not None and k in MAST_PRODUCT_FIELDS and k != "extension"}
        extension = filters.get("extension")
        if mast_filters or extension:
            table = self._call("product filter", lambda: obs.filter_products(
                table, extension=extension, **mast_filters), "filters")
        return table


def _criteria(filters: dict[str, Any]) -> dict[str, Any]:
    return {OBSERVATION_FILTERS[k]: v for k, v in filters.items()
            if v is not None and k in OBSERVATION_FILTERS}


def parse_coordinates(ra: float | str, dec: float | str) -> Any:
    """A SkyCoord from degrees (numbers or numeric strings) or sexagesimal strings
    (RA in hours ``05:35:17.3`` or ``5h35m17.3s``, Dec in degrees ``-05:23:28``).
    Raises ``ArchiveError`` 422 naming the field."""
    import astropy.units as u
    from astropy.coordinates import Angle, SkyCoord

    def angle(value: float | str, field: str, hours: bool) -> Any:
        try:
            if isinstance(value, int | float) or _numeric(value):
                return Angle(float(value), unit=u.deg)
            return Angle(str(value), unit=u.hourangle if hours else u.deg)
        except Exception as e:
            raise ArchiveError(422, f"{field} is not an angle: {value!r}", field) from e

    ra_a, dec_a = angle(ra, "ra", True), angle(dec, "dec", False)
    if not 0 <= ra_a.degree < 360:
        raise ArchiveError(422, f"ra must be in [0, 360) degrees, not {ra_a.degree}", "ra")
    if not -90 <= dec_a.degree <= 90:
        raise ArchiveError(422, f"dec must be in [-90, 90] degrees, not {dec_a.degree}", "dec")
    return SkyCoord(ra_a, dec_a, frame="icrs")


def _numeric(value: str) -> bool:
    try:
        float(value)
    except ValueError:
        return False
    return True
