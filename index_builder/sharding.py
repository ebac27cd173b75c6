"""Location shards: which references each shard of a sharded index holds, and which shards a query with a
location prior must search.

Not to be confused with the store's feature segments (index_builder/store/segments.py), the immutable
files that hold encoded features: a location shard is a set of references searched and re-ranked together (one
Ray Serve deployment each with `--engine ray`).

- References with a location are ordered by their S2 leaf cell id (a Hilbert curve over the sphere, so a
  range of ids is a compact region) and cut into `n` runs of about equal size. Shard k holds the cell
  range [cell_start, cell_end); the ranges cover every id, so any point belongs to exactly one shard.
- References without a location go to a shard by a hash of their content, stable across builds.
- A query's prior (lat, lon, radius_m) selects the shards whose references' bounding box comes within
  radius_m of the point: every reference within the circle is then in a searched shard.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from index_builder.s2cells import leaf_cell_id

EARTH_RADIUS_M = 6_371_008.8  # mean radius: distances here decide which shards to search, not answers
CELL_ID_END = 1 << 64  # one past the largest S2 cell id
MAX_SHARDS = 256


def shard_key(position: int) -> str:
    """A shard's name: also the name of its Ray Serve deployment."""
    return f"shard-{position:02d}"


@dataclass(frozen=True)
class BoundingBox:
    """Latitude/longitude bounds of a shard's located references, in degrees (not wrapped at the
    antimeridian: a shard on both sides of it gets a box around the globe, which is wider than needed but
    never misses a reference)."""

    lat_min: float
    lat_max: float
    lon_min: float
    lon_max: float

    def distance_m(self, lat: float, lon: float) -> float:
        """Great-circle distance from a point to the nearest point of the box."""
        if self.lon_min <= lon <= self.lon_max:  # along the point's own meridian
            return EARTH_RADIUS_M * math.radians(max(self.lat_min - lat, lat - self.lat_max, 0.0))
        # Otherwise the nearest point lies on one of the two meridian edges: along a parallel the
        # distance only shrinks towards the point's longitude, so a parallel edge's best is a corner.
        return min(self._meridian_distance_m(lat, lon, edge) for edge in (self.lon_min, self.lon_max))

    def _meridian_distance_m(self, lat: float, lon: float, edge_lon: float) -> float:
        """Distance to the meridian segment at edge_lon between lat_min and lat_max: along a great
        circle the distance to a point has one minimum, so it is at the point's projection on the
        meridian when that falls inside the segment, else at an end."""
        phi, dlon = math.radians(lat), math.radians(lon - edge_lon)
        nearest = math.degrees(math.atan2(math.sin(phi), math.cos(phi) * math.cos(dlon)))
        ends = [self.lat_min, self.lat_max]
        if self.lat_min <= nearest <= self.lat_max:
            ends.append(nearest)
        return min(haversine_m(lat, lon, end, edge_lon) for end in ends)


def haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    h = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(min(1.0, math.sqrt(h)))


@dataclass(frozen=True)
class ShardPlan:
    """One location shard as a build decided it; the manifest records it with the files it wrote."""

    key: str
    cell_start: int  # first S2 leaf cell id of its range (inclusive)
    cell_end: int  # end of its range (exclusive)
    count: int  # references it holds
    located: int  # of which with a location
    box: BoundingBox | None  # bounds of the located ones; None when it holds none
    # the feature segments holding its references' maps, no other shard's (store/shard_segments.py);
    # empty in versions written before shards owned their files (they share the version's segments)
    segments: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ShardPlan:
        box = data.get("box")
        segments = tuple(str(s) for s in data.get("segments", ()))
        return cls(**{**data, "box": BoundingBox(**box) if box else None, "segments": segments})

    @property
    def owns_files(self) -> bool:
        """Whether its maps are in segments of its own, with its own id table (shard-NN.rows.npy)."""
        return bool(self.segments)


