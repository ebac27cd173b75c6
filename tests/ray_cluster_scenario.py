"""Driver of tests/test_ray_cluster.py, run inside a loopback-only network namespace (`unshare -n`):
`selavpr serve --engine ray` on a local Ray cluster, every query compared with the single-process answer,
then a shard replica killed mid-traffic. Writes a JSON report; the test asserts on it.

    python -m tests.ray_cluster_scenario CONFIG.json REPORT.json
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.servers import serve_process

KILLED_SHARD = "shard-01"
REMOVED_VIEW = "matching_triplets/p9/i2"  # the references the rebuild under traffic leaves out
SCORE_TOLERANCE = 1.5e-6  # one unit of the 6th decimal the scores are rounded to, and float noise


def _post(client: httpx.Client, base: str, image: Path) -> tuple[int, dict, float]:
    started = time.monotonic()
    with open(image, "rb") as f:
        response = client.post(
            f"{base}/localize", files={"image": (image.name, f, "image/jpeg")}, data={"top_k": "5"}
        )
    elapsed = time.monotonic() - started
    try:
        body = response.json()
    except ValueError:
        body = {"raw": response.text[:500]}
    return response.status_code, body, elapsed


def _replica_pids(name: str) -> list[int]:
    """Processes of this namespace's cluster whose title names the replica (Ray titles its workers
    `ray::ServeReplica:<app>:<deployment>`)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ServeReplica" in cmdline and f":{name}" in cmdline:
            pids.append(int(entry.name))
    return pids


def _without_scores(answer: dict) -> tuple[dict, list[float]]:
    """An answer without the global scores, and the scores."""
    matches = answer.get("matches", [])
    rest = {k: v for k, v in answer.items() if k not in ("timings_ms", "index_version", "matches")}
    rest["matches"] = [{k: v for k, v in m.items() if k != "global_score"} for m in matches]
    return rest, [m["global_score"] for m in matches]


def _compare_all(client, base, queries, expected, references: Path) -> dict:
    """Every answer against the single process's: the same JSON, except that the global scores may
    differ in their last (6th) decimal: the encoder replica runs with another number of threads, so
    its float sums round differently."""
    mismatches, latencies, score_diff = [], [], 0.0
    for image in queries:
        status, body, elapsed = _post(client, base, Path(image))
        latencies.append(elapsed)
        key = Path(image).relative_to(references).as_posix()
        got, got_scores = _without_scores(body)
        want, want_scores = _without_scores(expected[key])
        diffs = [abs(a - b) for a, b in zip(got_scores, want_scores, strict=True)] if got == want else [1.0]
        score_diff = max(score_diff, *diffs, 0.0)
        if status != 200 or got != want or max(diffs, default=0.0) > SCORE_TOLERANCE:
            mismatches.append({"image": key, "status": status, "got": body, "want": expected[key]})
    return {
        "queries": len(queries),
        "mismatches": mismatches,
        "latencies_s": latencies,
        "max_score_diff": score_diff,
    }


def _kill_under_traffic(client, base, queries, deadline_s: float) -> dict:
    """Queries in a loop; after a few, the shard's replica process is killed; the loop goes on until
    answers are complete again (Serve restarts the replica), or the deadline."""
    answers: list[dict] = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            status, body, elapsed = _post(client, base, Path(queries[i % len(queries)]))
            answers.append(
                {
                    "t": time.monotonic(),
                    "status": status,
                    "partial": body.get("partial"),
                    "missing": body.get("missing_shards"),
                    "coverage": body.get("coverage"),
                    "elapsed_s": elapsed,
                }
            )
            i += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        while len(answers) < 3:
            time.sleep(0.05)
        pids = _replica_pids(KILLED_SHARD)
        killed_at = time.monotonic()
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        recovered_at = None
        end = killed_at + deadline_s
        while time.monotonic() < end:
            after = [a for a in answers if a["t"] > killed_at]
            partials = [a for a in after if a["partial"]]
            complete_since = [a for a in after if partials and a["t"] > partials[-1]["t"]]
            if len(complete_since) >= 3:  # flagged partial, then complete again
                recovered_at = complete_since[0]["t"]
                break
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=120)
    return {
        "killed_pids": pids,
        "answers": [{**a, "t": round(a["t"] - killed_at, 3)} for a in answers],
        "recovered_after_s": round(recovered_at - killed_at, 3) if recovered_at else None,
    }


