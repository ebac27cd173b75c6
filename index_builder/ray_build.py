"""`selavpr index build --engine ray`: the build's encoding stage on a Ray Data actor pool.

The scan, plan and publish stages (and the segment files the encode stage writes) are the single-process
builder's (`index_builder.builder.build_index`, given this module's `RayDataEncoder`); this module only
runs the planned batches through `ray.data.from_items(...).map_batches(BatchEncoder, concurrency=N)`.
Each dataset row is one planned model batch, so every actor runs exactly the forward passes the
single-process build runs (`index_builder.encoding.encode_decoded`), which makes the stored features
bit-identical. Ray is imported only here, and only when a Ray build is asked for (it is an optional extra).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from index_builder.builder import encoding_identity
from index_builder.encoding import EncodedBatch, decode_reference, encode_decoded
from index_builder.manifest import EncodingIdentity
from index_builder.sources import ReferenceImage
from model.extractor import FeatureExtractor
from model.options import ModelOptions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayBuildOptions:
    address: str | None = None  # a running cluster ("auto", "host:6379"); None: start a local one
    actors: int = 1  # encoder actors in the pool
    actor_cpus: float = 1.0  # CPUs each actor reserves
    # torch threads per actor; None: as many as this process uses. The thread count an MKL process
    # starts with changes the last bits of the features (measured: 1 vs 2 threads differ by up to 3e-8),
    # so a Ray build equals a single-process build bit for bit only when their counts agree.
    actor_threads: int | None = None
    actor_gpus: float = 0.0  # GPUs each actor reserves; 0: encode on CPU
    num_cpus: int | None = None  # CPUs of a local cluster started here; None: the machine's
    object_store_bytes: int = 256 * 2**20


class BatchEncoder:
    """A Ray Data actor: loads the model once, then encodes one planned batch per row. It refuses to
    run when its model's encoding identity differs from the driver's (another checkpoint file, dtype...),
    since its features would then not belong in this index."""

    def __init__(self, spec: ModelOptions, identity: dict[str, Any], threads: int) -> None:
        import torch

        # before the model's first forward: Ray starts workers with OMP_NUM_THREADS=<num_cpus>
        torch.set_num_threads(max(1, threads))
        self.local_dtype = identity["local_dtype"]
        self.extractor = FeatureExtractor.from_options(spec)
        mine = encoding_identity(self.extractor, self.local_dtype).to_dict()
        if mine != identity:
            raise RuntimeError(f"the encoder actor's model differs from the build's: {mine} != {identity}")

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        payloads = []
        for items in rows["items"]:
            batch = [ReferenceImage(rel, Path(path), 0, 0) for rel, path in json.loads(items)]
            prep = self.extractor.preprocessing
            encoded = encode_decoded(
                self.extractor, self.local_dtype, batch, [decode_reference(i, prep) for i in batch]
            )
            payloads.append(_pack(encoded))
        return {"batch": rows["batch"], "payload": np.array(payloads, dtype=object)}


def _pack(encoded: EncodedBatch) -> bytes:
    """An encoded batch as bytes (npz: lossless), to cross the object store as one binary value."""
    meta = {
        "images": [image.rel_path for image in encoded.images],
        "metas": encoded.metas,
        "skipped": encoded.skipped,
    }
    buffer = io.BytesIO()
    np.savez(buffer, meta=np.array(json.dumps(meta)), global_desc=encoded.global_desc, **encoded.local)
    return buffer.getvalue()


def _unpack(payload: bytes, batch: Sequence[ReferenceImage]) -> EncodedBatch:
    with np.load(io.BytesIO(payload)) as arrays:
        meta = json.loads(str(arrays["meta"]))
        by_path = {image.rel_path: image for image in batch}
        local = {key: arrays[key] for key in arrays.files if key not in ("meta", "global_desc")}
        return EncodedBatch(
            images=[by_path[path] for path in meta["images"]],
            metas=[(w, h, exif) for w, h, exif in meta["metas"]],
            global_desc=arrays["global_desc"],
            local=local,
            skipped=[(path, reason) for path, reason in meta["skipped"]],
        )


class RayDataEncoder:
    """The `Encoder` (index_builder.encoding) that runs on Ray Data; use inside `ray_session`."""

    def __init__(self, spec: ModelOptions, identity: EncodingIdentity, options: RayBuildOptions) -> None:
        """`spec`: the driver's model on the actors' device ("cpu", or "cuda" when they hold a GPU)."""
        self.spec, self.identity, self.options = spec, identity, options

    def default_batch_size(self) -> int:
        return 64 if self.options.actor_gpus > 0 else 16

    def encode(self, batches: Sequence[Sequence[ReferenceImage]]) -> Iterator[EncodedBatch]:
        import ray.data
        import torch

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # the build reports its own progress
        items = [
            {"batch": k, "items": json.dumps([[i.rel_path, str(i.abs_path)] for i in batch])}
            for k, batch in enumerate(batches)
        ]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
            BatchEncoder,
            fn_constructor_kwargs={
                "spec": self.spec,
                "identity": self.identity.to_dict(),
                "threads": self.options.actor_threads or torch.get_num_threads(),
            },
            batch_size=1,  # one planned model batch per call: see the module's docstring
            concurrency=self.options.actors,
            num_cpus=self.options.actor_cpus,
            num_gpus=self.options.actor_gpus,
            batch_format="numpy",
        )
        # Rows may come back in any order; the segment files are written in plan order, as the
        # single-process build writes them, so finished batches wait here for those before them.
        waiting: dict[int, bytes] = {}
        following = 0
        for row in dataset.iter_rows():
            waiting[int(row["batch"])] = row["payload"]
            while following in waiting:
                yield _unpack(waiting.pop(following), batches[following])
                following += 1
        if following != len(batches):
            raise RuntimeError(f"Ray Data returned {following} of {len(batches)} batches")


@contextmanager
def ray_session(options: RayBuildOptions) -> Iterator[None]:
    """Connect to options.address, or start a local cluster for this build (stopped after it). A local
    cluster binds to loopback, has no dashboard and reports no usage statistics unless
    RAY_USAGE_STATS_ENABLED says otherwise."""
    import ray

    if options.address:
        ray.init(address=options.address, logging_level=logging.WARNING)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(
            num_cpus=options.num_cpus,
            include_dashboard=False,
            object_store_memory=options.object_store_bytes,
            logging_level=logging.WARNING,
            _node_ip_address="127.0.0.1",
        )
    try:
        yield
    finally:
        ray.shutdown()
