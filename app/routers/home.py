"""GET /: what this server is and how to start using it."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.dependencies import get_service
from app.service import VPRService

router = APIRouter(tags=["home"])


@router.get("/")
def home(service: VPRService = Depends(get_service)) -> dict:
    """A first-run guide: the state of the service and the calls that set it up."""
    return {
        "service": "selavpr: visual place recognition (SelaVPR)",
        "ready": service.readiness() is None,
        "status": service.readiness() or "ready",
        "next_steps": [
            "POST /index/images with `image` files (and `lat`/`lon` per image) adds reference photos",
            "POST /index/rebuild indexes them (GET /index/status shows progress)",
            "POST /localize with an `image` file finds the same place among the references",
        ],
        "docs": "/docs",
        "readme": "README.md of the selavpr source: Quick start, HTTP API",
    }
