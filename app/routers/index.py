"""/index: rebuild, status, rollback, and uploading reference images."""

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
from index_builder.calibration import described
from index_builder.errors import BuildInProgress, IndexStoreError
from index_builder.geo import UTM_MAX_LAT, UTM_MIN_LAT
from index_builder.rollback import rollback
from index_builder.store.space import DiskFull, check_room, free_bytes, is_disk_full, storage_problem

# Room kept beyond an upload's bytes: its locations.csv row, the file system's blocks.
UPLOAD_MARGIN_BYTES = 64 * 1024

router = APIRouter(prefix="/index", tags=["index"])
ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 413, 415, 422, 501, 503, 507)}


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
        "verification": _verification(service),
        "calibration": described(localizer.index.calibration, localizer.index.calibration_note)
        if localizer
        else None,
    }


def _verification(service: VPRService) -> dict | None:
    result = service.verification()
    if result is None:
        return None
    checked_at = service.verifier.last_finished if service.verifier else None
    return result.to_dict() | {"checked_at": checked_at}


@router.post("/rollback", responses=ERRORS, dependencies=[Depends(require_admin_key)])
async def roll_back(service: VPRService = Depends(get_service)) -> dict:
    """Serve the newest earlier version whose files all verify (409 when there is none)."""
    try:
        done = await run_in_threadpool(rollback, service.settings.index_dir)
    except BuildInProgress:
        raise ApiError(409, "conflict", "a build is running; roll back when it has finished") from None
    except IndexStoreError:
        raise ApiError(409, "conflict", "no intact earlier version to roll back to") from None
    await run_in_threadpool(service.reload_index)
    return {"previous": done.previous, "current": done.current, "rejected": list(done.rejected)}


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
    stored = await run_in_threadpool(_store, settings, batch, service)  # all or nothing
    # in the pool: the Ray engine's rebuilder answers over a blocking call
    return {"stored": stored, "rebuild": await run_in_threadpool(_job, service) if rebuild else None}


def _store(settings: Settings, batch: list, service: VPRService) -> list[dict]:
    """write_references, refused (507, nothing written) when the disk cannot hold the batch; a disk
    that fills while writing leaves nothing either (write_references removes what it wrote)."""
    needed = sum(len(item[0]) for item in batch) + UPLOAD_MARGIN_BYTES
    try:
        check_room(settings.references, needed)
        return write_references(settings.references, batch)
    except (DiskFull, OSError) as exc:
        if not is_disk_full(exc):
            if storage_problem(exc):  # read-only, no permission
                raise ApiError(503, "unavailable", "the references folder is not writable") from None
            raise
        service.metrics.disk_full.labels("upload").inc()
        free = exc.free_bytes if isinstance(exc, DiskFull) else free_bytes(settings.references)
        raise ApiError(507, "insufficient_storage", str(DiskFull(free, needed))) from None


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
