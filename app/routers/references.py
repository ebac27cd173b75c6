"""/index/references: browse the served index's images, and fetch them resized, by id."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from app.dependencies import get_service, get_settings
from app.errors import ApiError, ServiceUnavailable
from app.reference_images import Rendition, list_page, record_of, render, rendition_etag
from app.schemas import ErrorResponse, ReferencePage
from app.service import VPRService
from app.settings import Settings
from index_builder.store import IndexVersion

router = APIRouter(prefix="/index/references", tags=["index"])
ERRORS = {code: {"model": ErrorResponse} for code in (404, 422, 503)}
MAX_PAGE = 200
# with ?v=<served version> the URL names one image for good; without, the id may mean another image later
CACHE_VERSIONED = "public, max-age=86400, immutable"
CACHE_UNVERSIONED = "no-cache"


def served_version(service: VPRService) -> IndexVersion:
    if service.localizer is None:
        raise ServiceUnavailable(service.readiness() or "no index")
    return service.localizer.index


@router.get("", response_model=ReferencePage, responses=ERRORS)
def references(
    offset: int = Query(0, ge=0),
    limit: int = Query(50, ge=1, le=MAX_PAGE),
    service: VPRService = Depends(get_service),
) -> dict:
    """The served version's images in id order, a page at a time."""
    return list_page(served_version(service), offset, limit)


@router.get(
    "/{reference_id}/{rendition}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
)
async def reference_image(
    request: Request,
    reference_id: int,
    rendition: Rendition,
    v: str | None = Query(None, description="the index version the id comes from; enables long caching"),
    service: VPRService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> Response:
    """`thumbnail` (320 px) or `image` (1280 px) JPEG, resized on the server, with an ETag."""
    version = served_version(service)
    if v is not None and v != version.name:
        raise ApiError(404, "not_found", f"index {v} is no longer served (now {version.name}); list again")
    record = await run_in_threadpool(record_of, version, reference_id)
    headers = {
        "ETag": rendition_etag(record, rendition),
        "Cache-Control": CACHE_VERSIONED if v else CACHE_UNVERSIONED,
    }
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    rendered = await run_in_threadpool(
        render, settings.references, record, rendition, version.identity.exif_transpose
    )
    return Response(rendered.jpeg, media_type="image/jpeg", headers=headers)
