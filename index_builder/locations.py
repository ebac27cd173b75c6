"""Where each reference image was taken, and the name it is shown under: read and written only here.

An image's location comes from the first of:
1. a `locations.csv` in its folder or any folder above it (header `path,lat,lon`, or
   `path,utm_east,utm_north,utm_zone`; `path` relative to the CSV's folder; an optional `name` column
   holds the display name, e.g. an uploaded photo's own file name);
2. the benchmark file-name convention `@UTM_east@UTM_north@zone@band@lat@lon@...` (empty fields allowed);
3. EXIF GPS tags.
An image with none of them is indexed without a location.
"""

from __future__ import annotations

import csv
import os
import posixpath
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

from PIL import Image

from index_builder.geo import from_utm, parse_zone, to_utm

LOCATIONS_CSV = "locations.csv"
CSV_HEADER = ["path", "lat", "lon", "name"]
_append_lock = threading.Lock()


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
class CsvEntry:
    """One row of a locations.csv: a location and/or a display name."""

    location: Location | None
    name: str | None


def read_location_csvs(root: Path) -> tuple[dict[str, CsvEntry], list[str]]:
    """Rows of every locations.csv under root, keyed by path relative to root; and the problems found
    (bad rows are reported, never fatal). A CSV deeper in the tree wins over one above it."""
    found: dict[str, CsvEntry] = {}
    problems: list[str] = []
    for csv_path in sorted(root.rglob(LOCATIONS_CSV), key=lambda p: len(p.parts)):
        if not csv_path.is_file():
            continue
        base = csv_path.parent.relative_to(root)
        where = csv_path.relative_to(root)
        for row_no, row, error in _csv_rows(csv_path):
            if error:
                problems.append(f"{where}:{row_no}: {error}")
                continue
            rel = posixpath.normpath(posixpath.join(base.as_posix(), row["path"].strip()))
            name = row.get("name", "").strip() or None
            try:
                found[rel] = CsvEntry(_csv_location(row), name)
            except (ValueError, KeyError, OverflowError) as exc:
                problems.append(f"{where}:{row_no}: {exc}")
                if name:
                    found[rel] = CsvEntry(None, name)
    return found, problems


def _csv_rows(path: Path) -> Iterator[tuple[int, dict[str, str], str | None]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = {name.strip() for name in reader.fieldnames or []}
            coordinates = {"lat", "lon"} <= fields or {"utm_east", "utm_north"} <= fields
            if "path" not in fields or not (coordinates or "name" in fields):
                yield 1, {}, "header must be path,lat,lon[,name] or path,utm_east,utm_north,utm_zone[,name]"
                return
            for row_no, row in enumerate(reader, start=2):
                yield row_no, {k.strip(): (v or "") for k, v in row.items() if isinstance(k, str)}, None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        yield 0, {}, f"unreadable ({type(exc).__name__})"


def _csv_location(row: dict[str, str]) -> Location | None:
    """A row's coordinates; None for a row that only names its image."""
    if row.get("lat", "").strip() and row.get("lon", "").strip():
        return Location.from_lat_lon(float(row["lat"]), float(row["lon"]), "csv")
    if row.get("utm_east", "").strip() and row.get("utm_north", "").strip():
        return Location.from_utm(
            float(row["utm_east"]), float(row["utm_north"]), row.get("utm_zone") or None, "csv"
        )
    if row.get("name", "").strip():
        return None
    raise ValueError(f"no coordinates for {row.get('path')!r}")


def append_location_row(
    csv_path: Path, rel_path: str, location: tuple[float, float] | None, name: str | None
) -> None:
    """Add one row (path relative to the CSV's folder) to a locations.csv, creating it with a header;
    an older header without `name` is rewritten first. Flushed to disk before returning."""
    with _append_lock:
        _ensure_header(csv_path)
        with open(csv_path, "a", newline="", encoding="utf-8") as f:
            lat, lon = (f"{location[0]:.8f}", f"{location[1]:.8f}") if location else ("", "")
            csv.writer(f).writerow([rel_path, lat, lon, name or ""])
            f.flush()
            os.fsync(f.fileno())


def _ensure_header(csv_path: Path) -> None:
    if csv_path.exists():
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        if rows and "name" in [c.strip() for c in rows[0]]:
            return
        old = [dict(zip([c.strip() for c in rows[0]], r, strict=False)) for r in rows[1:]] if rows else []
        rows = [CSV_HEADER] + [[r.get(c, "") for c in CSV_HEADER] for r in old]
    else:
        rows = [CSV_HEADER]
    tmp = csv_path.with_name(f".{csv_path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, csv_path)


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
    except (ValueError, OverflowError):  # not coordinates after all (or absurd ones): no location
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
    except (ValueError, OverflowError):
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
