"""'Why this match': the mutual nearest-neighbour pairs between a query photo and one reference, in the
pixels of each original image, for the web page to draw as lines."""

from __future__ import annotations

import numpy as np
import torch

from app.reference_images import record_of
from index_builder.search import Query
from index_builder.store import IndexVersion
from model.extractor import FeatureExtractor
from model.matching import mnn_pairs
from model.visualize import position_to_pixel

DEFAULT_MAX_PAIRS = 200
MAX_PAIRS_LIMIT = 2000


def match_pairs(
    extractor: FeatureExtractor,
    version: IndexVersion,
    query: Query,
    reference_id: int,
    max_pairs: int,
    precision: str | None = None,
) -> dict:
    """The reference's local map is the stored one, so the count is the one re-ranking saw (up to the
    int8-refined mode, which pairs at float32 like re-ranking does for its top candidates). Runs on the
    model's worker (VPRService.pairs): the query was decoded within the service's memory budget."""
    record = record_of(version, reference_id)
    prep = extractor.preprocessing
    _, query_local = extractor.extract_tensors(query.tensor[None])
    reference_local = torch.from_numpy(version.read_local([reference_id])[0])
    query_idx, ref_idx = mnn_pairs(query_local[0].float().cpu(), reference_local, precision)
    keep = _evenly_spaced(len(query_idx), max_pairs)
    map_hw = tuple(version.identity.local_shape[:2])
    width, height = query.size
    query_xy = position_to_pixel(query_idx.numpy()[keep], map_hw, prep.image_size, (width, height))
    ref_xy = position_to_pixel(ref_idx.numpy()[keep], map_hw, prep.image_size, (record.width, record.height))
    return {
        "reference_id": reference_id,
        "index_version": version.name,
        "mnn_matches": len(query_idx),
        "query_size": {"width": width, "height": height},
        "reference_size": {"width": record.width, "height": record.height},
        "pairs": [
            {"query": _rounded(q), "reference": _rounded(r)} for q, r in zip(query_xy, ref_xy, strict=True)
        ],
    }


def _evenly_spaced(count: int, cap: int) -> np.ndarray:
    """Pairs come ordered by query position, so an even stride thins them evenly over the image."""
    if count <= cap:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, cap).round().astype(int))


def _rounded(xy: np.ndarray) -> tuple[float, float]:
    return round(float(xy[0]), 1), round(float(xy[1]), 1)
