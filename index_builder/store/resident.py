"""A version's local maps held in an accelerator's memory, so that re-ranking on a GPU gathers its
candidates there: no disk read and no host-to-device copy per query.

Measured on an H200 with a 128-image index (docs/benchmarks.md): a query's re-ranking took 43 ms when
its 100 candidate maps were read from the store and copied over per query, of which the matching itself
was 15 ms; with the maps resident, 18 ms in all. The compact stored arrays are kept (0.47 MiB per
61x61x128 int8 map with its scales: about 280,000 maps in 128 GiB), decoded a chunk at a time like
StoredMaps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from index_builder.store.codec import decode_local_torch

READ_CHUNK = 512  # images read from the store per copy while loading

# ids -> the stored (values, scales or None) of those images, as IndexVersion.read_stored gives them
ReadStored = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]


class ResidentMaps:
    """The stored local arrays of some images of a version (all of them, or a location shard's) on
    `device`, in ascending id order."""

    def __init__(
        self, read_stored: ReadStored, ids: np.ndarray, map_shape: tuple[int, int, int], device: torch.device
    ) -> None:
        self.device, self.map_shape = device, map_shape
        self.ids = np.sort(np.asarray(ids, dtype=np.int64))
        # a whole version holds ids 0..n-1, so an id is its own row: no lookup
        self._whole = bool(len(self.ids) == 0 or self.ids[-1] == len(self.ids) - 1)
        count = len(self.ids)
        values, scales = read_stored(self.ids[: min(count, 1)])
        self.values = torch.empty((count, *map_shape), dtype=torch.from_numpy(values).dtype, device=device)
        self.scales = None
        if scales is not None:
            dtype = torch.from_numpy(scales).dtype
            self.scales = torch.empty((count, *map_shape[:2]), dtype=dtype, device=device)
        for start in range(0, count, READ_CHUNK):
            chunk = self.ids[start : start + READ_CHUNK]
            values, scales = read_stored(chunk)
            self.values[start : start + len(chunk)] = torch.from_numpy(values).to(device)
            if self.scales is not None:
                self.scales[start : start + len(chunk)] = torch.from_numpy(scales).to(device)

    def rows(self, ids: Sequence[int]) -> np.ndarray:
        """Where these ids' arrays are (KeyError for an id not held)."""
        wanted = np.asarray(list(ids), dtype=np.int64)
        if self._whole:
            return wanted
        rows = np.searchsorted(self.ids, wanted)
        if len(wanted) and (rows.max() >= len(self.ids) or not np.array_equal(self.ids[rows], wanted)):
            raise KeyError("an id whose maps are not resident here")
        return rows

    def candidates(self, ids: Sequence[int]) -> ResidentCandidates:
        rows = torch.as_tensor(self.rows(ids), dtype=torch.long, device=self.device)
        return ResidentCandidates(self, rows)


class ResidentCandidates:
    """CandidateMaps over resident arrays: a chunk is gathered and decoded on the device."""

    def __init__(self, resident: ResidentMaps, ids: torch.Tensor) -> None:
        self.resident, self.ids = resident, ids

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def map_shape(self) -> tuple[int, int, int]:
        return self.resident.map_shape

    def load(self, indices: slice | Sequence[int]) -> torch.Tensor:
        picked = self.ids[indices] if isinstance(indices, slice) else self.ids[list(indices)]
        scales = None if self.resident.scales is None else self.resident.scales[picked]
        return decode_local_torch(self.resident.values[picked], scales)
