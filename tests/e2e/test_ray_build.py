"""`selavpr index build --engine ray`: the encoding on a Ray Data actor pool gives the index a
single-process build gives, bit for bit (global descriptors, stored local maps, records, encoding
identity, search answers); a second build re-encodes nothing, one after an image is added only that
image; a corrupt image is skipped and reported. Ray runs as a real local cluster (2 CPUs, 2 encoder
actors) inside a loopback-only network namespace (tests/e2e/ray_build_scenario.py), usage statistics off,
no dashboard; nothing it starts may outlive the test. A tiny checkpoint and a handful of shared images
keep it short (about 50 s on the project's 2-core machine); needs root, `unshare` and `ip` (CI has them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from index_builder.builder import BuildConfig, build_index
from index_builder.search import Localizer
from index_builder.store import IndexVersion, SegmentFiles, segment_dir
from model.extractor import FeatureExtractor
from model.options import ModelOptions
from tests.helpers import tiny_checkpoint
from tests.isolated import require_isolated, run_isolated

CORRUPT = "p9/broken.jpg"


@pytest.fixture(scope="module")
def ray_available():
    require_isolated("pyarrow", "ray.data", extra="ray[data]")


def _references(shared_data: Path, refs: Path) -> tuple[Path, Path]:
    """Seven shared views (four planned batches of two, one left one smaller by the corrupt file) and
    one more view to add later."""
    views = sorted((shared_data / "matching_triplets").glob("p*/i*/*.jpg"))
    for view in views[:7]:
        target = refs / view.relative_to(shared_data / "matching_triplets")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(view, target)
    (refs / CORRUPT).parent.mkdir(parents=True, exist_ok=True)
    (refs / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not a JPEG after all")
    return refs, views[7]


def _stored(index_dir: Path) -> dict:
    """Everything a build decides, per reference: the record (without its feature-file name and when it
    was added), the global descriptor's and the stored map's bytes; and the version's encoding."""
    version = IndexVersion.open_current(index_dir)
    try:
        out: dict = {"encoding": version.manifest.encoding.to_dict(), "count": version.manifest.count}
        for record in version.all_records():
            files = SegmentFiles(segment_dir(index_dir, record.segment))
            try:
                values, scale = files.read_stored([record.row])
                global_desc = files.read_global()[record.row]
            finally:
                files.close()
            fields = {k: v for k, v in vars(record).items() if k not in ("segment", "row", "added_at")}
            out[record.path] = {
                "record": fields,
                "global": global_desc.astype(np.float32).tobytes(),
                "local": values.tobytes(),
                "scale": None if scale is None else scale.tobytes(),
            }
        return out
    finally:
        version.close()


def _answers(index_dir: Path, extractor: FeatureExtractor, queries: list[Path]) -> list[dict]:
    localizer = Localizer(IndexVersion.open_current(index_dir), extractor)
    answers = []
    for path in queries:
        answer = localizer.localize(path, path.name, 5).model_dump(mode="json")
        answers.append({k: v for k, v in answer.items() if k not in ("timings_ms", "index_version")})
    return answers


def _assert_same_index(ray_dir: Path, local_dir: Path, extractor: FeatureExtractor, queries: list[Path]):
    ray_stored, local_stored = _stored(ray_dir), _stored(local_dir)
    assert ray_stored.keys() == local_stored.keys()
    for key, expected in local_stored.items():
        assert ray_stored[key] == expected, key  # bytes: bit-identical
    assert _answers(ray_dir, extractor, queries) == _answers(local_dir, extractor, queries)


def test_ray_data_build_equals_the_single_process_build(ray_available, shared_data, tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "tiny")
    refs, new_image = _references(shared_data, tmp_path / "refs")
    ray_refs = tmp_path / "ray-refs"
    shutil.copytree(refs, ray_refs)
    extractor = FeatureExtractor.from_checkpoint(checkpoint, "cpu")
    local = build_index(
        BuildConfig(
            references=refs,
            index_dir=tmp_path / "local",
            batch_size=2,
            model=ModelOptions(checkpoint=str(checkpoint)),
        ),
        extractor,
    )
    assert (local.total, local.skipped) == (7, 1)

    ray_tmp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths must stay short
    config = {
        "checkpoint": str(checkpoint),
        "references": str(ray_refs),
        "index_dir": str(tmp_path / "ray"),
        "first_copy": str(tmp_path / "ray-first"),
        "new_image": str(new_image),
        "ray_tmp": str(ray_tmp),
    }
    try:
        run = run_isolated("tests.e2e.ray_build_scenario", config, tmp_path, timeout_s=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert run.returncode == 0, run.output[-5000:]
    assert run.leftovers == [], f"processes outlived the scenario: {run.leftovers}"
    report = run.report
    print(json.dumps({"seconds": round(run.seconds, 1), **report}, indent=1)[:3000])

    cli = report["cli"]
    assert cli["returncode"] == 0, cli["stderr"]
    summary = json.loads(cli["stdout"].strip().splitlines()[-1])
    assert (summary["total"], summary["encoded"], summary["reused"], summary["skipped"]) == (7, 7, 0, 1)
    assert f"skipped {CORRUPT}:" in cli["stderr"]
    queries = sorted(refs.glob("p*/i*/*.jpg"))
    _assert_same_index(tmp_path / "ray-first", tmp_path / "local", extractor, queries)

    unchanged = report["unchanged"]["report"]
    assert (unchanged["total"], unchanged["encoded"], unchanged["reused"]) == (7, 0, 7)
    # undecodable content is never stored, so the corrupt file is tried again, and reported, every build
    assert unchanged["skipped_files"] == [
        {"path": CORRUPT, "reason": unchanged["skipped_files"][0]["reason"]}
    ]
    added = report["added"]["report"]
    assert (added["total"], added["encoded"], added["reused"], added["skipped"]) == (8, 1, 7, 1)
    assert report["added"]["encoding_progress"]["done"] == report["added"]["encoding_progress"]["total"] == 2

    # After the same history (the first build, then the added image), the Ray index equals the
    # single-process one. (Not a fresh build of the grown folder: the new image then shares a model
    # batch with another, and a batch's composition changes the last bits.)
    grown_local = tmp_path / "local-grown"
    shutil.copytree(tmp_path / "local", grown_local)
    grown = build_index(
        BuildConfig(
            references=ray_refs,
            index_dir=grown_local,
            batch_size=2,
            model=ModelOptions(checkpoint=str(checkpoint)),
        ),
        extractor,
    )
    assert (grown.encoded, grown.reused) == (1, 7)
    _assert_same_index(tmp_path / "ray", grown_local, extractor, [*queries, ray_refs / "added.jpg"])
