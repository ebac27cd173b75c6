"""`selavpr serve --engine ray` on a real local Ray cluster (tests/e2e/ray_cluster_scenario.py drives it):
the cluster runs inside a loopback-only network namespace (`unshare -n`: nothing can leave the machine),
without usage statistics or dashboard.

1. As a user runs it: the installed `selavpr` console script, no resource flag, on this machine's CPUs,
   a 2-shard index. Every shared image's answer must equal the single-process answer (ids, order, MNN
   counts, location; the global scores to their 6th decimal, see ray_cluster_scenario._compare_all); a
   shard replica hung (SIGSTOP) and then one killed under traffic must give partial answers, never a
   5xx nor a wait past the deadlines, then complete answers; a photo uploaded with POST /index/images
   and POST /index/rebuild under traffic: every answer 200 and complete, each from one version, the old
   one never after the new, and the new photo found.
2. Explicit requests that fit (`--replica-num-cpus 0.25`) on a 4-shard index: the same answers.
3. Explicit requests a 2-CPU cluster cannot hold: the command exits at once, with one message.

Nothing the test starts may outlive it. About 4 minutes on the project's 2-core machine; needs root,
`unshare` and `ip` (CI has them).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from index_builder.search import Localizer
from index_builder.store import IndexVersion
from tests.helpers import mirrored_jpeg
from tests.isolated import require_isolated, run_isolated

SHARD_TIMEOUT_S = 2.0
HANG_S = 8.0
RECOVERY_S = 120.0


@pytest.fixture(scope="module")
def ray_installed():
    require_isolated("ray", extra="ray[serve]")


def test_ray_cluster_as_users_run_it(ray_installed, sharded_shared_indexes, tmp_path, isolated_cache):
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
    new_photo = tmp_path / "mirrored.jpg"
    new_photo.write_bytes(mirrored_jpeg(queries[5]))
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths must stay short
    config = {
        "queries": [str(p) for p in queries],
        "expected": expected,
        "references": str(references),
        "new_photo": str(new_photo),
        "cache_dir": str(isolated_cache),
        "ray_tmp": str(ray_tmp),
        "log_dir": str(tmp_path),
        "shard_timeout_s": SHARD_TIMEOUT_S,
        "hang_s": HANG_S,
        "recovery_s": RECOVERY_S,
        "runs": [
            {
                "name": "defaults",
                "shards": 2,
                "index_dir": str(rebuild_index),
                "references": str(rebuild_refs),
                "console_script": True,
                "faults": True,
            },
            {
                "name": "explicit",
                "shards": 4,
                "index_dir": str(dirs[4]),
                "references": str(references),
                "console_script": False,
                "flags": ["--ray-num-cpus", "2", "--replica-num-cpus", "0.25"],
            },
            {"name": "too_small", "shards": 2, "index_dir": str(dirs[2]), "too_small": True},
        ],
    }
    try:
        run = run_isolated("tests.e2e.ray_cluster_scenario", config, tmp_path, timeout_s=900)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    seconds = run.seconds
    logs = "\n".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("serve-*.log")))
    assert run.returncode == 0, run.output[-5000:] + logs
    assert run.leftovers == [], f"processes outlived the scenario: {run.leftovers}"
    report = run.report
    print(json.dumps({"seconds": round(seconds, 1), **_summary(report)}, indent=1))
    runs = {run["name"]: run for run in report["runs"]}
    assert set(runs) == {"defaults", "explicit", "too_small"}
    for name in ("defaults", "explicit"):
        run = runs[name]
        assert run["ready"]["shards_without_replica"] == [], run["ready"]
        assert run["compare"]["queries"] == len(queries)
        assert run["compare"]["mismatches"] == [], (
            name,
            [_difference(m) for m in run["compare"]["mismatches"]],
        )
    _check_hang(runs["defaults"]["hang"])
    _check_kill(runs["defaults"]["kill"])
    assert runs["defaults"]["settled_s"] is not None, "shard-01 never had a replica for long again"
    assert runs["defaults"]["compare_after"]["mismatches"] == []
    assert any(line.startswith("selavpr_shard_partial_answers") for line in runs["defaults"]["metrics"])
    _check_rebuild(runs["defaults"]["rebuild"])
    small = runs["too_small"]["too_small"]
    assert small["returncode"] == 2 and len(small["errors"]) == 1, small
    message = small["errors"][0]
    assert "cannot place the deployments: they ask for 5 CPUs" in message, message
    assert "the cluster has 2 CPUs" in message and "fix:" in message, message
    assert small["seconds"] < 90, small


# deadline: the encoder, the search and the counts each at most two tries of SHARD_TIMEOUT_S
MAX_ANSWER_S = 3 * 2 * SHARD_TIMEOUT_S + 10


def _check_hang(hang: dict) -> None:
    assert hang["stopped_pids"], "no replica process of shard-01 was found"
    answers = hang["answers"]
    assert all(a["status"] == 200 for a in answers), [a for a in answers if a["status"] != 200]
    during = [a for a in answers if 0 < a["t"] <= hang["hang_s"]]
    assert any(a["partial"] for a in during), "no answer was flagged partial while the shard hung"
    assert all(a["missing"] == ["shard-01"] for a in answers if a["partial"])
    assert max(a["elapsed_s"] for a in answers) < MAX_ANSWER_S
    assert hang["recovered_after_s"] is not None, "answers never became complete again"


def _check_kill(kill: dict) -> None:
    assert kill["killed_pids"], "no replica process of shard-01 was found"
    answers = kill["answers"]
    assert all(a["status"] == 200 for a in answers), [a for a in answers if a["status"] != 200]
    after = [a for a in answers if a["t"] > 0]
    assert any(a["partial"] for a in after), "no answer was flagged partial after the kill"
    for a in after:
        if a["partial"]:
            assert a["missing"] == ["shard-01"] and 0 < a["coverage"] < 1
    assert max(a["elapsed_s"] for a in answers) < MAX_ANSWER_S
    assert kill["recovered_after_s"] is not None, "answers never became complete again"


def _check_rebuild(rebuild: dict) -> None:
    assert rebuild["unauthorised_status"] == 401
    assert (rebuild["upload_status"], rebuild["rebuild_status"]) == (201, 202), rebuild
    assert rebuild["published"] not in (None, rebuild["before"]), rebuild["statuses"]
    assert rebuild["last_error"] is None, rebuild["last_error"]
    answers = rebuild["answers"]
    assert all(a["status"] == 200 and a["partial"] is False for a in answers), answers
    versions = [a["version"] for a in answers]
    assert set(versions) <= {rebuild["before"], rebuild["published"]}, set(versions)
    assert rebuild["published"] in versions, "the published version was never served"
    switched = versions.index(rebuild["published"])
    assert set(versions[switched:]) == {rebuild["published"]}  # no answer from the old version after
    assert rebuild["found"]["version"] == rebuild["published"]
    assert rebuild["found"]["top"][0] == "mirrored.jpg", rebuild["found"]


def _summary(report: dict) -> dict:
    out = {}
    for run in report["runs"]:
        if "too_small" in run:
            out[run["name"]] = run["too_small"]
            continue
        latencies = sorted(run["compare"]["latencies_s"])
        item = {
            "ready_s": run["ready_s"],
            "seconds": run["seconds"],
            "query_p50_s": round(latencies[len(latencies) // 2], 3),
            "max_score_diff": run["compare"]["max_score_diff"],
        }
        if "kill" in run:
            hang, kill, rebuild = run["hang"]["answers"], run["kill"]["answers"], run["rebuild"]["answers"]
            item |= {
                "answers_during_hang": len(hang),
                "partial_during_hang": sum(1 for a in hang if a["partial"]),
                "slowest_during_hang_s": round(max(a["elapsed_s"] for a in hang), 2),
                "answers_during_kill": len(kill),
                "partial": sum(1 for a in kill if a["partial"]),
                "recovered_after_s": run["kill"]["recovered_after_s"],
                "slowest_s": round(max(a["elapsed_s"] for a in kill), 2),
                "answers_during_rebuild": len(rebuild),
                "slowest_during_rebuild_s": round(max(a["elapsed_s"] for a in rebuild), 2),
            }
        out[run["name"]] = item
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
