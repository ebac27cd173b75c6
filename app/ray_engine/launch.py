"""Start or join a Ray cluster, deploy the application, serve until interrupted, clean up."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from app.ray_engine.deployments import RayEngineConfig, build_application
from app.settings import Settings

log = logging.getLogger(__name__)
APP_NAME = "selavpr"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = None  # a running cluster ("auto", "ray://host:10001", "host:6379"); None: start one
    num_cpus: int | None = None  # of a cluster started here; None: the machine's
    object_store_bytes: int = 256 * 2**20


def start_or_join(cluster: ClusterConfig, settings: Settings) -> bool:
    """Connect to cluster.address, or start a local cluster. True when started here (and so stopped
    here). A local cluster reports no usage statistics unless RAY_USAGE_STATS_ENABLED says otherwise,
    has no dashboard, and binds to loopback when the service does."""
    import ray

    if cluster.address:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    extra = {"_node_ip_address": "127.0.0.1"} if settings.host in LOOPBACK else {}
    ray.init(
        num_cpus=cluster.num_cpus,
        include_dashboard=False,
        object_store_memory=cluster.object_store_bytes,
        logging_level=logging.WARNING,
        **extra,
    )
    return True


def deploy(settings: Settings, engine: RayEngineConfig) -> None:
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings, engine), name=APP_NAME, route_prefix="/")


def serve_until_stopped(settings: Settings, engine: RayEngineConfig, cluster: ClusterConfig) -> int:
    import ray
    from ray import serve

    started_here = start_or_join(cluster, settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        deploy(settings, engine)
        print(f"selavpr serve --engine ray: listening on http://{settings.host}:{settings.port}", flush=True)
        stop.wait()
    finally:
        try:
            if started_here:
                serve.shutdown()
            else:
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()
    return 0
