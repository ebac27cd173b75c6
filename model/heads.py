"""What SelaVPR puts on the patch map: GeM global aggregation and the up-convolution local head."""

import torch
import torch.nn.functional as F
from torch import nn


class L2Norm(nn.Module):
    def __init__(self, dim: int = 1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, p=2, dim=self.dim)


class GeM(nn.Module):
    """Generalised mean pooling over the whole grid, learnable exponent p."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, h, w) -> (B, D, 1, 1)
        return F.avg_pool2d(x.clamp(min=self.eps).pow(self.p), x.shape[-2:]).pow(1.0 / self.p)


class Flatten(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :, 0, 0]


def gem_aggregation(p: float, eps: float) -> nn.Sequential:
    """L2-normalise each position, GeM, flatten. A Sequential so that p is stored as `aggregation.1.p`."""
    return nn.Sequential(L2Norm(dim=1), GeM(p, eps), Flatten())


class LocalHead(nn.Module):
    """Local adaptation: two stride-2 transposed convolutions, (B, D, g, g) -> (B, 128, 4g-3, 4g-3)."""

    def __init__(self, dim: int, channels: tuple[int, int] = (256, 128)) -> None:
        super().__init__()
        mid, out = channels
        self.upconv1 = nn.ConvTranspose2d(dim, mid, kernel_size=3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.upconv2 = nn.ConvTranspose2d(mid, out, kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upconv2(self.relu(self.upconv1(x)))
