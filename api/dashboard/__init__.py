"""The night view: a page served by the API (``/`` → ``/dashboard``), every asset shipped in
this package (Jinja2 template, plain JS and CSS, uPlot vendored with its licence under
``static/vendor/uplot``): no external host, so it works at a site without internet.

The page signs in with an existing account (``POST /auth/token``; the viewer role
suffices), loads ``GET /dashboard/summary``, then follows ``GET /stream`` (its
``EventSource`` authenticated by the stream ticket cookie of ``POST /stream/session``) and
polls ``GET /health`` for the system's state. It keeps working during a store outage: the
summary answers from the journal (``read_models: "unavailable"``), commands still arrive on
the stream as pending.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool

from api.accounts import AUTH_ERRORS, allow
from api.dashboard.models import NightSummary
from api.errors import ApiError, ORJSONResponse
from api.routing import GuardedRoute
from bootstrap.ledger import Ledger
from domain.accounts import READERS

TAG = "dashboard"
HERE = Path(str(files(__name__)))
STATIC = HERE / "static"
#: Everything the page may load comes from this server.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
MEDIA_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
               "": "text/plain"}
_templates = Environment(loader=FileSystemLoader(HERE / "templates"),
                         autoescape=select_autoescape(["html"]))


def static_files() -> dict[str, Path]:
    """Every asset the page may load, by its path below ``/dashboard/static/``."""
    return {p.relative_to(STATIC).as_posix(): p for p in sorted(STATIC.rglob("*"))
            if p.is_file()}


def dashboard_router() -> APIRouter:
    r = APIRouter(route_class=GuardedRoute)
    assets = static_files()

    @r.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/dashboard", status_code=307)

    @r.get("/dashboard", tags=[TAG], response_class=HTMLResponse,
           summary="The night at a glance (HTML page; signs in with an existing account)")
    async def page(request: Request) -> HTMLResponse:
        html = _templates.get_template("dashboard.html").render(
            version=request.app.version)
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP,
                                           "X-Content-Type-Options": "nosniff",
                                           "Referrer-Policy": "no-referrer",
                                           "Cache-Control": "no-cache"})

    @r.get("/dashboard/static/{name:path}", tags=[TAG], include_in_schema=False)
    async def static(name: str) -> Response:
        path = assets.get(name)
        if path is None:
            raise ApiError(404, f"no dashboard asset {name}")
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix, "text/plain"),
                            headers={"X-Content-Type-Options": "nosniff",
                                     "Cache-Control": "no-cache"})

    # NightSummary documents the answer (tests/http/test_dashboard.py validates it); the
    # summary is sent as it is, not validated again on each load of the page
    @r.get("/dashboard/summary", tags=[TAG], dependencies=[allow(READERS)],
           response_model=NightSummary, responses=AUTH_ERRORS,
           summary="Tonight at a glance: executions, files per minute, packages, staging "
           "queue, downloads, processing jobs, observation results (smart queries)",
           description="Each section merges pending commands (`pending: true`); while the "
           "read models do not answer, sections come from the journal alone or are null, "
           "and `read_models` is `unavailable`. `read_model_position` is where the page "
           "starts following `GET /stream` (`after`).")
    async def summary(request: Request) -> Response:
        ledger: Ledger = request.app.state.ledger
        return ORJSONResponse(await run_in_threadpool(ledger.night.summary))

    return r
