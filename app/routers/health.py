"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.dependencies import get_service
from app.errors import error_response
from app.service import VPRService

router = APIRouter(tags=["health"])


# async: answered on the event loop, never queued behind decodes in the worker-thread pool.
@router.get("/healthz")
async def healthz() -> dict:
    """The process answers."""
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(request: Request):
    """Model and an index loaded; 503 with the reason otherwise. With --engine ray it also lists the
    location shards without a replica (answers then come back partial). "degraded" (200): the
    background verification found the served version's files damaged."""
    service: VPRService = get_service(request)  # called directly: a sync dependency would use the pool
    reason = service.readiness()
    if reason:
        return error_response(503, "not_ready", reason)
    ready = {"status": "ready", "index_version": service.localizer.index.name, **service.readiness_details()}
    verification = service.verification()
    if verification is not None and not verification.ok:
        # Still answering (from the damaged version): 200, so that a lone replica is not taken away.
        ready |= {"status": "degraded", "problems": verification.problems}
    return ready


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
