"""Routes of the dashboard: the single page at `/` and `/ui/...`, its assets at `/static/...`.

Everything the page needs (script, style, icon) is a file under `static/`; nothing is
fetched from another host, so the dashboard works offline. The script is native ES modules
served as they are (no build step): `static/app.js` is the entry (`<script type="module">`),
importing `static/lib/*.js` and `static/pages/**/*.js`; modules are JavaScript by MIME type
(`text/javascript`) and same-origin, which the policy's `script-src 'self'` allows. The page is a client of the
public REST API (`/api/v1/...`) and of the server-sent events at `/api/v1/events`.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, RedirectResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"

# The browser enforces "no other hosts": scripts, styles, images and connections are same-origin only.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
_MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".html": "text/html; charset=utf-8"}

router = APIRouter(include_in_schema=False)


def _index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_HEADERS)


@router.get("/")
def dashboard_root() -> FileResponse:
    return _index()


@router.get("/ui")
def dashboard_ui_bare() -> RedirectResponse:
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/{path:path}")
def dashboard_ui(path: str) -> FileResponse:
    """Any page of the single-page app (its script routes by the URL's #fragment or /ui/ path)."""
    return _index()


@router.get("/static/{path:path}")
def dashboard_static(path: str) -> FileResponse:
    file = (STATIC_DIR / path).resolve()
    if not file.is_file() or not file.is_relative_to(STATIC_DIR):
        raise HTTPException(status_code=404, detail=f"no static file {path!r}")
    return FileResponse(file, media_type=_MEDIA_TYPES.get(file.suffix), headers=_HEADERS)