def _rebuild_under_traffic(client, base, queries, config: dict, run: dict) -> dict:
    """Queries in a loop while `selavpr index build` publishes a version without one place's third
    view (from a copy of the references: the queries keep their files); the loop goes on until the
    answers come from the new version."""
    answers: list[dict] = []
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            status, body, elapsed = _post(client, base, Path(queries[i % len(queries)]))
            answers.append(
                {
                    "status": status,
                    "partial": body.get("partial"),
                    "version": body.get("index_version"),
                    "paths": [m["path"] for m in body.get("matches", [])],
                    "elapsed_s": elapsed,
                }
            )
            i += 1

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        removed = Path(config["rebuild_references"]) / REMOVED_VIEW
        for image in removed.iterdir():
            image.unlink()
        removed.rmdir()
        command = [
            sys.executable,
            "-m",
            "app.cli",
            "index",
            "build",
            "--references",
            config["rebuild_references"],
        ]
        command += ["--index-dir", run["index_dir"], "--device", "cpu"]
        environment = {**os.environ, "SELAVPR_CACHE_DIR": config["cache_dir"]}
        build = subprocess.run(command, capture_output=True, text=True, timeout=300, env=environment)
        published = (
            json.loads(build.stdout.strip().splitlines()[-1])["version"] if build.returncode == 0 else None
        )
        end = time.monotonic() + 60
        while time.monotonic() < end and not any(a["version"] == published for a in answers[-3:]):
            time.sleep(0.2)
    finally:
        stop.set()
        worker.join(timeout=120)
    return {
        "build_returncode": build.returncode,
        "build_stderr": build.stderr[-2000:],
        "published": published,
        "answers": answers,
    }


def main(config_path: str, report_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    report: dict = {"runs": []}
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "SELAVPR_SHARD_TIMEOUT_S": str(config["shard_timeout_s"]),
        "SELAVPR_CACHE_DIR": config["cache_dir"],
        "RAY_TMPDIR": config["ray_tmp"],
    }
    for run in config["runs"]:
        started = time.monotonic()
        args = [
            "--engine", "ray",
            "--index-dir", run["index_dir"],
            "--references", config["references"],
            "--device", "cpu",
            "--ray-num-cpus", "2",
            "--replica-num-cpus", "0",
        ]  # fmt: skip
        log = Path(config["log_dir"]) / f"serve-{run['shards']}.log"
        entry: dict = {"shards": run["shards"]}
        with (
            serve_process(args, env=env, log=log, ready_s=300) as (base, _),
            httpx.Client(timeout=120) as client,
        ):
            entry["ready_s"] = round(time.monotonic() - started, 1)
            entry["ready"] = client.get(f"{base}/readyz").json()
            references = Path(config["references"])
            entry["compare"] = _compare_all(client, base, config["queries"], config["expected"], references)
            if run.get("kill"):
                entry["kill"] = _kill_under_traffic(client, base, config["queries"], config["recovery_s"])
                entry["compare_after"] = _compare_all(
                    client, base, config["queries"][:6], config["expected"], references
                )
                entry["rebuild"] = _rebuild_under_traffic(client, base, config["queries"], config, run)
                entry["metrics"] = [
                    line
                    for line in client.get(f"{base}/metrics").text.splitlines()
                    if line.startswith(("selavpr_shard_failures", "selavpr_shard_partial", "selavpr_partial"))
                ]
        entry["seconds"] = round(time.monotonic() - started, 1)
        report["runs"].append(entry)
        Path(report_path).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
