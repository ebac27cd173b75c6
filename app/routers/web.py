"""The web page at `/`: static files shipped in the package, and the settings the page needs."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.middleware.gzip import GZipMiddleware
from starlette.staticfiles import StaticFiles

from app.dependencies import get_service, get_settings
from app.references import SUFFIX_BY_FORMAT
from app.schemas import UiConfig
from app.service import VPRService
from app.settings import Settings

STATIC_DIR = Path(__file__).resolve().parents[1] / "web" / "static"
ACCEPTED_TYPES = ["image/jpeg", "image/png", "image/webp", "image/heic", "image/heif", "image/avif"]

router = APIRouter(tags=["web"])


def mount_static(app: FastAPI) -> None:
    app.mount("/static", GZipMiddleware(StaticFiles(directory=STATIC_DIR)), name="static")


@router.get("/", include_in_schema=False)
def page(
    request: Request, settings: Settings = Depends(get_settings), service: VPRService = Depends(get_service)
) -> Response:
    """The page for browsers; for a client that asks for JSON, a first-run guide to the API."""
    if _wants_json(request.headers.get("accept", "")):
        return JSONResponse(first_run_guide(service))
    headers = {
        "Content-Security-Policy": content_security_policy(settings.tile_url),
        "Cache-Control": "no-cache",
    }
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers=headers)


def _wants_json(accept: str) -> bool:
    return "application/json" in accept and "text/html" not in accept


def first_run_guide(service: VPRService) -> dict:
    """The state of the service and the calls that set it up."""
    problem = service.readiness()
    return {
        "service": "selavpr: visual place recognition (SelaVPR)",
        "ready": problem is None,
        "status": problem or "ready",
        "next_steps": [
            "POST /index/images with `image` files (and `lat`/`lon` per image) adds reference photos",
            "POST /index/rebuild indexes them (GET /index/status shows progress)",
            "POST /localize with an `image` file finds the same place among the references",
        ],
        "page": "/ (in a browser)",
        "docs": "/docs",
    }


@router.get("/ui/config", response_model=UiConfig)
def ui_config(settings: Settings = Depends(get_settings)) -> dict:
    """What the page checks before sending anything: limits, accepted types, keys needed, map tiles."""
    tiles = (
        {"url": settings.tile_url, "attribution": settings.tile_attribution} if settings.tile_url else None
    )
    return {
        "max_upload_bytes": settings.max_upload_bytes,
        "max_images_per_request": settings.max_images_per_request,
        "default_top_k": settings.default_top_k,
        "max_top_k": settings.max_top_k,
        "accepted_types": ACCEPTED_TYPES,
        "accepted_suffixes": sorted(SUFFIX_BY_FORMAT.values()),
        "admin_key_required": bool(settings.api_key),
        "localize_key_required": bool(settings.localize_api_key),
        "tiles": tiles,
    }


def content_security_policy(tile_url: str | None) -> str:
    """Everything from this origin; images also from the tile server when one is set."""
    images = ["'self'", "blob:", "data:"]
    if tile_url:
        parts = urlsplit(tile_url)
        host = parts.netloc.replace("{s}", "*")
        images.append(f"{parts.scheme}://{host}" if "{" not in host else f"{parts.scheme}:")
    return "; ".join(
        [
            "default-src 'self'",
            f"img-src {' '.join(images)}",
            "style-src 'self' 'unsafe-inline'",  # Leaflet positions its panes with inline styles
            "object-src 'none'",
            "base-uri 'none'",
            "frame-ancestors 'none'",
        ]
    )
