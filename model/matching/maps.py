"""Candidate local maps as the engine reads them: a few at a time.

The engine never needs all K candidate maps at once, so a store can keep them compact on disk and decode
only the chunk being matched (`CandidateMaps`). In-memory arrays are wrapped by `DenseMaps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class CandidateMaps(Protocol):
    """K local maps of shape (h, w, C), loadable by index."""

    def __len__(self) -> int: ...

    @property
    def map_shape(self) -> tuple[int, int, int]: ...

    def load(self, indices: slice | Sequence[int]) -> torch.Tensor:
        """The selected maps as a float tensor (k, h, w, C)."""
        ...


class DenseMaps:
    """A (K, h, w, C) tensor or array already in memory."""

    def __init__(self, maps: torch.Tensor | np.ndarray) -> None:
        self.maps = maps if isinstance(maps, torch.Tensor) else torch.from_numpy(np.asarray(maps))
        if self.maps.ndim != 4:
            raise ValueError(f"expected candidates (K, h, w, C), got shape {tuple(self.maps.shape)}")

    def __len__(self) -> int:
        return self.maps.shape[0]

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return tuple(self.maps.shape[1:])

    def load(self, indices: slice | Sequence[int]) -> torch.Tensor:
        if isinstance(indices, slice):
            return self.maps[indices]
        return self.maps[torch.as_tensor(indices, dtype=torch.long)]


def as_candidate_maps(maps: torch.Tensor | np.ndarray | CandidateMaps) -> CandidateMaps:
    return maps if isinstance(maps, CandidateMaps) else DenseMaps(maps)


class SubsetMaps:
    """Some of another CandidateMaps' maps, in the given order."""

    def __init__(self, base: CandidateMaps, indices: Sequence[int]) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return self.base.map_shape

    def load(self, indices: slice | Sequence[int]) -> torch.Tensor:
        picked = self.indices[indices] if isinstance(indices, slice) else [self.indices[i] for i in indices]
        return self.base.load(picked)
