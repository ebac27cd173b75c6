"""Driver of tests/e2e/test_ray_cluster.py, run inside a loopback-only network namespace (`unshare -n`):
`selavpr serve --engine ray` on a local Ray cluster, every query compared with the single-process answer,
then a shard replica hung (SIGSTOP) and killed mid-traffic, then references uploaded and rebuilt under
traffic; and a cluster too small for explicit requests. Writes a JSON report; the test asserts on it.

    python -m tests.e2e.ray_cluster_scenario CONFIG.json REPORT.json
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tests.servers import selavpr_command, serve_process

KILLED_SHARD = "shard-01"
API_KEY = "scenario-key"
REPO = Path(__file__).resolve().parents[2]
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


@contextlib.contextmanager
def _traffic(client, base, queries):
    """Queries in a loop on a thread while the block runs; yields the list its answers are appended to
    (the time, status, partial flag, missing shards, coverage, index version and latency of each)."""
    answers: list[dict] = []
    stop = threading.Event()

    def loop() -> None:
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
                    "version": body.get("index_version"),
                    "elapsed_s": elapsed,
                }
            )
            i += 1

    worker = threading.Thread(target=loop)
    worker.start()
    try:
        yield answers
    finally:
        stop.set()
        worker.join(timeout=120)


def _first_answers(answers: list[dict], count: int = 3) -> None:
    while len(answers) < count:
        time.sleep(0.05)


def _kill_under_traffic(client, base, queries, deadline_s: float) -> dict:
    """Queries in a loop; after a few, the shard's replica process is killed; the loop goes on until
    answers are complete again (Serve restarts the replica), or the deadline."""
    with _traffic(client, base, queries) as answers:
        _first_answers(answers)
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
    return {
        "killed_pids": pids,
        "answers": [{**a, "t": round(a["t"] - killed_at, 3)} for a in answers],
        "recovered_after_s": round(recovered_at - killed_at, 3) if recovered_at else None,
    }


def _hang_under_traffic(client, base, queries, hang_s: float, deadline_s: float) -> dict:
    """Queries in a loop; the shard's replica processes are stopped (SIGSTOP: alive, silent) for
    hang_s, then continued; the loop goes on until answers are complete again, or the deadline."""
    pids: list[int] = []
    with _traffic(client, base, queries) as answers:
        try:
            _first_answers(answers)
            pids = _replica_pids(KILLED_SHARD)
            stopped_at = time.monotonic()
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            time.sleep(hang_s)
            continued_at = time.monotonic()
            for pid in pids:
                _signal_if_alive(pid, signal.SIGCONT)
            recovered_at = None
            while time.monotonic() < continued_at + deadline_s:
                complete = [a for a in answers if a["t"] > continued_at and not a["partial"]]
                if len(complete) >= 3:
                    recovered_at = complete[0]["t"]
                    break
                time.sleep(0.2)
        finally:
            for pid in pids:
                _signal_if_alive(pid, signal.SIGCONT)
    return {
        "stopped_pids": pids,
        "hang_s": round(continued_at - stopped_at, 3),
        "answers": [{**a, "t": round(a["t"] - stopped_at, 3)} for a in answers],
        "recovered_after_s": round(recovered_at - continued_at, 3) if recovered_at else None,
    }


def _settle(client, base, timeout_s: float, steady_s: float = 5.0) -> float | None:
    """Seconds until /readyz has listed no shard without a replica for steady_s (Serve may replace a
    restarted replica once more), or None."""
    started = time.monotonic()
    steady_since = None
    while time.monotonic() < started + timeout_s:
        ready = client.get(f"{base}/readyz").json()
        if ready.get("shards_without_replica") == []:
            steady_since = steady_since or time.monotonic()
            if time.monotonic() - steady_since >= steady_s:
                return round(time.monotonic() - started, 1)
        else:
            steady_since = None
        time.sleep(0.5)
    return None


def _signal_if_alive(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # Serve replaced the silent replica meanwhile
        os.kill(pid, sig)


def _rebuild_under_traffic(client, base, queries, config: dict) -> dict:
    """Queries in a loop while a new reference photo (a shared image mirrored) is uploaded and
    POST /index/rebuild builds and rolls out the next version; the loop goes on until the answers come
    from it. Then the new photo is searched for."""
    key = {"X-API-Key": API_KEY}
    new_photo = Path(config["new_photo"]).read_bytes()
    before = client.get(f"{base}/index/status").json()["index_version"]
    statuses: list[dict] = []
    with _traffic(client, base, queries) as answers:
        unauthorised = client.post(f"{base}/index/rebuild").status_code
        files = {"image": ("mirrored.jpg", new_photo, "image/jpeg")}
        upload = client.post(
            f"{base}/index/images", files=files, data={"lat": "35.68", "lon": "139.76"}, headers=key
        )
        started = client.post(f"{base}/index/rebuild", headers=key)
        end = time.monotonic() + 300
        while time.monotonic() < end:
            status = client.get(f"{base}/index/status").json()
            statuses.append({k: status.get(k) for k in ("state", "progress", "index_version", "last_error")})
            report = status.get("last_report")
            published = report["version"] if report and status["state"] != "running" else None
            rolled = published is not None and status["index_version"] == published
            if rolled and any(a["version"] == published for a in answers[-3:]):
                break
            time.sleep(0.5)
    found = client.post(
        f"{base}/localize", files={"image": ("q.jpg", new_photo, "image/jpeg")}, data={"top_k": "3"}
    ).json()
    return {
        "unauthorised_status": unauthorised,
        "upload_status": upload.status_code,
        "rebuild_status": started.status_code,
        "before": before,
        "published": (status.get("last_report") or {}).get("version"),
        "last_error": status.get("last_error"),
        "statuses": statuses[-5:],
        "progress_seen": any(s["progress"] for s in statuses),
        "answers": answers,
        "found": {
            "version": found.get("index_version"),
            "top": [m["name"] for m in found.get("matches", [])],
        },
    }


def _too_small(config: dict, env: dict, run: dict) -> dict:
    """`serve --engine ray --replica-num-cpus 1` on a 2-CPU cluster: it must exit, not wait."""
    command = [
        *selavpr_command(console_script=True),
        "serve",
        "--engine",
        "ray",
        "--index-dir",
        run["index_dir"],
    ]
    command += ["--references", config["references"], "--device", "cpu", "--replica-num-cpus", "1"]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, env={**os.environ, **env})
    errors = [line for line in done.stderr.splitlines() if line.startswith("selavpr serve: error:")]
    return {"returncode": done.returncode, "seconds": round(time.monotonic() - started, 1), "errors": errors}


def main(config_path: str, report_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    report: dict = {"runs": []}
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "SELAVPR_SHARD_TIMEOUT_S": str(config["shard_timeout_s"]),
        "SELAVPR_CACHE_DIR": config["cache_dir"],
        "SELAVPR_API_KEY": API_KEY,
        "RAY_TMPDIR": config["ray_tmp"],
        # the installed `selavpr` script then imports this checkout, as it does for a developer
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    for run in config["runs"]:
        started = time.monotonic()
        entry: dict = {"name": run["name"], "shards": run["shards"]}
        if run.get("too_small"):
            entry["too_small"] = _too_small(config, env, run)
            report["runs"].append(entry)
            Path(report_path).write_text(json.dumps(report, indent=1))
            continue
        args = ["--engine", "ray", "--index-dir", run["index_dir"], "--references", run["references"]]
        args += ["--device", "cpu", *run.get("flags", [])]
        log = Path(config["log_dir"]) / f"serve-{run['name']}.log"
        with (
            serve_process(args, env=env, log=log, ready_s=300, console_script=run["console_script"]) as (
                base,
                _,
            ),
            httpx.Client(timeout=120) as client,
        ):
            entry["ready_s"] = round(time.monotonic() - started, 1)
            entry["ready"] = client.get(f"{base}/readyz").json()
            references = Path(config["references"])
            entry["compare"] = _compare_all(client, base, config["queries"], config["expected"], references)
            if run.get("faults"):
                entry["hang"] = _hang_under_traffic(
                    client, base, config["queries"], config["hang_s"], config["recovery_s"]
                )
                entry["kill"] = _kill_under_traffic(client, base, config["queries"], config["recovery_s"])
                entry["settled_s"] = _settle(client, base, config["recovery_s"])
                entry["compare_after"] = _compare_all(
                    client, base, config["queries"][:6], config["expected"], references
                )
                entry["rebuild"] = _rebuild_under_traffic(client, base, config["queries"], config)
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
