"""POST /localize/pairs: the matched positions behind one match, for the page's 'why this match' view."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.answering import answered_in_time
from app.dependencies import get_service, get_settings, require_localize_key
from app.errors import ApiError, ServiceUnavailable
from app.match_pairs import DEFAULT_MAX_PAIRS, MAX_PAIRS_LIMIT
from app.schemas import ErrorResponse, PairsResponse
from app.service import VPRService
from app.settings import Settings
from app.uploads import read_uploads

router = APIRouter(tags=["localize"], dependencies=[Depends(require_localize_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 409, 413, 415, 422, 503)}


@router.post("/localize/pairs", response_model=PairsResponse, responses=ERRORS)
async def pairs(
    request: Request,
    image: UploadFile = File(..., description="the query photo"),
    reference_id: int = Form(..., ge=0, description="a match's id"),
    index_version: str | None = Form(None, description="the version the id comes from; 409 if not served"),
    max_pairs: int = Form(DEFAULT_MAX_PAIRS, ge=1, le=MAX_PAIRS_LIMIT, description="pairs returned at most"),
    service: VPRService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> dict:
    """Mutual nearest-neighbour pairs between the query and one reference, in each image's pixels."""
    localizer = service.localizer
    if localizer is None or service.extractor is None:
        raise ServiceUnavailable(service.readiness() or "no index")
    if index_version is not None and index_version != localizer.index.name:
        raise ApiError(
            409,
            "index_changed",
            f"index {index_version} was replaced by {localizer.index.name}; localize again",
        )
    (data,) = await read_uploads([image], settings)

    async def work() -> dict:
        query = await run_in_threadpool(service.prepare, data)  # within the decode memory budget
        return await service.pairs(query, reference_id, max_pairs)

    return await answered_in_time(request, settings, work())
