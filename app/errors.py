"""Every error becomes a JSON body {"error": {"status", "type", "message"}} with the right status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from model.errors import CheckpointError, ImageDecodeError, SelavprError

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, type_: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.message, self.headers = status, type_, message, headers


class ServiceUnavailable(ApiError):
    def __init__(self, message: str, retry_after_s: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
        super().__init__(503, "unavailable", message, headers)


IMAGE_ERRORS = {
    ImageDecodeError.EMPTY: (400, "empty_image"),
    ImageDecodeError.CORRUPT: (400, "corrupt_image"),
    ImageDecodeError.UNRECOGNISED: (415, "unsupported_media_type"),
    ImageDecodeError.TOO_MANY_PIXELS: (413, "image_too_large"),
    ImageDecodeError.MISSING: (400, "missing_image"),
}


def error_response(
    status: int,
    type_: str,
    message: str,
    details: list | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"status": status, "type": type_, "message": message}
    if details is not None:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI, count_error) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        count_error(exc.type)
        return error_response(exc.status, exc.type, exc.message, headers=exc.headers)

    @app.exception_handler(ImageDecodeError)
    async def image_error(request: Request, exc: ImageDecodeError) -> JSONResponse:
        status, type_ = IMAGE_ERRORS.get(exc.kind, (400, "bad_image"))
        count_error(type_)
        return error_response(status, type_, str(exc))

    @app.exception_handler(SelavprError)
    async def domain_error(request: Request, exc: SelavprError) -> JSONResponse:
        status = 503 if isinstance(exc, CheckpointError) else 400
        count_error(type(exc).__name__)
        return error_response(status, type(exc).__name__, str(exc))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        count_error("validation")
        details = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
        return error_response(422, "validation_error", summary or "invalid request", details)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        count_error(f"http_{exc.status_code}")
        return error_response(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        count_error("internal")
        return error_response(500, "internal_error", "internal error; see the server log")
