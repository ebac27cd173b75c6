"""Start or join a Ray cluster, deploy the application, serve until interrupted, clean up."""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import dataclass

from app.ray_engine.deployments import build_application, published_version
from app.ray_engine.placement import (
    DeploymentAsk,
    PlacementError,
    RayEngineConfig,
    deployment_asks,
    placement_problem,
    wait_until_running,
    with_cpus_fitted,
)
from app.settings import Settings
from index_builder.sharding import shard_key

log = logging.getLogger(__name__)
APP_NAME = "selavpr"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = None  # a running cluster ("auto", "ray://host:10001", "host:6379"); None: start one
    num_cpus: int | None = None  # of a cluster started here; None: the machine's
    object_store_bytes: int = 256 * 2**20
    ready_timeout_s: float = 300.0  # the deployments must be running by then, or the command exits


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


def placed_engine(
    engine: RayEngineConfig, settings: Settings, started_here: bool
) -> tuple[RayEngineConfig, list[DeploymentAsk]]:
    """The engine with its CPU requests decided for this cluster, and what each deployment asks. On a
    cluster started here nothing can join later: a request it cannot hold is refused at once."""
    import ray

    _, shard_count = published_version(settings.index_dir)
    resources = ray.cluster_resources()
    engine = with_cpus_fitted(engine, resources.get("CPU", 0.0) if started_here else None, shard_count)
    asks = deployment_asks(engine, [shard_key(k) for k in range(shard_count)])
    problem = placement_problem(asks, resources) if started_here else None
    if problem:
        raise PlacementError(problem)
    log.info("placing %s", ", ".join(a.describe() for a in asks))
    return engine, asks


def deploy(settings: Settings, engine: RayEngineConfig) -> None:
    """Start the application without waiting for it (wait_until_running does, with a deadline)."""
    from ray import serve

    serve.start(http_options={"host": settings.host, "port": settings.port})
    target = serve.RunTarget(target=build_application(settings, engine), name=APP_NAME, route_prefix="/")
    serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)


def app_status() -> tuple[str, str]:
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    return (str(app.status.value), app.message) if app else ("NOT_STARTED", "")


def wait_for_deployments(asks: list[DeploymentAsk], cluster: ClusterConfig, stop: threading.Event) -> bool:
    import ray

    return wait_until_running(
        app_status, asks, ray.cluster_resources, cluster.ready_timeout_s, wait=stop.wait
    )


def serve_until_stopped(settings: Settings, engine: RayEngineConfig, cluster: ClusterConfig) -> int:
    import ray
    from ray import serve

    started_here = start_or_join(cluster, settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        engine, asks = placed_engine(engine, settings, started_here)
        deploy(settings, engine)
        if wait_for_deployments(asks, cluster, stop):
            url = f"http://{settings.host}:{settings.port}"
            print(f"selavpr serve --engine ray: listening on {url}", flush=True)
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
