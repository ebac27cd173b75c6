"""A scenario module run the way the Ray tests need it: inside a network namespace that has only loopback
(`unshare -n`, as root), in a session of its own, and nothing it started left alive afterwards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def namespace_available() -> str | None:
    """None where a loopback-only namespace can be made here, else what is missing."""
    if os.geteuid() != 0:
        return "needs root for a private network namespace (unshare -n)"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs `{tool}`"
    return None


def require_isolated(*modules: str, extra: str) -> None:
    """Skip (fail under CI=true, whose set-up installs them) unless these modules import and a
    loopback-only namespace can be made. `extra`: what to install, for the message."""
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            if os.environ.get("CI"):
                pytest.fail(f"{extra} is not installed: `make install-dev` installs the ray extra")
            pytest.skip(f"{extra} is not installed (pip install -e '.[ray]')")
    missing = namespace_available()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(missing)
        pytest.skip(missing)


@dataclass
class IsolatedRun:
    returncode: int
    output: str  # stdout and stderr together
    leftovers: list[str]  # `pid command` of processes that outlived the scenario (then killed)
    seconds: float
    report: dict | None  # what the scenario wrote as its report, if it did


def run_isolated(module: str, config: dict, work: Path, timeout_s: float, grace_s: float = 10) -> IsolatedRun:
    """`python -m MODULE CONFIG REPORT` with `config` as JSON, in the namespace; processes still in its
    session `grace_s` after it ends are listed and killed."""
    (work / "config.json").write_text(json.dumps(config))
    report_path = work / "report.json"
    scenario = f"{sys.executable} -m {module} {work / 'config.json'} {report_path}"
    started = time.monotonic()
    proc = subprocess.Popen(
        ["unshare", "-n", "sh", "-c", f"ip link set lo up && exec {scenario}"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own session: whatever it leaves behind can be found by its id
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    finally:
        leftovers = _session_processes(proc.pid)
        deadline = time.monotonic() + grace_s
        while leftovers and time.monotonic() < deadline:  # processes that are still exiting
            time.sleep(0.5)
            leftovers = _session_processes(proc.pid)
        if leftovers:
            os.killpg(proc.pid, signal.SIGKILL)
    report = json.loads(report_path.read_text()) if report_path.exists() else None
    return IsolatedRun(proc.returncode, output, leftovers, time.monotonic() - started, report)


def _session_processes(sid: int) -> list[str]:
    """`pid command` of every process still in the session the scenario was started in."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 2) for line in out.splitlines() if line.strip()]
    return [f"{r[0]} {r[2] if len(r) > 2 else ''}" for r in rows if len(r) >= 2 and int(r[1]) == sid]
