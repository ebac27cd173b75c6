"""SelaVPR model: network, preprocessing, checkpoints and matching. Knows tensors, nothing about HTTP."""
