"""What `make install` users get: the real console script with the development-only packages unimportable.

A `make serve` once crashed on every fresh machine because the CLI imported a dev-only package while the
tests ran in the dev environment. Here the `selavpr` script runs in a child process in which every package
of the `dev` extra raises ImportError, so that class of break fails this test.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def dev_only_modules() -> set[str]:
    """What `make install` leaves out: the dev extra, and the optional extras (ray) it does not install."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    product = {_module(d) for d in meta["dependencies"]}
    extras = meta["optional-dependencies"]
    optional = {_module(d) for name in ("dev", "ray") for d in extras[name]}
    return (optional - product) | {"bench", "tests"}  # development folders, not shipped either


def _module(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement)[0].strip().lower().replace("-", "_")


RUNNER = textwrap.dedent(
    """
    import runpy, sys
    BLOCKED = set(sys.argv[1].split(","))

    # Wraps a finder so that the blocked packages look uninstalled, as after `make install`:
    # importing them raises ModuleNotFoundError and find_spec answers None.
    class Hidden:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
    for name in [m for m in sys.modules if m.split(".")[0] in BLOCKED]:
        del sys.modules[name]
    script, commands = sys.argv[2], [c.split() for c in sys.argv[3:]]
    for argv in commands:
        sys.argv = ["selavpr", *argv]
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as exc:
            if exc.code not in (0, None):
                print(f"FAILED: selavpr {' '.join(argv)} exited {exc.code}")
                raise
        print(f"OK: selavpr {' '.join(argv)}")
    import uvicorn  # what `selavpr serve` imports when it starts
    from app.main import create_app
    create_app()
    print("OK: app")
    """
)


def test_every_command_runs_without_the_dev_packages(tmp_path):
    script = Path(sys.executable).parent / "selavpr"
    if not script.is_file():
        pytest.fail(f"the console script {script} is missing: run `make install`")
    from app.cli import COMMANDS

    names = [c.__name__.rsplit(".", 1)[-1] for c in COMMANDS]
    names = ["eval" if n == "evaluate" else n for n in names]
    commands = ["--help", *(f"{name} --help" for name in names), "weights default"]
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, ",".join(sorted(dev_only_modules())), str(script), *commands],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,  # not the repository: nothing may be imported from the source tree by accident
        env={"SELAVPR_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("OK: selavpr") == len(commands) and "OK: app" in result.stdout


def test_dockerfiles_copy_exactly_the_shipped_packages():
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    shipped = {p.rstrip("*") for p in meta["tool"]["setuptools"]["packages"]["find"]["include"]}
    for dockerfile in sorted((REPO / "docker").glob("Dockerfile.*")):
        copied = set(re.findall(r"^COPY (\w+) \./\1$", dockerfile.read_text(), flags=re.M))
        assert copied == shipped, (
            f"{dockerfile.name} copies {sorted(copied)}, the package ships {sorted(shipped)}"
        )


@pytest.mark.parametrize(
    ("argv", "needs"),
    [
        (["serve", "--engine", "ray", "--index-dir", "idx"], "Ray Serve"),
        (["index", "build", "--engine", "ray", "--references", "refs", "--index-dir", "idx"], "Ray Data"),
    ],
)
def test_engine_ray_without_the_ray_extra_says_how_to_install_it(tmp_path, argv, needs):
    script = Path(sys.executable).parent / "selavpr"
    runner = RUNNER.split("script, commands")[0] + textwrap.dedent(
        """
        import runpy
        sys.argv = ["selavpr", *ARGV]
        try:
            runpy.run_path(sys.argv_script, run_name="__main__")
        except SystemExit as exc:
            print(f"EXIT {exc.code}")
        """
    ).replace("sys.argv_script", repr(str(script))).replace("ARGV", repr(argv))
    result = subprocess.run(
        [sys.executable, "-c", runner, ",".join(sorted(dev_only_modules()))],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={"SELAVPR_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"},
    )
    assert "EXIT 2" in result.stdout, result.stdout[-2000:] + result.stderr[-2000:]
    assert f"--engine ray needs {needs}" in result.stderr and 'pip install -e ".[ray]"' in result.stderr
