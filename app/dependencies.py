"""FastAPI dependencies: the service state, settings, API keys, and the top_k / rerank_k parameters."""

from __future__ import annotations

import hmac

from fastapi import Header, Request

from app.errors import ApiError
from app.service import VPRService
from app.settings import Settings
from index_builder.sharding import LocationPrior


def get_service(request: Request) -> VPRService:
    return request.app.state.service


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def _check_key(expected: str | None, given: str | None) -> None:
    if expected and not hmac.compare_digest((given or "").encode(), expected.encode()):
        raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")


def require_admin_key(request: Request, x_api_key: str | None = Header(None)) -> None:
    """State-changing /index calls, when SELAVPR_API_KEY is set."""
    _check_key(get_settings(request).api_key, x_api_key)


def require_localize_key(request: Request, x_api_key: str | None = Header(None)) -> None:
    """/localize, only when SELAVPR_LOCALIZE_API_KEY is set."""
    _check_key(get_settings(request).localize_api_key, x_api_key)


def resolve_k(request: Request, name: str, form_value: int | None, default: int, maximum: int) -> int:
    """A query or form field, defaulted and bounded; 422 when out of range or not an integer."""
    value: int | str | None = form_value
    if value is None:
        value = request.query_params.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ApiError(422, "validation_error", f"{name}: {value!r} is not an integer") from None
    if not 1 <= number <= maximum:
        raise ApiError(422, "validation_error", f"{name}: {number} is outside 1..{maximum}")
    return number


def _query_or_form(request: Request, name: str, form_value):
    return form_value if form_value is not None else request.query_params.get(name)


def resolve_prior(
    request: Request, lat: float | None, lon: float | None, radius_m: float | None
) -> LocationPrior | None:
    """The optional location prior (form or query fields lat, lon, radius_m: all three or none); 422
    when incomplete or out of range."""
    given = {
        name: _query_or_form(request, name, value)
        for name, value in (("lat", lat), ("lon", lon), ("radius_m", radius_m))
    }
    present = [name for name, value in given.items() if value is not None]
    if not present:
        return None
    if len(present) < 3:
        missing = ", ".join(name for name in given if name not in present)
        raise ApiError(
            422, "validation_error", f"a location prior needs lat, lon and radius_m; missing {missing}"
        )
    try:
        return LocationPrior(**{name: float(value) for name, value in given.items()})
    except (TypeError, ValueError) as exc:
        raise ApiError(422, "validation_error", str(exc)) from None


def resolve_strict(request: Request, form_value: bool | None) -> bool:
    """`strict` (form or query): a partial answer becomes 503 with Retry-After."""
    value = _query_or_form(request, "strict", form_value)
    if value is None or isinstance(value, bool):
        return bool(value)
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ApiError(422, "validation_error", f"strict: {value!r} is not a boolean")


def resolve_min_probability(
    request: Request, form_value: float | None, default: float | None
) -> float | None:
    """`min_probability` (form or query), else the setting (unset: off); 422 outside [0, 1]."""
    value = _query_or_form(request, "min_probability", form_value)
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ApiError(422, "validation_error", f"min_probability: {value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise ApiError(422, "validation_error", f"min_probability: {number} is outside 0..1")
    return number
