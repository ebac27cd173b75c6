"""The Ray Serve application of `serve --engine ray`:

    ingress (the FastAPI app of app/main.py)  --encode-->  encoder (batched model forward)
                                              --top/counts-->  shard-00 ... shard-NN (one per location shard)
                                              --request/state-->  rebuilder (POST /index/rebuild's builds)

Each location shard is its own deployment (`shard-00`, ...): Serve balances a deployment's requests over
interchangeable replicas, and a shard's requests must reach a replica holding that shard. Every
deployment is given the index version it serves when deployed; answers carry it, so that a reply from
another version is never mixed in.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch
from ray import serve

from app.main import create_app
from app.ray_engine.placement import REBUILDER, RayEngineConfig, shard_device
from app.ray_engine.rebuilds import Rebuilder
from app.ray_engine.remote_search import ShardReply
from app.ray_engine.service import RayVPRService
from app.service import served_extractor
from app.settings import Settings
from index_builder.search import check_compatible, hold_maps_resident
from index_builder.shard_search import ShardSearcher
from index_builder.sharding import shard_key
from index_builder.store import IndexVersion, current_version_name
from index_builder.store.versions import NO_INDEX_HINT
from model.matching.compact import CompactQuery, check_precision
from model.matching.precision import Precision

log = logging.getLogger(__name__)
KEEP_VERSIONS = 2  # a shard keeps the previous version open for the queries still using it
# Queries from several ingress replicas arrive one by one: wait this long to batch them together.
ENCODER_MIN_WAIT_S = 0.005
NO_MAPS = np.zeros(0, dtype=np.int64)  # a reader of a version's identity only (IndexVersion only_ids)

__all__ = ["RayEngineConfig", "application_builder", "build_application"]


@serve.deployment
class Encoder:
    """The model forward of /localize, batched over concurrent queries (from every ingress replica)."""

    def __init__(self, settings: Settings, version: str) -> None:
        self.extractor = served_extractor(settings)
        index = IndexVersion(settings.index_dir, version, load_global=False, only_ids=NO_MAPS)
        check_compatible(index, self.extractor)  # refuse to start rather than answer wrongly
        index.close()
        # Batched per replica (not with a class decorator): the batch size is the service's setting, and
        # the queue belongs to this replica alone.
        self._batched = serve.batch(
            max_batch_size=settings.max_batch_size,
            batch_wait_timeout_s=max(settings.max_batch_wait_ms / 1e3, ENCODER_MIN_WAIT_S),
        )(self._forward)

    async def encode(self, tensor: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One preprocessed query (3, H, W) -> (global (D,), local (h, w, C))."""
        return await self._batched(tensor)

    async def _forward(self, tensors: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        global_desc, local = self.extractor.extract_tensors(torch.from_numpy(np.stack(tensors)))
        global_desc, local = global_desc.cpu().numpy(), local.cpu().numpy()
        return [(global_desc[i], local[i]) for i in range(len(tensors))]


@serve.deployment
class ShardServer:
    """One location shard: its exact global top-N, and the MNN counts of its own candidates, for the
    version each call names. The last KEEP_VERSIONS versions stay open, so that when a new one is
    published, queries already under way on the previous one still finish; a version not yet open is
    opened on its first call."""

    def __init__(
        self,
        index_dir: str,
        version: str,
        position: int,
        precision: str | None,
        device: str = "cpu",
        resident_max_bytes: int = 0,
    ) -> None:
        """device "cuda" (a replica given a GPU, --shard-num-gpus): its maps are held in the GPU's memory
        when they take at most resident_max_bytes, and counted there, with the single-process server's
        code (search.hold_maps_resident)."""
        del precision  # the router picks the precision of each counting call (shard_search.rerank_counts)
        self.index_dir, self.position = Path(index_dir), position
        self.device, self.resident_max_bytes = _shard_device(device), resident_max_bytes
        self.searchers: dict[str, ShardSearcher] = {}
        self._opening = threading.Lock()
        self.load(version)

    def load(self, version: str) -> list[str]:
        """Open a version's part of this shard (if not open yet); returns the versions open."""
        with self._opening:
            if version not in self.searchers:
                started = time.perf_counter()
                searcher = ShardSearcher.open_alone(self.index_dir, version, self.position)
                held = hold_maps_resident(
                    searcher.version, self.device, self.resident_max_bytes, searcher.ids
                )
                self.searchers[version] = searcher
                log.info(
                    "%s opened %s in %.1f s (%d references, maps %s)",
                    shard_key(self.position),
                    version,
                    time.perf_counter() - started,
                    len(searcher),
                    f"resident on {self.device}" if held else "read per query",
                )
                for old in list(self.searchers)[:-KEEP_VERSIONS]:
                    del self.searchers[old]  # closed when the last query holding it ends
            return list(self.searchers)

    def _searcher(self, version: str) -> ShardSearcher:
        searcher = self.searchers.get(version)
        if searcher is None:
            self.load(version)
            searcher = self.searchers[version]
        return searcher

    def top(self, global_desc: np.ndarray, k: int, version: str) -> ShardReply:
        tops = self._searcher(version).top(global_desc, k)
        return ShardReply(version, [(c.scores, c.ids) for c in tops])

    def counts(self, query: CompactQuery, ids: np.ndarray, mode: str, version: str) -> ShardReply:
        """MNN counts of these candidates against the query map, sent in the precision counted in."""
        precision = Precision(mode)
        check_precision(query, precision)
        counts = self._searcher(version).counts(query.tensor(self.device), ids.tolist(), precision)
        return ShardReply(version, counts.numpy())

    def ping(self) -> int:
        """Alive: this replica's process id (tests kill it by that id)."""
        return os.getpid()


@serve.deployment
@serve.ingress()
class Ingress:
    """The HTTP API: the FastAPI app of the single-process service over RayVPRService."""

    def __init__(
        self,
        settings: Settings,
        version: str,
        encoder,
        shards: list,
        rebuilder=None,
        shard_device: str = "cpu",
    ) -> None:
        self.settings, self.version, self.encoder, self.shards = settings, version, encoder, shards
        self.rebuilder, self.shard_device = rebuilder, shard_device

    def __serve_build_asgi_app__(self):
        def service(s: Settings, m) -> RayVPRService:
            return RayVPRService(
                s, m, self.version, self.encoder, self.shards, self.rebuilder, self.shard_device
            )

        return create_app(self.settings, service)


def _shard_device(device: str) -> torch.device:
    """The replica's device; a GPU asked for and not visible is an error (the deployment fails to start
    and `serve` says why), not a silent CPU."""
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("this shard replica was given a GPU (--shard-num-gpus) but sees none")
    return resolved


def published_version(index_dir: Path) -> tuple[str, int]:
    """The published version's name and its number of location shards (an unsharded index: one)."""
    name = current_version_name(index_dir)
    if name is None:
        raise ValueError(f"no published index in {index_dir} ({NO_INDEX_HINT}); --engine ray serves one")
    version = IndexVersion(index_dir, name, load_global=False, only_ids=NO_MAPS)
    try:
        return name, max(1, len(version.manifest.location_shards))
    finally:
        version.close()


def build_application(settings: Settings, engine: RayEngineConfig | None = None):
    """The bound application for the published version of settings.index_dir (replica_num_cpus None:
    1, as on a cluster joined; `serve` decides it for a cluster it starts, app/ray_engine/launch.py)."""
    engine = engine or RayEngineConfig()
    version, shard_count = published_version(settings.index_dir)
    cpus = {"num_cpus": 1.0 if engine.replica_num_cpus is None else engine.replica_num_cpus}
    encoder = Encoder.options(
        name="encoder",
        num_replicas=engine.encoder_replicas,
        ray_actor_options={**cpus, "num_gpus": engine.encoder_num_gpus},
    ).bind(settings, version)
    device = shard_device(engine)
    shards = [
        ShardServer.options(
            name=shard_key(k),
            num_replicas=engine.shard_replicas,
            ray_actor_options={**cpus, "num_gpus": engine.shard_num_gpus},
        ).bind(str(settings.index_dir), version, k, settings.precision, device, settings.resident_maps_bytes)
        for k in range(shard_count)
    ]
    rebuilder = Rebuilder.options(name=REBUILDER, num_replicas=1, ray_actor_options=cpus).bind(settings)
    return Ingress.options(name="ingress", num_replicas=engine.ingress_replicas, ray_actor_options=cpus).bind(
        settings, version, encoder, shards, rebuilder, device
    )


def application_builder(args: dict) -> object:
    """For Serve config files and KubeRay (`import_path: app.ray_engine.deployments:application_builder`):
    `args` holds Settings fields (index_dir, checkpoint, device, api_key, ...; SELAVPR_* variables fill in
    the rest) and, under `engine`, RayEngineConfig fields."""
    args = dict(args)
    engine = RayEngineConfig(**args.pop("engine", {}))
    return build_application(Settings(**args), engine)
