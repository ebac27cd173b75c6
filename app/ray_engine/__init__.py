"""`selavpr serve --engine ray`: the same HTTP API served by Ray Serve deployments (an ingress, a batched
encoder, one deployment per location shard). Ray is an optional extra: nothing outside this package
imports it, and this package's modules that do are imported only when the engine is asked for."""

from __future__ import annotations

RAY_PIN = "ray[serve]==2.60.0"
INSTALL_HINT = f"""install the Ray extra: pip install -e ".[ray]" (or pip install "{RAY_PIN}")"""


def require_ray() -> None:
    """ImportError-free check with a message that says how to install Ray."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise RuntimeError(f"--engine ray needs Ray Serve, which is not installed; {INSTALL_HINT}") from None
