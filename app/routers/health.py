"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.dependencies import get_service
from app.errors import error_response
from app.service import VPRService

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict:
    """The process answers."""
    return {"status": "alive"}


@router.get("/readyz")
def readyz(service: VPRService = Depends(get_service)):
    """Model and an index loaded; 503 with the reason otherwise."""
    reason = service.readiness()
    if reason:
        return error_response(503, "not_ready", reason)
    return {"status": "ready", "index_version": service.localizer.index.name}


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
