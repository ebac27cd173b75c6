"""The FAISS index over global descriptors: exact inner product by default, HNSW or IVF-PQ for large
databases (their recall against exact search is measured by `python -m bench.index --parts ann`)."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

KINDS = ("flat", "hnsw", "ivfpq")


@dataclass(frozen=True)
class GlobalIndexConfig:
    kind: str = "flat"
    hnsw_m: int = 32  # graph degree
    hnsw_ef_search: int = 128
    ivf_lists: int = 0  # 0: about 4 * sqrt(N)
    ivf_probe: int = 16
    pq_bytes: int = 0  # 0: one byte per 8 dimensions

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown global index kind {self.kind!r}; expected one of {KINDS}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_global_index(descriptors: np.ndarray, config: GlobalIndexConfig) -> faiss.Index:
    """Unit-norm descriptors (N, D) -> an inner-product index whose row i is descriptor i."""
    n, dim = descriptors.shape
    data = np.ascontiguousarray(descriptors, dtype=np.float32)
    kind = config.kind
    if kind == "ivfpq" and n < 1000:
        log.warning("ivfpq needs training data; %d descriptors are too few, using exact search", n)
        kind = "flat"
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = config.hnsw_ef_search
    elif kind == "ivfpq":
        lists = config.ivf_lists or max(1, min(int(4 * n**0.5), n // 39))
        code = config.pq_bytes or max(1, dim // 8)
        while dim % code:
            code -= 1  # PQ needs sub-vectors of equal length
        index = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, code, 8, faiss.METRIC_INNER_PRODUCT)
        index.train(data)
        index.nprobe = min(config.ivf_probe, lists)
    else:
        index = faiss.IndexFlatIP(dim)
    if n:
        index.add(data)
    return index


def write_global_index(index: faiss.Index, path: Path) -> None:
    faiss.write_index(index, str(path))


def read_global_index(path: Path, config: GlobalIndexConfig) -> faiss.Index:
    index = faiss.read_index(str(path))
    if isinstance(index, faiss.IndexHNSWFlat):  # search-time parameters are not stored
        index.hnsw.efSearch = config.hnsw_ef_search
    elif isinstance(index, faiss.IndexIVFPQ):
        index.nprobe = min(config.ivf_probe, index.nlist)
    return index


def search(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores (Q, k'), ids (Q, k')) with k' = min(k, N). Approximate indexes may return fewer results
    than asked: their missing ids are -1."""
    k = min(k, index.ntotal)
    if k <= 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return scores, ids
