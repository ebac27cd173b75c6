"""S2 leaf cell ids of latitude/longitude points: the published S2 definition (cube face, quadratic
projection, Hilbert curve), written out here so that sharding needs no extra dependency. Ids along the
curve keep neighbours together, so a contiguous range of ids is a compact region: what a location shard
is. tests/index/test_sharding.py checks the ids against the s2sphere package.
"""

from __future__ import annotations

import math

MAX_LEVEL = 30
POS_BITS = 2 * MAX_LEVEL + 1
MAX_SIZE = 1 << MAX_LEVEL

# Hilbert curve tables of the S2 library: (orientation, ij) -> position in the curve, and how each
# position turns the orientation of its sub-square (bit 0: swap i and j, bit 1: invert both).
_SWAP, _INVERT = 1, 2
_IJ_TO_POS = ((0, 1, 3, 2), (0, 3, 1, 2), (2, 3, 1, 0), (2, 1, 3, 0))
_POS_TO_ORIENTATION = (_SWAP, 0, 0, _INVERT | _SWAP)


def _face_uv(x: float, y: float, z: float) -> tuple[int, float, float]:
    """The cube face a direction points to (0..5) and its (u, v) coordinates on it."""
    ax, ay, az = abs(x), abs(y), abs(z)
    face = (0 if ax > az else 2) if ax > ay else (1 if ay > az else 2)
    if (x, y, z)[face] < 0:
        face += 3
    if face == 0:
        return face, y / x, z / x
    if face == 1:
        return face, -x / y, z / y
    if face == 2:
        return face, -x / z, -y / z
    if face == 3:
        return face, z / x, y / x
    if face == 4:
        return face, z / y, -x / y
    return face, -y / z, -x / z


def _uv_to_st(u: float) -> float:
    """S2's quadratic projection, which makes cells of one level closer to equal in area."""
    return 0.5 * math.sqrt(1 + 3 * u) if u >= 0 else 1 - 0.5 * math.sqrt(1 - 3 * u)


def _st_to_ij(s: float) -> int:
    return max(0, min(MAX_SIZE - 1, math.floor(MAX_SIZE * s)))


def leaf_cell_id(lat: float, lon: float) -> int:
    """The 64-bit id of the level-30 S2 cell holding (lat, lon) in degrees: face in the top 3 bits, then
    60 bits of Hilbert position, then the trailing 1 bit of a leaf cell."""
    if not (-90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0) or math.isnan(lat) or math.isnan(lon):
        raise ValueError(f"not a latitude/longitude: ({lat}, {lon})")
    phi, theta = math.radians(lat), math.radians(lon)
    x, y, z = math.cos(phi) * math.cos(theta), math.cos(phi) * math.sin(theta), math.sin(phi)
    face, u, v = _face_uv(x, y, z)
    i, j = _st_to_ij(_uv_to_st(u)), _st_to_ij(_uv_to_st(v))
    orientation, position = face & _SWAP, 0
    for level in range(MAX_LEVEL - 1, -1, -1):
        ij = (((i >> level) & 1) << 1) | ((j >> level) & 1)
        pos = _IJ_TO_POS[orientation][ij]
        position = (position << 2) | pos
        orientation ^= _POS_TO_ORIENTATION[pos]
    return (face << POS_BITS) | (position << 1) | 1
