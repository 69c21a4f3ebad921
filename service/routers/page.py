"""GET /: a small page to try the model in a browser (service/static: one HTML, JS and CSS file,
no CDN, no build step). Its assets are served under /static/page."""

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter()
assets = StaticFiles(directory=STATIC)


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")
