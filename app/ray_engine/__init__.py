"""`selavpr serve --engine ray`: the same HTTP API served by Ray Serve deployments (an ingress, a batched
encoder, one deployment per location shard). Ray is an optional extra: besides this package only
index_builder/ray_build.py (`index build --engine ray`) imports it, and the modules that do are imported
only when the engine is asked for."""

from __future__ import annotations

RAY_PIN = "ray[serve,data]==2.60.0"
INSTALL_HINT = f"""install the Ray extra: pip install -e ".[ray]" (or pip install "{RAY_PIN}")"""


def require_ray() -> None:
    """ImportError-free check with a message that says how to install Ray."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        raise RuntimeError(f"--engine ray needs Ray Serve, which is not installed; {INSTALL_HINT}") from None


def require_ray_data() -> None:
    """As `require_ray`, for `selavpr index build --engine ray` (Ray Data needs pyarrow besides Ray)."""
    try:
        import pyarrow  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        raise RuntimeError(f"--engine ray needs Ray Data, which is not installed; {INSTALL_HINT}") from None
