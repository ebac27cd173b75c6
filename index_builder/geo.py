"""WGS84 latitude/longitude <-> UTM, with Krüger's series to third order (millimetre accuracy in a zone).

Benchmarks measure distances in UTM metres (spec section 7); photos and CSV files usually carry latitude
and longitude. Both directions are needed, with no dependency beyond the standard library.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

A = 6378137.0  # WGS84 semi-major axis, metres
F = 1 / 298.257223563  # WGS84 flattening
K0 = 0.9996  # UTM central scale factor
FALSE_EASTING = 500_000.0
FALSE_NORTHING_SOUTH = 10_000_000.0
UTM_MIN_LAT, UTM_MAX_LAT = -80.0, 84.0  # UTM's latitude range (beyond: polar UPS, not supported)
BANDS = "CDEFGHJKLMNPQRSTUVWX"  # 8 degrees each from 80 S; X spans 72..84 N

_N = F / (2 - F)
_RECT = A / (1 + _N) * (1 + _N**2 / 4 + _N**4 / 64)  # rectifying radius
_ALPHA = (_N / 2 - 2 * _N**2 / 3 + 5 * _N**3 / 16, 13 * _N**2 / 48 - 3 * _N**3 / 5, 61 * _N**3 / 240)
_BETA = (_N / 2 - 2 * _N**2 / 3 + 37 * _N**3 / 96, _N**2 / 48 + _N**3 / 15, 17 * _N**3 / 480)
_DELTA = (2 * _N - 2 * _N**2 / 3 - 2 * _N**3, 7 * _N**2 / 3 - 8 * _N**3 / 5, 56 * _N**3 / 15)
_E = 2 * math.sqrt(_N) / (1 + _N)  # first eccentricity


@dataclass(frozen=True)
class UTM:
    east: float
    north: float
    zone: int
    band: str  # latitude band letter; N and above is the northern hemisphere

    @property
    def northern(self) -> bool:
        return self.band >= "N"

    @property
    def zone_label(self) -> str:
        return f"{self.zone}{self.band}"


def utm_zone(lat: float, lon: float) -> int:
    """Standard 6-degree zones with the Norway (32V) and Svalbard (31X-37X) exceptions."""
    zone = int((lon + 180) // 6) % 60 + 1
    if 56 <= lat < 64 and 3 <= lon < 12:
        return 32
    if 72 <= lat < 84 and lon >= 0:
        for upper, z in ((9, 31), (21, 33), (33, 35), (42, 37)):
            if lon < upper:
                return z
    return zone


def latitude_band(lat: float) -> str:
    return BANDS[min(max(int((lat + 80) // 8), 0), len(BANDS) - 1)]


def to_utm(lat: float, lon: float, zone: int | None = None) -> UTM:
    """Latitude/longitude in degrees to UTM (in `zone` if given, else the standard zone)."""
    if not (UTM_MIN_LAT <= lat <= UTM_MAX_LAT) or not (-180 <= lon <= 180):
        raise ValueError(f"({lat}, {lon}) is outside UTM's range (80 S to 84 N)")
    zone = zone or utm_zone(lat, lon)
    phi, lam = math.radians(lat), math.radians(lon - (zone * 6 - 183))
    t = math.sinh(math.atanh(math.sin(phi)) - _E * math.atanh(_E * math.sin(phi)))
    xi, eta = math.atan2(t, math.cos(lam)), math.atanh(math.sin(lam) / math.sqrt(1 + t * t))
    east = eta + sum(a * math.cos(2 * j * xi) * math.sinh(2 * j * eta) for j, a in enumerate(_ALPHA, 1))
    north = xi + sum(a * math.sin(2 * j * xi) * math.cosh(2 * j * eta) for j, a in enumerate(_ALPHA, 1))
    return UTM(
        east=FALSE_EASTING + K0 * _RECT * east,
        north=K0 * _RECT * north + (0.0 if lat >= 0 else FALSE_NORTHING_SOUTH),
        zone=zone,
        band=latitude_band(lat),
    )


def from_utm(east: float, north: float, zone: int, northern: bool) -> tuple[float, float]:
    """UTM to (latitude, longitude) in degrees."""
    if not 1 <= zone <= 60:
        raise ValueError(f"UTM zone {zone} is not in 1..60")
    xi = (north - (0.0 if northern else FALSE_NORTHING_SOUTH)) / (K0 * _RECT)
    eta = (east - FALSE_EASTING) / (K0 * _RECT)
    xi_p = xi - sum(b * math.sin(2 * j * xi) * math.cosh(2 * j * eta) for j, b in enumerate(_BETA, 1))
    eta_p = eta - sum(b * math.cos(2 * j * xi) * math.sinh(2 * j * eta) for j, b in enumerate(_BETA, 1))
    chi = math.asin(math.sin(xi_p) / math.cosh(eta_p))
    phi = chi + sum(d * math.sin(2 * j * chi) for j, d in enumerate(_DELTA, 1))
    lam = math.atan2(math.sinh(eta_p), math.cos(xi_p))
    return math.degrees(phi), zone * 6 - 183 + math.degrees(lam)


def parse_zone(text: str) -> tuple[int, bool | None]:
    """'54', '54S', '54 S' -> (54, northern or None when no band letter is given)."""
    text = text.strip().upper().replace(" ", "")
    digits = "".join(ch for ch in text if ch.isdigit())
    letters = text[len(digits) :]
    if not digits or not 1 <= int(digits) <= 60 or (letters and (len(letters) != 1 or letters not in BANDS)):
        raise ValueError(f"{text!r} is not a UTM zone such as '54' or '54S'")
    return int(digits), (letters >= "N") if letters else None
