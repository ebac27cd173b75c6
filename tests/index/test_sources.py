"""Reference scanning and the three location sources, in their order of precedence."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

from index_builder.locations import (
    append_location_row,
    exif_location_of,
    location_from_filename,
    read_location_csvs,
)
from index_builder.sources import content_hash, scan_references
from model.errors import SelavprError


def test_scan_skips_hidden_and_non_images(tmp_path):
    for rel in ("b/x.JPG", "a.png", ".hidden/y.jpg", "a/.z.jpg", "notes.txt", "c/d/e.webp"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert [i.rel_path for i in scan_references(tmp_path)] == ["a.png", "b/x.JPG", "c/d/e.webp"]
    with pytest.raises(SelavprError, match="does not exist"):
        scan_references(tmp_path / "missing")


def test_filename_convention():
    loc = location_from_filename("@0585155.78@4477324.14@17@T@40.44221@-79.99589@pano@.jpg")
    assert (loc.utm_east, loc.utm_north, loc.utm_zone, loc.source) == (
        585155.78,
        4477324.14,
        "17T",
        "filename",
    )
    assert loc.lat == pytest.approx(40.44221)
    only_utm = location_from_filename("@0585155.78@4477324.14@17@T@@@.jpg")
    assert only_utm.lat == pytest.approx(40.44221, abs=1e-6) and only_utm.lon == pytest.approx(
        -79.9959, abs=1e-3
    )
    no_zone = location_from_filename("@0585155.78@4477324.14@@@@@.jpg")
    assert no_zone.utm_east == 585155.78 and no_zone.lat is None
    only_lat_lon = location_from_filename("x/@@@@@37.76604@-122.38624@.jpg")
    assert only_lat_lon.utm_zone == "10S" and only_lat_lon.utm_east == pytest.approx(554057.5, abs=0.1)
    assert location_from_filename("plain.jpg") is None
    assert location_from_filename("@abc@def@.jpg") is None
    assert location_from_filename("@1e300@0@33@T@@@.jpg") is None  # OverflowError in the projection


def test_location_csvs_nested_and_bad_rows(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "locations.csv").write_text(
        "path,lat,lon\na.jpg,48.8584,2.2945\nsub/b.jpg,1,2\nbad.jpg,x,y\n"
    )
    (tmp_path / "sub" / "locations.csv").write_text(
        "path,utm_east,utm_north,utm_zone\n./b.jpg,448252,5411935,31U\nc.jpg,448252,5411935,\n"
    )
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "locations.csv").write_text("name,lat\n")
    entries, problems = read_location_csvs(tmp_path)
    found = {path: entry.location for path, entry in entries.items()}
    assert found["a.jpg"].lat == 48.8584 and found["a.jpg"].utm_zone == "31U"
    assert found["sub/b.jpg"].source == "csv" and found["sub/b.jpg"].lat == pytest.approx(48.8584, abs=1e-3)
    assert found["sub/c.jpg"].lat is None and found["sub/c.jpg"].utm_east == 448252
    assert any("bad.jpg" in p or ":4:" in p for p in problems) and any("header" in p for p in problems)


def test_exif_gps(shared_data):
    loc = exif_location_of(shared_data / "tokyo_pair" / "tokyo_query.jpg")
    assert loc.source == "exif"
    assert loc.lat == pytest.approx(35.6593, abs=1e-4) and loc.lon == pytest.approx(139.6984, abs=1e-4)
    assert exif_location_of(shared_data / "tokyo_pair" / "tokyo_db.png") is None


def test_content_hash_follows_content(tmp_path, shared_data):
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    shutil.copy(shared_data / "tokyo_pair" / "tokyo_db.png", a)
    shutil.copy(a, b)
    assert content_hash(a) == content_hash(b)
    Image.new("RGB", (4, 4)).save(b, format="PNG")
    assert content_hash(a) != content_hash(b)


def test_names_written_and_read_back_with_an_old_header_upgraded(tmp_path):
    csv_path = tmp_path / "locations.csv"
    csv_path.write_text("path,lat,lon\nold.jpg,1.5,2.5\n")
    append_location_row(csv_path, "d/new.jpg", (48.85, 2.29), "Tour Eiffel, côté sud.jpg")
    append_location_row(csv_path, "d/unplaced.jpg", None, "no location.png")
    entries, problems = read_location_csvs(tmp_path)
    assert problems == []
    assert entries["old.jpg"].location.lat == 1.5 and entries["old.jpg"].name is None
    assert entries["d/new.jpg"].name == "Tour Eiffel, côté sud.jpg"
    assert entries["d/new.jpg"].location.lat == pytest.approx(48.85)
    assert entries["d/unplaced.jpg"].location is None and entries["d/unplaced.jpg"].name == "no location.png"
