"""UTM conversion against known values, and round trips."""

from __future__ import annotations

import itertools

import pytest

from index_builder.geo import from_utm, parse_zone, to_utm, utm_zone


def test_known_points():
    equator = to_utm(0.0, 0.0)  # the classic: zone 31's western edge on the equator
    assert (equator.zone, equator.band) == (31, "N")
    assert equator.east == pytest.approx(166021.4431, abs=1e-3) and equator.north == 0.0
    central = to_utm(60.0, 9.0)  # zone 32's central meridian: easting 500 km, northing k0 * meridian arc
    assert central.east == pytest.approx(500000.0, abs=1e-6)
    assert central.north == pytest.approx(6651411.19, abs=0.05)
    sydney = to_utm(-33.8688, 151.2093)
    assert sydney.zone_label == "56H" and not sydney.northern
    assert (sydney.east, sydney.north) == (
        pytest.approx(334368.6, abs=0.5),
        pytest.approx(6250948.3, abs=0.5),
    )


@pytest.mark.parametrize(
    "lat, lon", list(itertools.product([-79.5, -33.9, 0.001, 35.66, 59.9, 83.9], [-177.2, -74.0, 3.1, 139.7]))
)
def test_round_trip_within_a_millimetre(lat, lon):
    utm = to_utm(lat, lon)
    back_lat, back_lon = from_utm(utm.east, utm.north, utm.zone, utm.northern)
    assert back_lat == pytest.approx(lat, abs=1e-8) and back_lon == pytest.approx(lon, abs=1e-8)


def test_zone_exceptions_and_parsing():
    assert utm_zone(60.0, 5.0) == 32  # south-western Norway
    assert utm_zone(78.0, 10.0) == 33  # Svalbard
    assert utm_zone(40.0, -74.0) == 18
    assert parse_zone("17T") == (17, True)
    assert parse_zone("56 h") == (56, False)
    assert parse_zone("17") == (17, None)
    for bad in ("", "61T", "17TT", "T"):
        with pytest.raises(ValueError):
            parse_zone(bad)
    with pytest.raises(ValueError, match="outside UTM"):
        to_utm(85.0, 0.0)
