"""POST /localize and /localize/batch: photos in, matching reference images and a location out."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from starlette.concurrency import run_in_threadpool

from app.dependencies import (
    get_service,
    get_settings,
    require_localize_key,
    resolve_k,
    resolve_prior,
    resolve_strict,
)
from app.errors import ApiError, ServiceUnavailable
from app.schemas import BatchResponse, ErrorResponse
from app.service import VPRService
from app.settings import Settings
from app.uploads import read_uploads
from index_builder.results import LocalizeResult

router = APIRouter(tags=["localize"], dependencies=[Depends(require_localize_key)])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 503)}
DISCONNECT_POLL_S = 0.25
T = TypeVar("T")


def _ks(
    request: Request, settings: Settings, top_k: int | None, rerank_k: int | None, images: int
) -> tuple[int, int]:
    """top_k and rerank_k, bounded; 422 when the request's candidates (rerank_k per image) are over
    max_candidates_per_request, the cost model of one request."""
    k = resolve_k(request, "top_k", top_k, settings.default_top_k, settings.max_top_k)
    rk = resolve_k(request, "rerank_k", rerank_k, settings.default_rerank_k, settings.max_rerank_k)
    if rk * images > settings.max_candidates_per_request:
        raise ApiError(
            422,
            "validation_error",
            f"{images} image(s) x rerank_k {rk} = {rk * images} candidates to re-rank, over the limit of "
            f"{settings.max_candidates_per_request} per request (lower rerank_k or split the batch)",
        )
    return k, rk


async def _answered(request: Request, settings: Settings, work: Awaitable[T]) -> T:
    """`work`, cancelled (its queued queries dropped) when the client disconnects or the deadline
    (request_timeout_s) passes; 503 then."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait(
            {task, watcher}, timeout=settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    if watcher in done:
        raise ApiError(499, "client_closed_request", "the client disconnected; the work was dropped")
    raise ServiceUnavailable(
        f"not answered within {settings.request_timeout_s:g} s; retry later", settings.retry_after_s
    )


async def _disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


@router.post("/localize", response_model=LocalizeResult, responses=ERRORS)
async def localize(
    request: Request,
    image: UploadFile = File(..., description="the query photo"),
    top_k: int | None = Form(None, description="matches returned (also a query parameter); default 5"),
    rerank_k: int | None = Form(
        None, description="candidates re-ranked (also a query parameter); default 100"
    ),
    lat: float | None = Form(None, description="location prior: latitude (with lon and radius_m)"),
    lon: float | None = Form(None, description="location prior: longitude"),
    radius_m: float | None = Form(
        None, description="location prior: only location shards within this many metres are searched"
    ),
    strict: bool | None = Form(
        None, description="answer 503 with Retry-After instead of a partial answer when a shard is missing"
    ),
    service: VPRService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> LocalizeResult:
    k, rk = _ks(request, settings, top_k, rerank_k, 1)
    prior, strict = resolve_prior(request, lat, lon, radius_m), resolve_strict(request, strict)
    (data,) = await read_uploads([image], settings)

    async def work() -> LocalizeResult:
        query = await run_in_threadpool(service.prepare, data)
        return _complete_or_503(await service.localize(query, k, rk, prior=prior), strict, settings)

    return await _answered(request, settings, work())


@router.post("/localize/batch", response_model=BatchResponse, responses=ERRORS)
async def localize_batch(
    request: Request,
    image: list[UploadFile] = File(..., description="several `image` fields; one result each, in order"),
    top_k: int | None = Form(None),
    rerank_k: int | None = Form(None),
    lat: float | None = Form(None, description="location prior: latitude (with lon and radius_m)"),
    lon: float | None = Form(None, description="location prior: longitude"),
    radius_m: float | None = Form(
        None, description="location prior: only location shards within this many metres are searched"
    ),
    strict: bool | None = Form(
        None, description="answer 503 with Retry-After instead of a partial answer when a shard is missing"
    ),
    service: VPRService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> BatchResponse:
    k, rk = _ks(request, settings, top_k, rerank_k, len(image))
    prior, strict = resolve_prior(request, lat, lon, radius_m), resolve_strict(request, strict)
    contents = await read_uploads(image, settings)

    async def work() -> BatchResponse:
        queries = [await run_in_threadpool(service.prepare, data) for data in contents]
        owner = service.new_owner()  # its queries take turns with other requests'
        results = await asyncio.gather(*(service.localize(q, k, rk, owner, prior) for q in queries))
        return BatchResponse(results=[_complete_or_503(r, strict, settings) for r in results])

    return await _answered(request, settings, work())


def _complete_or_503(result: LocalizeResult, strict: bool, settings: Settings) -> LocalizeResult:
    """A partial answer (a location shard missing) as it is, or 503 when the request is strict."""
    if strict and result.partial:
        raise ServiceUnavailable(
            f"location shards {', '.join(result.missing_shards)} did not answer; retry later",
            settings.retry_after_s,
        )
    return result
