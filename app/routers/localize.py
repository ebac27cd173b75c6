"""POST /localize and /localize/batch: photos in, matching reference images and a location out."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.answering import answered_in_time
from app.dependencies import (
    get_service,
    get_settings,
    require_localize_key,
    resolve_k,
    resolve_min_probability,
    resolve_prior,
    resolve_strict,
)
from app.errors import ApiError, ServiceUnavailable
from app.schemas import BatchResponse, ErrorResponse
from app.service import VPRService
from app.settings import Settings
from app.uploads import read_uploads
from index_builder.results import LocalizeResult, apply_min_probability
from index_builder.sharding import LocationPrior

router = APIRouter(tags=["localize"], dependencies=[Depends(require_localize_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}


@dataclass(frozen=True)
class LocalizeFields:
    """The fields both /localize and /localize/batch take besides their images, resolved."""

    top_k: int | None  # as sent: bounded per request by `_ks`, which knows the image count
    rerank_k: int | None
    prior: LocationPrior | None
    strict: bool
    min_probability: float | None


def localize_fields(
    request: Request,
    top_k: int | None = Form(None, description="matches returned (also a query parameter); default 5"),
    rerank_k: int | None = Form(
        None, description="candidates re-ranked per image (also a query parameter); default 100"
    ),
    lat: float | None = Form(None, description="location prior: latitude (with lon and radius_m)"),
    lon: float | None = Form(None, description="location prior: longitude"),
    radius_m: float | None = Form(
        None, description="location prior: only location shards within this many metres are searched"
    ),
    strict: bool | None = Form(
        None, description="answer 503 with Retry-After instead of a partial answer when a shard is missing"
    ),
    min_probability: float | None = Form(
        None,
        description="below this calibrated probability the answer is 'unknown' (no location, matches "
        "still listed); default: the server's setting, off unless set",
    ),
    settings: Settings = Depends(get_settings),
) -> LocalizeFields:
    """Each field from the form or the query string; 422 for one out of range."""
    return LocalizeFields(
        top_k=top_k,
        rerank_k=rerank_k,
        prior=resolve_prior(request, lat, lon, radius_m),
        strict=resolve_strict(request, strict),
        min_probability=resolve_min_probability(request, min_probability, settings.min_probability),
    )


def _ks(request: Request, settings: Settings, fields: LocalizeFields, images: int) -> tuple[int, int]:
    """top_k and rerank_k, bounded; 422 when the request's candidates (rerank_k per image) are over
    max_candidates_per_request, the cost model of one request."""
    k = resolve_k(request, "top_k", fields.top_k, settings.default_top_k, settings.max_top_k)
    rk = resolve_k(request, "rerank_k", fields.rerank_k, settings.default_rerank_k, settings.max_rerank_k)
    if rk * images > settings.max_candidates_per_request:
        raise ApiError(
            422,
            "validation_error",
            f"{images} image(s) x rerank_k {rk} = {rk * images} candidates to re-rank, over the limit of "
            f"{settings.max_candidates_per_request} per request (lower rerank_k or split the batch)",
        )
    return k, rk


@router.post("/localize", response_model=LocalizeResult, responses=ERRORS)
async def localize(
    request: Request,
    image: UploadFile = File(..., description="the query photo"),
    fields: LocalizeFields = Depends(localize_fields),
    service: VPRService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> LocalizeResult:
    k, rk = _ks(request, settings, fields, 1)
    (data,) = await read_uploads([image], settings)

    async def work() -> LocalizeResult:
        query = await run_in_threadpool(service.prepare, data)
        result = await service.localize(query, k, rk, prior=fields.prior)
        return apply_min_probability(
            _complete_or_503(result, fields.strict, settings), fields.min_probability
        )

    return await answered_in_time(request, settings, work())


@router.post("/localize/batch", response_model=BatchResponse, responses=ERRORS)
async def localize_batch(
    request: Request,
    image: list[UploadFile] = File(..., description="several `image` fields; one result each, in order"),
    fields: LocalizeFields = Depends(localize_fields),
    service: VPRService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> BatchResponse:
    k, rk = _ks(request, settings, fields, len(image))
    contents = await read_uploads(image, settings)

    async def work() -> BatchResponse:
        queries = [await run_in_threadpool(service.prepare, data) for data in contents]
        owner = service.new_owner()  # its queries take turns with other requests'
        results = await asyncio.gather(*(service.localize(q, k, rk, owner, fields.prior) for q in queries))
        checked = [_complete_or_503(r, fields.strict, settings) for r in results]
        return BatchResponse(results=[apply_min_probability(r, fields.min_probability) for r in checked])

    return await answered_in_time(request, settings, work())


def _complete_or_503(result: LocalizeResult, strict: bool, settings: Settings) -> LocalizeResult:
    """A partial answer (a location shard missing) as it is, or 503 when the request is strict."""
    if strict and result.partial:
        raise ServiceUnavailable(
            f"location shards {', '.join(result.missing_shards)} did not answer; retry later",
            settings.retry_after_s,
        )
    return result
