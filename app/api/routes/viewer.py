"""GET /: the viewer, a static page (app/static, no build step) that posts slices or a series to /v1/series."""

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css"}
# Only the files shipped in app/static, by name: no path from the request ever reaches the file system.
ASSETS = {path.name: path for path in STATIC_DIR.iterdir() if path.suffix in MEDIA_TYPES}

router = APIRouter(include_in_schema=False)


def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise HTTPException(404, f"no viewer file {name!r}")
    path = ASSETS[name]
    return FileResponse(path, media_type=MEDIA_TYPES[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/")
def viewer_page() -> FileResponse:
    return asset("index.html")


@router.get("/static/{name}")
def viewer_asset(name: str) -> FileResponse:
    return asset(name)
