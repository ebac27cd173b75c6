"""Where the replicas of `serve --engine ray` fit, and what to say when they do not.

A replica reserves CPUs (and GPUs) from the cluster; Serve waits forever for a replica that no node can
take, logging every 30 s. So a local cluster started by `serve` shares its CPUs among the replicas
(`fit_cpus_per_replica`), a request that exceeds what the cluster has is refused before deploying
(`placement_problem`), and a deployment that is not running within a deadline ends the command with
one message (`wait_until_running`). Nothing here imports ray: the cluster is passed in as numbers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

# Ray counts resources in units of 1/10,000: shares rounded down to them never add up to more than the
# cluster has.
RESOURCE_UNIT = 1e-4
FIX_HINT = (
    "fix: leave --replica-num-cpus out on a cluster started by serve (its CPUs are then shared among the "
    "replicas), ask for less (--replica-num-cpus 0.25, fewer --shard-replicas, --encoder-num-gpus 0), "
    "or add nodes to the cluster"
)


class PlacementError(ValueError):
    """The deployments cannot be placed on the cluster (one line: asked, available, the fix)."""


@dataclass(frozen=True)
class RayEngineConfig:
    """How the deployments are placed (the cluster decides where)."""

    shard_replicas: int = 1
    encoder_replicas: int = 1
    ingress_replicas: int = 1
    # CPUs each replica reserves. None: an equal share of a cluster started by `serve` (at most 1),
    # 1 on a cluster joined (explicit requests are kept as given).
    replica_num_cpus: float | None = None
    encoder_num_gpus: float = 0.0
    shard_num_gpus: float = 0.0  # a shard replica given a GPU keeps its maps there and re-ranks there


def shard_device(engine: RayEngineConfig) -> str:
    """Where shard replicas count: on the GPU they are given, else on their CPUs."""
    return "cuda" if engine.shard_num_gpus > 0 else "cpu"


REBUILDER = "rebuilder"  # one replica: it runs POST /index/rebuild's builds, one at a time


def replica_count(engine: RayEngineConfig, shard_count: int) -> int:
    """Replicas of the application: ingress, encoder, the rebuilder and every shard's."""
    return engine.ingress_replicas + engine.encoder_replicas + 1 + shard_count * engine.shard_replicas


def with_cpus_fitted(
    engine: RayEngineConfig, cluster_cpus: float | None, shard_count: int
) -> RayEngineConfig:
    """The engine with replica_num_cpus decided: kept when given; an equal share of cluster_cpus (a
    cluster started here) when not; else 1."""
    if engine.replica_num_cpus is not None:
        return engine
    if cluster_cpus is None:
        return replace(engine, replica_num_cpus=1.0)
    return replace(
        engine, replica_num_cpus=fit_cpus_per_replica(cluster_cpus, replica_count(engine, shard_count))
    )


@dataclass(frozen=True)
class DeploymentAsk:
    """What one deployment reserves: `replicas` replicas of `num_cpus` and `num_gpus` each."""

    name: str
    replicas: int
    num_cpus: float
    num_gpus: float = 0.0

    def describe(self) -> str:
        gpus = f" + {self.num_gpus:g} GPU" if self.num_gpus else ""
        return f"{self.name} {self.replicas} x {self.num_cpus:g} CPU{gpus}"


def fit_cpus_per_replica(cluster_cpus: float, replicas: int) -> float:
    """An equal share of the cluster's CPUs per replica, at most one, rounded down to Ray's unit."""
    if replicas <= 0:
        return 1.0
    share = min(1.0, cluster_cpus / replicas)
    return math.floor(share / RESOURCE_UNIT) * RESOURCE_UNIT


def deployment_asks(engine: RayEngineConfig, shard_keys: Sequence[str]) -> list[DeploymentAsk]:
    """What each deployment of the application reserves (replica_num_cpus must be decided)."""
    cpus = engine.replica_num_cpus if engine.replica_num_cpus is not None else 1.0
    return [
        DeploymentAsk("ingress", engine.ingress_replicas, cpus),
        DeploymentAsk("encoder", engine.encoder_replicas, cpus, engine.encoder_num_gpus),
        DeploymentAsk(REBUILDER, 1, cpus),
        *(DeploymentAsk(key, engine.shard_replicas, cpus, engine.shard_num_gpus) for key in shard_keys),
    ]


def total_asked(asks: Sequence[DeploymentAsk]) -> tuple[float, float]:
    """(CPUs, GPUs) the deployments reserve in all."""
    cpus = sum(a.replicas * a.num_cpus for a in asks)
    gpus = sum(a.replicas * a.num_gpus for a in asks)
    return cpus, gpus


def describe_asks(asks: Sequence[DeploymentAsk]) -> str:
    cpus, gpus = total_asked(asks)
    return f"{cpus:g} CPUs and {gpus:g} GPUs ({', '.join(a.describe() for a in asks)})"


def describe_cluster(resources: dict[str, float]) -> str:
    return f"{resources.get('CPU', 0.0):g} CPUs and {resources.get('GPU', 0.0):g} GPUs"


def placement_problem(asks: Sequence[DeploymentAsk], cluster: dict[str, float]) -> str | None:
    """None when the cluster's total resources cover the request; else the one-line message. (Totals
    only: a cluster with enough in all may still lack a node big enough for one replica; the deadline
    of `wait_until_running` catches that.)"""
    cpus, gpus = total_asked(asks)
    slack = RESOURCE_UNIT / 2
    if cpus <= cluster.get("CPU", 0.0) + slack and gpus <= cluster.get("GPU", 0.0) + slack:
        return None
    return f"cannot place the deployments: they ask for {describe_asks(asks)}; the cluster has " + (
        f"{describe_cluster(cluster)}; {FIX_HINT}"
    )


# app name -> (status, message) as Serve reports it: RUNNING, DEPLOYING, DEPLOY_FAILED, ...
StatusFn = Callable[[], tuple[str, str]]


def wait_until_running(
    status: StatusFn,
    asks: Sequence[DeploymentAsk],
    cluster: Callable[[], dict[str, float]],
    timeout_s: float,
    poll_s: float = 0.5,
    clock: Callable[[], float] = time.monotonic,
    wait: Callable[[float], bool] = lambda s: bool(time.sleep(s)),
) -> bool:
    """True once the application runs, False when `wait` (a sleep) says to stop waiting (a signal);
    PlacementError when it failed to deploy, or when it is still not running after timeout_s (what was
    asked, what the cluster has, the fix)."""
    deadline = clock() + timeout_s
    while True:
        state, message = status()
        if state == "RUNNING":
            return True
        if state == "DEPLOY_FAILED":
            raise PlacementError(f"the deployments failed to start: {_last_line(message)}")
        if clock() >= deadline:
            raise PlacementError(
                f"the deployments were not running after {timeout_s:g} s ({state}): they ask for "
                f"{describe_asks(asks)}; the cluster has {describe_cluster(cluster())}; {FIX_HINT} "
                "(or a longer --ready-timeout-s when replicas are only slow to load)"
            )
        if wait(poll_s):
            return False


def _last_line(text: str) -> str:
    """The last line of Serve's message: a traceback's ends with the exception."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given (see the Ray logs)"
