"""Reference images on disk and where each was taken.

A reference folder is a tree of images. An image's location comes from the first of:
1. a `locations.csv` in its folder or any folder above it (header `path,lat,lon`, or
   `path,utm_east,utm_north,utm_zone`; `path` relative to the CSV's folder);
2. the benchmark file-name convention `@UTM_east@UTM_north@zone@band@lat@lon@...` (empty fields allowed);
3. EXIF GPS tags.
An image with none of them is indexed without a location.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from PIL import Image

from index_builder.geo import from_utm, parse_zone, to_utm
from model.errors import SelavprError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".heic", ".heif", ".avif"})
LOCATIONS_CSV = "locations.csv"
HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class Location:
    lat: float | None
    lon: float | None
    utm_east: float | None
    utm_north: float | None
    utm_zone: str | None  # e.g. "17T"; None when only lat/lon or bare UTM metres are known
    source: str  # "csv", "filename" or "exif"

    @classmethod
    def from_lat_lon(cls, lat: float, lon: float, source: str) -> Location:
        utm = to_utm(lat, lon)
        return cls(lat, lon, utm.east, utm.north, utm.zone_label, source)

    @classmethod
    def from_utm(cls, east: float, north: float, zone_text: str | None, source: str) -> Location:
        """UTM metres; latitude/longitude follow when the zone (with its band letter) is known."""
        lat = lon = None
        if zone_text:
            zone, northern = parse_zone(zone_text)
            if northern is not None:
                lat, lon = from_utm(east, north, zone, northern)
        return cls(lat, lon, east, north, zone_text.upper() if zone_text else None, source)


@dataclass(frozen=True)
class ReferenceImage:
    rel_path: str  # POSIX path relative to the references folder
    abs_path: Path
    file_size: int
    mtime_ns: int


def scan_references(root: Path) -> list[ReferenceImage]:
    """Every image under root (hidden files and folders skipped), sorted by relative path."""
    if not root.is_dir():
        raise SelavprError(f"references folder {root} does not exist or is not a folder")
    images = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            if name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            stat = path.stat()
            rel = PurePosixPath(path.relative_to(root).as_posix())
            images.append(ReferenceImage(str(rel), path, stat.st_size, stat.st_mtime_ns))
    return sorted(images, key=lambda image: image.rel_path)


def content_hash(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# --- locations ----------------------------------------------------------------------------------------


def read_location_csvs(root: Path) -> tuple[dict[str, Location], list[str]]:
    """Locations from every locations.csv under root, keyed by path relative to root; and the problems
    found (bad rows are reported, never fatal). A CSV deeper in the tree wins over one above it."""
    found: dict[str, Location] = {}
    problems: list[str] = []
    for csv_path in sorted(root.rglob(LOCATIONS_CSV), key=lambda p: len(p.parts)):
        base = csv_path.parent.relative_to(root)
        for row_no, row, error in _csv_rows(csv_path):
            if error:
                problems.append(f"{csv_path.relative_to(root)}:{row_no}: {error}")
                continue
            rel = posixpath.normpath(posixpath.join(base.as_posix(), row["path"].strip()))
            try:
                found[rel] = _csv_location(row)
            except (ValueError, KeyError) as exc:
                problems.append(f"{csv_path.relative_to(root)}:{row_no}: {exc}")
    return found, problems


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str], str | None]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = {name.strip() for name in reader.fieldnames or []}
        if "path" not in fields or not ({"lat", "lon"} <= fields or {"utm_east", "utm_north"} <= fields):
            yield 1, {}, "header must be path,lat,lon or path,utm_east,utm_north,utm_zone"
            return
        for row_no, row in enumerate(reader, start=2):
            yield row_no, {k.strip(): (v or "") for k, v in row.items() if k}, None


def _csv_location(row: dict[str, str]) -> Location:
    if row.get("lat", "").strip() and row.get("lon", "").strip():
        return Location.from_lat_lon(float(row["lat"]), float(row["lon"]), "csv")
    if row.get("utm_east", "").strip() and row.get("utm_north", "").strip():
        return Location.from_utm(
            float(row["utm_east"]), float(row["utm_north"]), row.get("utm_zone") or None, "csv"
        )
    raise ValueError(f"no coordinates for {row.get('path')!r}")


def location_from_filename(name: str) -> Location | None:
    """`@UTM_east@UTM_north@zone@band@lat@lon@...`: fields 1-6 of an '@'-split name, any may be empty."""
    fields = PurePosixPath(name).name.split("@")
    if len(fields) < 3:
        return None
    field = (fields + [""] * 7)[1:7]
    east, north, zone, band, lat, lon = (f.strip() for f in field)
    try:
        if lat and lon:
            loc = Location.from_lat_lon(float(lat), float(lon), "filename")
            if east and north:  # keep the file's own metres: benchmarks measure distances with them
                loc = replace(
                    loc, utm_east=float(east), utm_north=float(north), utm_zone=(zone + band) or loc.utm_zone
                )
            return loc
        if east and north:
            return Location.from_utm(float(east), float(north), (zone + band) or None, "filename")
    except ValueError:
        return None
    return None


def location_from_exif(image: Image.Image) -> Location | None:
    """EXIF GPSInfo (IFD 0x8825): latitude/longitude as degrees, minutes, seconds with N/S and E/W."""
    try:
        gps = image.getexif().get_ifd(0x8825)
        lat = _dms(gps.get(2), gps.get(1), "S")
        lon = _dms(gps.get(4), gps.get(3), "W")
    except Exception:  # malformed EXIF is common; it only costs the location
        return None
    if lat is None or lon is None or (lat == 0 and lon == 0):
        return None
    try:
        return Location.from_lat_lon(lat, lon, "exif")
    except ValueError:
        return None


def _dms(value, ref, negative: str) -> float | None:
    if not value or len(value) != 3:
        return None
    degrees, minutes, seconds = (float(v) for v in value)
    result = degrees + minutes / 60 + seconds / 3600
    ref = ref.decode() if isinstance(ref, bytes) else ref
    return -result if (ref or "").strip().upper() == negative else result


def exif_location_of(path: Path) -> Location | None:
    """EXIF location read from the header only (no pixel decoding)."""
    try:
        with Image.open(path) as image:
            return location_from_exif(image)
    except Exception:
        return None
