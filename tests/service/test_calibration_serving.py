"""Serving the probability with a tiny model: versions without a calibration still serve, marked
uncalibrated; a supplied calibration is used and shown; min_probability over HTTP."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from index_builder.calibration import Calibration, LogisticModel, write_supplied
from index_builder.manifest import IndexManifest
from index_builder.search import Localizer
from index_builder.status import index_status
from index_builder.store import VERSIONS, current_version_name
from tests.service_helpers import files, running, settings_for

pytestmark = pytest.mark.anyio


@pytest.fixture
def index_copy(tmp_path, built) -> Path:
    shutil.copytree(built[1], tmp_path / "index")
    return tmp_path / "index"


def constant(probability: float, fingerprint: str) -> Calibration:
    """A calibration answering `probability` whatever the evidence (zero weights)."""
    import math

    bias = math.log(probability / (1 - probability))
    reranked = LogisticModel(("share", "log_ratio", "global_gap"), [0.0] * 3, [1.0] * 3, [0.0] * 3, bias)
    glob = LogisticModel(("global_score", "global_gap"), [0.0] * 2, [1.0] * 2, [0.0] * 2, bias)
    return Calibration(
        "supplied", 25.0, {"reranked": reranked, "global": glob}, 10, 5, {}, "test", 0.0, fingerprint
    )


def test_too_few_located_references_serve_uncalibrated(built, tiny_ckpt):
    refs, index = built
    status = index_status(index)["calibration"]
    assert status == {"calibrated": False, "note": "uncalibrated: 1 located references, at least 8 needed"}
    localizer = Localizer.open(index, str(tiny_ckpt), "cpu")
    result = localizer.localize(refs / "p1" / "i0" / "Image059.jpg")
    assert result.location is not None and result.status == "located"
    assert (result.probability, result.calibration, result.radius_m) == (None, None, None)


def test_a_version_written_before_calibration_still_serves(index_copy, built, tiny_ckpt):
    """Its manifest has no calibration keys at all, as an older release wrote it."""
    manifest_path = index_copy / VERSIONS / current_version_name(index_copy) / "manifest.json"
    data = json.loads(manifest_path.read_text())
    for key in ("calibration", "calibration_note"):
        data.pop(key)
    data["report"].pop("calibration_seconds")
    manifest_path.write_text(json.dumps(data))
    assert IndexManifest.read(manifest_path.parent).calibration is None
    status = index_status(index_copy, verify=True)
    assert status["verification"]["ok"]
    assert status["calibration"] == {
        "calibrated": False,
        "note": "uncalibrated: built before calibration existed",
    }
    result = Localizer.open(index_copy, str(tiny_ckpt), "cpu").localize(
        built[0] / "p1" / "i0" / "Image059.jpg"
    )
    assert result.location is not None and result.probability is None and result.calibration is None


def test_a_supplied_calibration_of_the_same_encoding_is_served(index_copy, built, tiny_ckpt):
    fingerprint = Localizer.open(index_copy, str(tiny_ckpt), "cpu").index.identity.fingerprint
    write_supplied(index_copy, constant(0.3, "another-model"))  # another encoding's: ignored
    assert index_status(index_copy)["calibration"]["calibrated"] is False
    calibration = constant(0.3, fingerprint)
    write_supplied(index_copy, calibration)
    status = index_status(index_copy)["calibration"]
    assert status["calibrated"] and status["id"] == calibration.id and status["kind"] == "supplied"
    result = Localizer.open(index_copy, str(tiny_ckpt), "cpu").localize(
        built[0] / "p1" / "i0" / "Image059.jpg"
    )
    assert result.probability == pytest.approx(0.3) and result.calibration == calibration.id
    assert result.radius_m == 25.0


async def test_min_probability_over_http(index_copy, built, tiny_ckpt):
    refs = built[0]
    fingerprint = Localizer.open(index_copy, str(tiny_ckpt), "cpu").index.identity.fingerprint
    write_supplied(index_copy, constant(0.3, fingerprint))
    query = (refs / "p1" / "i0" / "Image059.jpg").read_bytes()
    async with running(settings_for(refs, index_copy, tiny_ckpt)) as (_, client):
        served = (await client.get("/index/status")).json()["calibration"]
        assert served["calibrated"] and served["kind"] == "supplied" and served["samples"] == 10
        plain = (await client.post("/localize", files=files(query))).json()
        assert plain["status"] == "located" and plain["probability"] == pytest.approx(0.3)
        assert plain["location"]["lat"] == -27.4772
        low = (await client.post("/localize", files=files(query), data={"min_probability": "0.5"})).json()
        assert low["status"] == "unknown" and low["location"] is None
        assert low["matches"] == plain["matches"]  # still listed
        query_param = await client.post("/localize", files=files(query), params={"min_probability": "0.2"})
        assert query_param.json()["status"] == "located"
        batch = await client.post(
            "/localize/batch",
            files=[("image", ("a.jpg", query)), ("image", ("b.jpg", query))],
            data={"min_probability": "0.5"},
        )
        assert [r["status"] for r in batch.json()["results"]] == ["unknown", "unknown"]
        bad = await client.post("/localize", files=files(query), data={"min_probability": "1.5"})
        assert bad.status_code == 422 and "min_probability" in bad.json()["error"]["message"]
    settings = settings_for(refs, index_copy, tiny_ckpt, min_probability=0.5)
    async with running(settings) as (_, client):  # the server's default, a request may lower it
        assert (await client.post("/localize", files=files(query))).json()["status"] == "unknown"
        relaxed = await client.post("/localize", files=files(query), data={"min_probability": "0"})
        assert relaxed.json()["status"] == "located"
