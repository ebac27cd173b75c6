"""Shared fixtures: the read-only images in ../shared/data, tiny random models, an isolated cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SELAVPR_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared real images. Without them a contributor's run skips the tests that need them, saying
    why; CI (CI=true) has them and fails instead of skipping."""
    if not (SHARED_DATA / "matching_triplets").is_dir():
        reason = f"shared test images missing: no {SHARED_DATA}/matching_triplets (set SELAVPR_SHARED_DATA)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory) -> Path:
    """Every session converts the default weights into its own cache, as a fresh machine would."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["SELAVPR_CACHE_DIR"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny SelaVPR checkpoint (random weights, a local head, 112 px), written once per session."""
    from tests.helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(autouse=True)
def seeded():
    """Tests draw random inputs; a fixed seed makes every run see the same ones."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def shared_embeddings(shared_data):
    """The 32 shared images (30 triplet views, then the Tokyo pair) through the default weights, once."""
    from model.extractor import FeatureExtractor

    paths = sorted((shared_data / "matching_triplets").glob("p*/i*/*.jpg"))
    paths += sorted((shared_data / "tokyo_pair").glob("*"))
    return paths, FeatureExtractor.from_checkpoint("default", device="cpu").embed(paths)


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.fixture(scope="session")
def sharded_shared_indexes(tmp_path_factory, shared_data):
    """The 32 shared images indexed with the default weights, unsharded, then re-published with 2 and 4
    location shards from the same features. (index dirs by shard count, the extractor, the query paths,
    the queries' (global, local) features)."""
    import shutil

    from index_builder.builder import BuildConfig, build_index
    from model.extractor import FeatureExtractor
    from tests.helpers import shared_references

    root = tmp_path_factory.mktemp("sharded")
    refs = shared_references(shared_data, root / "refs")
    extractor = FeatureExtractor.from_checkpoint("default", device="cpu")
    dirs = {}
    for shards in (1, 2, 4):
        index_dir = root / f"index-{shards}"
        if shards > 1:
            shutil.copytree(root / "index-1", index_dir)
        report = build_index(
            BuildConfig(references=refs, index_dir=index_dir, shards=shards), extractor=extractor
        )
        assert report.total == 32 and (shards == 1 or report.encoded == 0)
        dirs[shards] = index_dir
    queries = sorted(refs.glob("*/p*/i*/*.jpg")) + sorted((refs / "tokyo_pair").glob("*"))
    features = extractor.extract_tensors(torch.stack([extractor.preprocessing.load(p) for p in queries]))
    return dirs, extractor, queries, features


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data, tiny_ckpt) -> tuple[Path, Path]:
    """References (three places, one with a location) and an index of them, built once."""
    import shutil

    from index_builder.builder import BuildConfig, build_index
    from model.options import ModelOptions

    root = tmp_path_factory.mktemp("built")
    refs = root / "refs"
    for place in ("p0", "p1", "p2"):
        shutil.copytree(shared_data / "matching_triplets" / place, refs / place)
    (refs / "locations.csv").write_text("path,lat,lon\np1/i0/Image059.jpg,-27.4772,153.0281\n")
    build_index(
        BuildConfig(
            references=refs,
            index_dir=root / "index",
            model=ModelOptions(checkpoint=str(tiny_ckpt), device="cpu"),
        )
    )
    return refs, root / "index"


@pytest.fixture
def workspace(tmp_path, built) -> tuple[Path, Path]:
    """A private copy, for tests that change references or the index."""
    import shutil

    refs, index = built
    shutil.copytree(refs, tmp_path / "refs")
    shutil.copytree(index, tmp_path / "index")
    return tmp_path / "refs", tmp_path / "index"