@dataclass(frozen=True)
class Reference:
    """What partitioning needs to know of one reference."""

    id: int
    content_hash: str
    lat: float | None
    lon: float | None


@dataclass(frozen=True)
class Partition:
    shards: list[ShardPlan]
    assignment: np.ndarray  # (N,) shard position of reference id i


def partition(references: Sequence[Reference], n: int) -> Partition:
    """Split references (ids 0..N-1) into n location shards (see the module docstring)."""
    if not 1 <= n <= MAX_SHARDS:
        raise ValueError(f"the number of shards must be between 1 and {MAX_SHARDS}, got {n}")
    assignment = np.full(len(references), -1, dtype=np.int32)
    located = [r for r in references if r.lat is not None and r.lon is not None]
    cells = sorted((leaf_cell_id(r.lat, r.lon), r.id) for r in located)
    starts = _range_starts([cell for cell, _ in cells], n)
    ends = [*starts[1:], CELL_ID_END]
    for cell, ref_id in cells:
        assignment[ref_id] = _owner(starts, cell)
    for ref in references:
        if assignment[ref.id] < 0:
            assignment[ref.id] = hash_shard(ref.content_hash, n)
    by_id = {r.id: r for r in references}
    shards = []
    for k in range(n):
        members = np.nonzero(assignment == k)[0]
        points = [(by_id[i].lat, by_id[i].lon) for i in members.tolist() if by_id[i].lat is not None]
        shards.append(
            ShardPlan(
                key=shard_key(k),
                cell_start=starts[k],
                cell_end=ends[k],
                count=len(members),
                located=len(points),
                box=_box(points),
            )
        )
    return Partition(shards, assignment)


def _range_starts(sorted_cells: Sequence[int], n: int) -> list[int]:
    """The first cell id of each of n ranges that cut the sorted cells into runs of about equal size;
    a cut never separates references of the same cell (they stay in one range)."""
    starts, total = [0], len(sorted_cells)
    for k in range(1, n):
        cut = round(k * total / n)
        while 0 < cut < total and sorted_cells[cut - 1] == sorted_cells[cut]:
            cut += 1
        start = sorted_cells[cut] if cut < total else CELL_ID_END
        starts.append(max(start, starts[-1]))
    return starts


def _owner(starts: Sequence[int], cell: int) -> int:
    """The shard whose range holds the cell: the last one starting at or before it (empty ranges, whose
    start equals the next one's, hold nothing)."""
    return bisect.bisect_right(starts, cell) - 1


def hash_shard(content_hash: str, n: int) -> int:
    """The shard of a reference without a location: the same content lands in the same shard every build."""
    return int.from_bytes(hashlib.sha256(content_hash.encode()).digest()[:8], "big") % n


def _box(points: Sequence[tuple[float, float]]) -> BoundingBox | None:
    if not points:
        return None
    lats, lons = [p[0] for p in points], [p[1] for p in points]
    return BoundingBox(min(lats), max(lats), min(lons), max(lons))


@dataclass(frozen=True)
class LocationPrior:
    """Where a query is believed to be: only shards that can hold references within radius_m are searched."""

    lat: float
    lon: float
    radius_m: float

    def __post_init__(self) -> None:
        if not (-90 <= self.lat <= 90 and -180 <= self.lon <= 180):
            raise ValueError(f"prior: not a latitude/longitude: ({self.lat}, {self.lon})")
        if not (self.radius_m > 0 and math.isfinite(self.radius_m)):
            raise ValueError(f"prior: radius_m must be a positive number of metres, got {self.radius_m}")


def shards_for(shards: Sequence[ShardPlan], prior: LocationPrior | None) -> list[int]:
    """Positions of the shards a query searches: all of them without a prior; with one, those whose
    located references come within the radius (a shard without located references holds none there)."""
    if prior is None:
        return list(range(len(shards)))
    return [
        k
        for k, shard in enumerate(shards)
        if shard.box is not None and shard.box.distance_m(prior.lat, prior.lon) <= prior.radius_m
    ]
