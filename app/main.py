"""The FastAPI application: routers, error handlers, upload limits, request metrics, start-up."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import install_error_handlers
from app.limits import ApiKeyGate, BodySizeLimit, UploadLimits, route_path
from app.metrics import Metrics
from app.routers import health, index, localize, pairs, references, web
from app.service import VPRService
from app.settings import Settings, check_exposure

UPLOAD_OVERHEAD = 64 * 1024  # multipart boundaries and headers around the file itself
ADMIN_ROUTES = frozenset({("POST", "/index/rebuild"), ("POST", "/index/images")})
LOCALIZE_ROUTES = frozenset({("POST", "/localize"), ("POST", "/localize/batch"), ("POST", "/localize/pairs")})


def create_app(
    settings: Settings | None = None,
    service_factory: Callable[[Settings, Metrics], VPRService] = VPRService,
) -> FastAPI:
    """The HTTP API over a service: the single-process one by default, the Ray engine's router with
    `--engine ray` (app/ray_engine), behind the same routers, limits and API keys."""
    settings = settings or Settings()
    check_exposure(settings)
    metrics = Metrics()
    service = service_factory(settings, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="selavpr",
        summary="Visual place recognition (SelaVPR)",
        lifespan=lifespan,
        root_path=settings.root_path,
    )
    app.state.settings, app.state.metrics, app.state.service = settings, metrics, service
    install_error_handlers(app, lambda kind: metrics.errors.labels(kind).inc())
    routers = (localize.router, pairs.router, index.router, references.router, health.router, web.router)
    for router in routers:
        app.include_router(router)
    web.mount_static(app)
    routes = {route.path for router in routers for route in router.routes}

    def upload_limits(path: str) -> UploadLimits | None:
        single = settings.max_upload_bytes + UPLOAD_OVERHEAD
        part, parts = settings.max_upload_bytes, settings.max_parts_per_request
        if path in ("/localize", "/localize/pairs"):
            return UploadLimits(single, part, parts)
        if path in ("/localize/batch", "/index/images"):
            return UploadLimits(single * settings.max_images_per_request, part, parts)
        return None

    def key_for(method: str, path: str) -> str | None:
        if (method, path) in ADMIN_ROUTES:
            return settings.api_key
        if (method, path) in LOCALIZE_ROUTES:
            return settings.localize_api_key
        return None

    app.add_middleware(
        BodySizeLimit, limits_for=upload_limits, on_refused=lambda: metrics.errors.labels("too_large").inc()
    )
    # Added last, so it runs first: a request without its key is answered before anything else.
    app.add_middleware(
        ApiKeyGate, key_for=key_for, on_refused=lambda: metrics.errors.labels("unauthorized").inc()
    )
    app.add_middleware(RequestMetrics, metrics=metrics, known_paths=routes)
    return app


class RequestMetrics:
    """Counts requests by endpoint and status, and times them (unknown paths share one label)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, known_paths: set[str]) -> None:
        self.app, self.metrics, self.known = app, metrics, known_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        endpoint = path if path in self.known else "other"
        status = 500
        start = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)
