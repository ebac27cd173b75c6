"""Driver of tests/e2e/test_ray_build.py, run inside a loopback-only network namespace (`unshare -n`): Ray
Data builds of a reference folder, (1) through the CLI (`index build --engine ray`, a local cluster of
its own), (2) again with nothing changed and (3) after one image is added, both through the Python API
in one local cluster. Writes what it saw as JSON; the test compares the indexes it left behind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from index_builder.builder import BuildConfig, BuildProgress, build_index, encoding_identity
from index_builder.ray_build import RayBuildOptions, RayDataEncoder, ray_session
from model.extractor import FeatureExtractor
from model.options import ModelOptions

REPO = Path(__file__).resolve().parents[2]


def main(config_path: str, report_path: str) -> None:
    config = json.loads(Path(config_path).read_text())
    os.environ |= {"RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": config["ray_tmp"]}
    refs, index_dir = Path(config["references"]), Path(config["index_dir"])
    report: dict = {}

    started = time.monotonic()
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "app.cli",
            "index",
            "build",
            "--references",
            str(refs),
            "--index-dir",
            str(index_dir),
            "--checkpoint",
            config["checkpoint"],
            "--device",
            "cpu",
            "--batch-size",
            "2",
            "--engine",
            "ray",
            "--ray-num-cpus",
            "2",
            "--ray-actors",
            "2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report["cli"] = {
        "returncode": cli.returncode,
        "stdout": cli.stdout[-3000:],
        "stderr": cli.stderr[-5000:],
        "seconds": round(time.monotonic() - started, 1),
    }
    if cli.returncode != 0:
        Path(report_path).write_text(json.dumps(report, indent=1))
        return
    shutil.copytree(index_dir, config["first_copy"])  # the first version as it was, for the comparison

    extractor = FeatureExtractor.from_checkpoint(config["checkpoint"], "cpu")
    options = RayBuildOptions(num_cpus=2, actors=2, actor_cpus=1)
    spec = ModelOptions(checkpoint=config["checkpoint"], device="cpu")
    build = BuildConfig(
        references=refs,
        index_dir=index_dir,
        batch_size=2,
        model=ModelOptions(checkpoint=config["checkpoint"]),
    )
    with ray_session(options):
        encoder = RayDataEncoder(spec, encoding_identity(extractor, build.local_dtype), options)
        for step in ("unchanged", "added"):
            if step == "added":
                shutil.copy(config["new_image"], refs / "added.jpg")
            events: list[dict] = []
            began = time.monotonic()
            built = build_index(build, extractor, events_to(events), encoder=encoder)
            encoding = [e for e in events if e["phase"] == "encoding"]
            report[step] = {
                "report": built.summary() | {"skipped_files": built.skipped_files},
                "encoding_progress": encoding[-1] if encoding else None,
                "seconds": round(time.monotonic() - began, 1),
            }
    Path(report_path).write_text(json.dumps(report, indent=1))


def events_to(events: list[dict]) -> Callable[[BuildProgress], None]:
    return lambda progress: events.append(progress.to_dict())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
