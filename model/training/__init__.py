"""Adapter and local-head training with SelaVPR's global triplet + MNN local loss (spec section 6)."""
