"""/index: rebuild, status, and uploading reference images."""

from __future__ import annotations

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from app.dependencies import get_service, get_settings, require_admin_key
from app.errors import ApiError
from app.references import check_reference, display_name, write_references
from app.schemas import ErrorResponse, IndexStatusResponse, RebuildJob, UploadResponse
from app.service import VPRService
from app.settings import Settings
from app.uploads import read_uploads
from index_builder.geo import UTM_MAX_LAT, UTM_MIN_LAT

router = APIRouter(prefix="/index", tags=["index"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 501, 503)}


def _job(service: VPRService) -> dict:
    if service.rebuilds_disabled:
        raise ApiError(501, "not_implemented", service.rebuilds_disabled)
    if service.rebuilds is None:
        raise ApiError(503, "unavailable", "the model is loading")
    job_id, state = service.rebuilds.request()
    return {"job_id": job_id, "state": state}


@router.post(
    "/rebuild",
    status_code=202,
    response_model=RebuildJob,
    responses=ERRORS,
    dependencies=[Depends(require_admin_key)],
)
def rebuild(service: VPRService = Depends(get_service)) -> dict:
    """Start a rebuild from the references folder; a request while one runs queues one more run."""
    return _job(service)


@router.get("/status", response_model=IndexStatusResponse)
def status(service: VPRService = Depends(get_service)) -> dict:
    rebuilds = service.rebuilds.status if service.rebuilds else None
    localizer = service.localizer
    return {
        "state": rebuilds.state if rebuilds else "idle",
        "queued": bool(rebuilds and rebuilds.queued_job_id),
        "progress": rebuilds.progress.to_dict() if rebuilds and rebuilds.progress else None,
        "index_version": localizer.index.name if localizer else None,
        "num_images": len(localizer.index) if localizer else 0,
        "last_report": rebuilds.last_report.summary() if rebuilds and rebuilds.last_report else None,
        "last_error": rebuilds.last_error if rebuilds else service.index_problem,
    }


@router.post(
    "/images",
    status_code=201,
    response_model=UploadResponse,
    responses=ERRORS,
    dependencies=[Depends(require_admin_key)],
)
async def upload_images(
    image: list[UploadFile] = File(
        ..., description="reference photos; stored under server-chosen names, shown under their own"
    ),
    lat: list[float] | None = Form(None, description="one per image, in order, with lon"),
    lon: list[float] | None = Form(None),
    rebuild: bool = Query(False, description="start a rebuild once stored"),
    service: VPRService = Depends(get_service),
    settings: Settings = Depends(get_settings),
) -> dict:
    locations = _locations(lat, lon, len(image))
    payloads = []
    for data in await read_uploads(image, settings):  # everything is checked before anything is written
        payloads.append((data, await run_in_threadpool(check_reference, data, settings.max_pixels)))
    names = [display_name(upload.filename) for upload in image]
    batch = [
        (data, suffix, location, name)
        for (data, suffix), location, name in zip(payloads, locations, names, strict=True)
    ]
    stored = await run_in_threadpool(write_references, settings.references, batch)  # all or nothing
    return {"stored": stored, "rebuild": _job(service) if rebuild else None}


def _locations(
    lat: list[float] | None, lon: list[float] | None, count: int
) -> list[tuple[float, float] | None]:
    if (lat is None) != (lon is None) or (lat is not None and not len(lat) == len(lon) == count):
        raise ApiError(422, "validation_error", "lat and lon: both or neither, one of each per image")
    if lat is None:
        return [None] * count
    for pair in zip(lat, lon, strict=True):
        # UTM (what the index measures distances in) covers 80 S to 84 N; beyond, refuse now rather
        # than drop the location at build time.
        if not (UTM_MIN_LAT <= pair[0] <= UTM_MAX_LAT and -180 <= pair[1] <= 180):
            raise ApiError(
                422,
                "validation_error",
                f"lat/lon {pair} out of range (latitude {UTM_MIN_LAT}..{UTM_MAX_LAT}, UTM's range; "
                "longitude -180..180)",
            )
    return list(zip(lat, lon, strict=True))
