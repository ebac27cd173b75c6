"""POST /index/rebuild on `serve --engine ray`: one deployment of one replica runs the builds, so that the
single process's rule holds across ingress replicas (one build at a time; a request while one runs
queues one more run, and further requests join it). It is the single process's RebuildManager and
builder (scan, plan, encode, publish); the ingress rolls the shards to what it publishes
(RayVPRService._follow_published).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from ray import serve

from app.rebuild import RebuildManager, RebuildState
from app.service import served_extractor
from app.settings import Settings
from index_builder.builder import BuildConfig, encoding_identity
from index_builder.ray_build import RayBuildOptions, RayDataEncoder
from model.extractor import FeatureExtractor

log = logging.getLogger(__name__)


@serve.deployment
class Rebuilder:
    """Builds the next version from the references folder (shared with the ingress, like the index
    folder). On one machine it encodes in this replica's process, on the CPU (it reserves no GPU); on a
    cluster with other nodes, on a Ray Data actor pool (index_builder/ray_build.py), with a GPU per
    actor when the cluster has GPUs. Either way the builder is the single process's."""

    def __init__(self, settings: Settings) -> None:
        config = BuildConfig(
            references=settings.references,
            index_dir=settings.index_dir,
            model=settings.model_options(),
            grace_seconds=settings.grace_seconds,
        )
        extractor = served_extractor(settings, "cpu")
        self.manager = RebuildManager(
            config,
            extractor,
            on_published=_log_published,
            make_encoder=lambda: cluster_encoder(extractor, config, _cluster_shape()),
        )

    def request(self) -> tuple[str, str]:
        """(job id, "running" | "queued")."""
        return self.manager.request()

    def state(self) -> RebuildState:
        """A copy of the state now (the build thread goes on changing the manager's)."""
        state = self.manager.status
        progress = dataclasses.replace(state.progress) if state.progress else None
        return dataclasses.replace(state, progress=progress)


def _log_published(report) -> None:
    log.info("rebuild published %s; the ingress rolls the shards to it", report.version)


@dataclass(frozen=True)
class ClusterShape:
    nodes: int  # alive
    gpus: float


def _cluster_shape() -> ClusterShape:
    import ray

    if not ray.is_initialized():  # Serve's local testing mode: no cluster, this process encodes
        return ClusterShape(1, 0.0)
    nodes = sum(1 for node in ray.nodes() if node.get("Alive"))
    return ClusterShape(nodes, ray.cluster_resources().get("GPU", 0.0))


def cluster_encoder(
    extractor: FeatureExtractor, config: BuildConfig, cluster: ClusterShape
) -> RayDataEncoder | None:
    """None (this process encodes) on a one-node cluster: its CPUs are the replicas' already. Else a Ray
    Data actor pool: one actor per GPU when the cluster has GPUs, else one per other node."""
    if cluster.nodes < 2:
        return None
    gpus = int(cluster.gpus)
    actors_model = config.model.on("cuda" if gpus else "cpu")
    options = RayBuildOptions(actors=gpus or cluster.nodes - 1, actor_gpus=1.0 if gpus else 0.0)
    return RayDataEncoder(actors_model, encoding_identity(extractor, config.local_dtype), options)
