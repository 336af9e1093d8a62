"""The API's documentation pages, Swagger UI at ``/docs`` and ReDoc at ``/redoc``, served with
the assets the ``fastapi-offline`` package ships (Swagger UI, ReDoc, their licences in the
wheel): an observatory without internet still reads them. No page references another host,
and none may reach one: ReDoc's bundle draws Redocly's logo from cdn.redoc.ly, which the pages'
Content-Security-Policy (``CSP``: this server only) keeps the browser from fetching.
"""

from __future__ import annotations

from functools import partial
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse

#: Where the assets are served.
ASSETS_URL = "/docs-assets"
ASSETS_DIR = Path(str(files("fastapi_offline") / "static"))
FAVICON = f"{ASSETS_URL}/favicon.png"
#: The pages' scripts, styles, images, fonts, workers and requests come from this server
#: only; their inline start-up scripts and styles, and ReDoc's worker (a blob), are allowed.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
       "style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
       "worker-src 'self' blob:; connect-src 'self'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")


def _offline(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def install_docs(app: FastAPI, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve the documentation pages of ``app`` (created with ``docs_url=None,
    redoc_url=None``) from the packaged assets."""
    # Swagger UI's validator badge would load an image from validator.swagger.io
    app.swagger_ui_parameters = {**(app.swagger_ui_parameters or {}), "validatorUrl": None}
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect_url = f"{docs_url}/oauth2-redirect"

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        at = partial(rooted, request)
        return _offline(get_swagger_ui_html(
            openapi_url=at(openapi_url), title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=at(oauth2_redirect_url),
            swagger_js_url=at(f"{ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=at(f"{ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=at(FAVICON), swagger_ui_parameters=app.swagger_ui_parameters))

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return _offline(get_swagger_ui_oauth2_redirect_html())

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        at = partial(rooted, request)
        return _offline(get_redoc_html(
            openapi_url=at(openapi_url), title=f"{app.title} - ReDoc",
            redoc_js_url=at(f"{ASSETS_URL}/redoc.standalone.js"),
            redoc_favicon_url=at(FAVICON), with_google_fonts=False))


def rooted(request: Request, path: str) -> str:
    """``path`` below the root path the application is served under (behind a proxy)."""
    return f"{request.scope.get('root_path', '')}{path}"
