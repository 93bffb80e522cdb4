"""/docs (Swagger UI) and /redoc that work without internet: their JS and CSS are served by this server.

The assets come from the `fastapi-offline` package (MIT; it vendors swagger-ui-dist 5 and redoc 2, licence
headers inside the files); only its static folder is used, the pages are FastAPI's own. The pages and
assets are open, as FastAPI's default /docs is: they hold no data, and /openapi.json lists only routes.
"""
from __future__ import annotations

from functools import lru_cache
from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import HTMLResponse, Response

ASSETS_URL = "/docs-assets"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# The pages' own inline set-up scripts and styles run; nothing from another host loads.
POLICY = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                                     "script-src 'self' 'unsafe-inline'; worker-src 'self' blob:; font-src 'self' data:"}


def assets_dir() -> str:
    return str(files("fastapi_offline") / "static")


# ReDoc's bundle draws its maker's logo from a CDN (an <img>, hidden when it fails): served here with the
# local favicon in its place, so the browser never asks another host.
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"


@lru_cache(maxsize=1)
def redoc_bundle() -> bytes:
    bundle = (files("fastapi_offline") / "static" / "redoc.standalone.js").read_bytes()
    return bundle.replace(REDOC_LOGO, f"{ASSETS_URL}/favicon.png".encode())


def install(app: FastAPI) -> None:
    """Adds /docs, /docs/oauth2-redirect, /redoc and the assets; make the app with docs_url=None, redoc_url=None."""
    @app.get(f"{ASSETS_URL}/redoc.standalone.js", include_in_schema=False)  # before the mount, which would answer
    async def redoc_js() -> Response:
        return Response(redoc_bundle(), media_type="text/javascript")

    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    def local(request: Request, path: str) -> str:
        return f"{request.scope.get('root_path', '')}{path}"  # behind a proxy's prefix too

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=local(request, app.openapi_url), title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=local(request, redirect_url),
            swagger_js_url=local(request, f"{ASSETS_URL}/swagger-ui-bundle.js"),
            swagger_css_url=local(request, f"{ASSETS_URL}/swagger-ui.css"),
            swagger_favicon_url=local(request, f"{ASSETS_URL}/favicon.png"),
            swagger_ui_parameters=app.swagger_ui_parameters)
        page.headers.update(POLICY)
        return page

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=local(request, app.openapi_url), title=f"{app.title} - ReDoc",
            redoc_js_url=local(request, f"{ASSETS_URL}/redoc.standalone.js"),
            redoc_favicon_url=local(request, f"{ASSETS_URL}/favicon.png"), with_google_fonts=False)
        page.headers.update(POLICY)
        return page
