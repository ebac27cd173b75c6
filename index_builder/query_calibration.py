"""A calibration fitted on labelled queries (`selavpr calibrate`): photos whose true location is known,
localized against the index, each answer labelled right or wrong by distance.

The queries' locations are read as references' are (locations.csv, the file-name convention, EXIF GPS).
The fit is the self-calibration's (calibration.fit_answers): each query's answer as it is, and with its
true place left out of the candidates.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from index_builder.calibration import DEFAULT_RADIUS_M, Calibration, fit_answers, labelled_answers
from index_builder.locations import exif_location_of, location_from_filename, read_location_csvs
from index_builder.search import Localizer
from index_builder.sources import scan_references

log = logging.getLogger(__name__)
MIN_QUERIES = 8


@dataclass(frozen=True)
class LabelledQuery:
    path: Path
    east: float
    north: float
    zone_label: str  # '' when the location is bare UTM metres


def labelled_queries(folder: Path) -> tuple[list[LabelledQuery], list[str]]:
    """(queries with a location, paths of those without one)."""
    entries, _ = read_location_csvs(folder)
    located, unlocated = [], []
    for image in scan_references(folder):
        entry = entries.get(image.rel_path)
        location = (
            (entry.location if entry else None)
            or location_from_filename(image.rel_path)
            or exif_location_of(image.abs_path)
        )
        if location is None or location.utm_east is None or location.utm_north is None:
            unlocated.append(image.rel_path)
            continue
        zone = location.utm_zone or ""
        located.append(LabelledQuery(image.abs_path, location.utm_east, location.utm_north, zone))
    return located, unlocated


def calibrate_on_queries(
    localizer: Localizer,
    queries: list[LabelledQuery],
    rerank_k: int = 100,
    radius_m: float = DEFAULT_RADIUS_M,
    place_removed: bool = True,
    batch_size: int = 8,
) -> tuple[Calibration | None, str]:
    """(calibration of kind 'supplied', note) or (None, why not)."""
    started = time.perf_counter()
    locations = localizer.index.locations
    answers = []
    for start in range(0, len(queries), batch_size):
        batch = queries[start : start + batch_size]
        prepared = [localizer.prepare(q.path, str(q.path)) for q in batch]
        for query, view in zip(batch, localizer.candidate_views(prepared, rerank_k), strict=True):
            zone = locations.zone_of.get(query.zone_label, -1)  # a zone no reference is in: never right
            answers += labelled_answers(view, (query.east, query.north, zone), radius_m, place_removed)
    source = f"{len(queries)} labelled queries"
    source += ", each also with its place removed" if place_removed else ""
    identity = localizer.index.identity
    calibration, note = fit_answers(answers, "supplied", radius_m, source, identity.fingerprint, MIN_QUERIES)
    if calibration is not None:
        calibration.seconds = round(time.perf_counter() - started, 3)
    return calibration, note
