"""Dense local matching: MNN counts for re-ranking, match pairs for pictures and the training loss."""

from model.matching import kernels
from model.matching.defaults import default_precision
from model.matching.engine import BestMatches, best_matches
from model.matching.loss import local_triplet_loss, mnn_similarity
from model.matching.maps import CandidateMaps, DenseMaps
from model.matching.mnn import mnn_pairs, mnn_scores, mnn_scores_detailed, rerank_order
from model.matching.precision import Precision

__all__ = [
    "BestMatches",
    "CandidateMaps",
    "DenseMaps",
    "Precision",
    "best_matches",
    "default_precision",
    "kernels",
    "local_triplet_loss",
    "mnn_pairs",
    "mnn_scores",
    "mnn_scores_detailed",
    "mnn_similarity",
    "rerank_order",
]
