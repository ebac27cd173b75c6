"""SelaVPR's bottleneck adapter: Linear(D -> D/2) -> ReLU -> Linear(D/2 -> D).

The residual around it (serial adapter) or its 0.2 scale (parallel adapter) belongs to the block.
"""

import torch
from torch import nn


class Adapter(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        # Names match the released checkpoints: `adapter{1,2}.D_fc{1,2}`.
        self.D_fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.D_fc2 = nn.Linear(hidden, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Training initialisation: with D_fc2 zero the adapter outputs exactly zero."""
        nn.init.trunc_normal_(self.D_fc1.weight, std=0.02)
        nn.init.zeros_(self.D_fc1.bias)
        nn.init.zeros_(self.D_fc2.weight)
        nn.init.zeros_(self.D_fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.D_fc2(self.act(self.D_fc1(x)))
