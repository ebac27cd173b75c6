"""A real `selavpr serve` process on a free loopback port, started and stopped the way users run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve_process(
    args: list[str],
    env: dict[str, str | None] | None = None,
    log: Path | None = None,
    ready_s: float = 90,
    console_script: bool = False,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """`selavpr serve --port P ARGS` -> (base URL, process) once /readyz answers 200; SIGTERM (then
    SIGKILL) on the way out. `env` adds variables to the environment (None removes one); the output goes
    to `log` when given, else to the process's stdout pipe. console_script: the installed `selavpr`
    command, as users run it (else `python -m app.cli`)."""
    port = free_port()
    cmd = [*selavpr_command(console_script), "serve", "--port", str(port), *args]
    environment = {**os.environ, **(env or {})}
    environment = {k: v for k, v in environment.items() if v is not None}
    out = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(cmd, env=environment, stdout=out, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_s
        while True:
            assert proc.poll() is None, _output(proc, log)
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in {ready_s} s:\n{_output(proc, log)}"
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        finally:
            if log:
                out.close()


def selavpr_command(console_script: bool = False) -> list[str]:
    """The installed `selavpr` script beside this interpreter (it imports app from PYTHONPATH first, so
    a checkout that sets it runs its own code), or `python -m app.cli`."""
    if console_script:
        return [str(Path(sys.executable).parent / "selavpr")]
    return [sys.executable, "-m", "app.cli"]


def _output(proc: subprocess.Popen, log: Path | None) -> str:
    return log.read_text() if log else proc.stdout.read()


def serve_args(refs: Path, index_dir: Path, checkpoint: Path | None = None) -> list[str]:
    """The usual flags: references, index and (unless the default weights) a checkpoint, on the CPU."""
    args = ["--references", str(refs), "--index-dir", str(index_dir), "--device", "cpu"]
    return args + (["--checkpoint", str(checkpoint)] if checkpoint else [])
