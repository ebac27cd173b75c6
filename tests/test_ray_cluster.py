"""`selavpr serve --engine ray` on a real local Ray cluster (tests/ray_cluster_scenario.py drives it):
the cluster runs inside a loopback-only network namespace (`unshare -n`: nothing can leave the machine),
without usage statistics or dashboard, its replicas reserving no CPU. Every shared image's answer must
equal the single-process answer on a 2-shard and a 4-shard index (ids, order, MNN counts, location; the
global scores to their 6th decimal, see ray_cluster_scenario._compare_all); a shard replica killed
under traffic must give partial answers, never a 5xx nor a wait past the deadlines, then complete answers
once Ray has restarted it; a rebuild published under traffic is served without a failed or partial
answer. Nothing the test starts may outlive it.

About 3 minutes on the project's 2-core machine; needs root, `unshare` and `ip` (CI has them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from index_builder.search import Localizer
from index_builder.store import IndexVersion
from tests.isolated import require_isolated, run_isolated

SHARD_TIMEOUT_S = 2.0
RECOVERY_S = 120.0


@pytest.fixture(scope="module")
def ray_installed():
    require_isolated("ray", extra="ray[serve]")


def test_ray_cluster_answers_exactly_and_survives_a_killed_shard(
    ray_installed, sharded_shared_indexes, tmp_path, isolated_cache
):
    dirs, extractor, queries, _ = sharded_shared_indexes
    single = Localizer(IndexVersion.open_current(dirs[1]), extractor)
    references = queries[0].parents[3]
    expected = {}
    for path in queries:
        answer = single.localize(path, path.name, 5).model_dump(mode="json")
        key = path.relative_to(references).as_posix()
        expected[key] = {k: v for k, v in answer.items() if k not in ("timings_ms", "index_version")}
    # the run that rebuilds serves copies: the session's indexes and references stay as they are
    rebuild_refs, rebuild_index = tmp_path / "refs", tmp_path / "index-2"
    shutil.copytree(references, rebuild_refs)
    shutil.copytree(dirs[2], rebuild_index)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay short
    config = {
        "queries": [str(p) for p in queries],
        "expected": expected,
        "references": str(references),
        "rebuild_references": str(rebuild_refs),
        "cache_dir": str(isolated_cache),
        "ray_tmp": str(ray_tmp),
        "log_dir": str(tmp_path),
        "shard_timeout_s": SHARD_TIMEOUT_S,
        "recovery_s": RECOVERY_S,
        "runs": [
            {"shards": 2, "index_dir": str(rebuild_index), "kill": True},
            {"shards": 4, "index_dir": str(dirs[4])},
        ],
    }
    try:
        run = run_isolated("tests.ray_cluster_scenario", config, tmp_path, timeout_s=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    seconds = run.seconds
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("serve-*.log")))
    assert run.returncode == 0, run.output[-5000:] + logs
    assert run.leftovers == [], f"processes outlived the scenario: {run.leftovers}"
    report = run.report
    print(json.dumps({"seconds": round(seconds, 1), **_summary(report)}, indent=1))
    runs = {run["shards"]: run for run in report["runs"]}
    assert set(runs) == {2, 4}
    for shards, run in runs.items():
        assert run["ready"]["shards_without_replica"] == [], run["ready"]
        assert run["compare"]["queries"] == len(queries)
        assert run["compare"]["mismatches"] == [], (
            shards,
            [_difference(m) for m in run["compare"]["mismatches"]],
        )
    kill = runs[2]["kill"]
    assert kill["killed_pids"], "no replica process of shard-01 was found"
    answers = kill["answers"]
    assert all(a["status"] == 200 for a in answers), [a for a in answers if a["status"] != 200]
    after = [a for a in answers if a["t"] > 0]
    assert any(a["partial"] for a in after), "no answer was flagged partial after the kill"
    for a in after:
        if a["partial"]:
            assert a["missing"] == ["shard-01"] and 0 < a["coverage"] < 1
    # deadline: the encoder, the search and the counts each at most two tries of SHARD_TIMEOUT_S
    assert max(a["elapsed_s"] for a in answers) < 3 * 2 * SHARD_TIMEOUT_S + 10
    assert kill["recovered_after_s"] is not None, "answers never became complete again"
    assert runs[2]["compare_after"]["mismatches"] == []
    assert any(line.startswith("selavpr_shard_partial_answers") for line in runs[2]["metrics"])
    rebuild = runs[2]["rebuild"]
    assert rebuild["build_returncode"] == 0, rebuild["build_stderr"]
    versions = [a["version"] for a in rebuild["answers"]]
    assert rebuild["published"] in versions, "the published version was never served"
    assert all(a["status"] == 200 and a["partial"] is False for a in rebuild["answers"]), rebuild["answers"]
    switched = versions.index(rebuild["published"])
    assert set(versions[switched:]) == {rebuild["published"]}  # no answer from the old version after
    removed = "matching_triplets/p9/i2/"
    assert not any(p.startswith(removed) for a in rebuild["answers"][switched:] for p in a["paths"])


def _summary(report: dict) -> dict:
    out = {}
    for run in report["runs"]:
        latencies = sorted(run["compare"]["latencies_s"])
        item = {
            "ready_s": run["ready_s"],
            "seconds": run["seconds"],
            "query_p50_s": round(latencies[len(latencies) // 2], 3),
            "max_score_diff": run["compare"]["max_score_diff"],
        }
        if "kill" in run:
            answers = run["kill"]["answers"]
            item |= {
                "answers_during_kill": len(answers),
                "partial": sum(1 for a in answers if a["partial"]),
                "recovered_after_s": run["kill"]["recovered_after_s"],
                "slowest_s": round(max(a["elapsed_s"] for a in answers), 2),
                "answers_during_rebuild": len(run["rebuild"]["answers"]),
                "slowest_during_rebuild_s": round(max(a["elapsed_s"] for a in run["rebuild"]["answers"]), 2),
            }
        out[f"shards_{run['shards']}"] = item
    return out


def _difference(mismatch: dict) -> dict:
    """The fields of one mismatched answer that differ, matches as (id, mnn_matches, global_score)."""
    got, want = mismatch["got"], mismatch["want"]
    brief = {"image": mismatch["image"], "status": mismatch["status"]}
    for key in sorted(set(got) | set(want)):
        if key in ("timings_ms", "index_version") or got.get(key) == want.get(key):
            continue
        if key == "matches":
            ranked = [
                [(m["id"], m["mnn_matches"], m["global_score"]) for m in a.get(key, [])] for a in (got, want)
            ]
            brief[key] = {"got": ranked[0], "want": ranked[1]}
        else:
            brief[key] = {"got": got.get(key), "want": want.get(key)}
    return brief
