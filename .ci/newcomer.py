"""The newcomer path, as the README tells it: `make serve` on a fresh clone, real HTTP, then the README's
own commands for localizing against your own photos.

Starts `make serve` (which installs the product with its own dependencies only, converts the default
weights and serves) on a free loopback port with a temporary data folder; waits for /healthz; adds
reference photos with locations over HTTP; rebuilds; localizes a photo of one of those places and checks
the answer; stops the server. Then it reads the `selavpr` commands from the README's "Localize against
your own photos" block and runs them as written in a folder laid out as that section says (photos and a
`locations.csv` in its format), and checks the printed answer. Bounded in time; on failure the server log
is printed. Standard library only: it runs before anything of the project is installed.

    python3 .ci/newcomer.py [--shared-data ../shared/data] [--timeout 1500]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
API_KEY = "newcomer-key"
PLACES = ("p0", "p2", "p4", "p6", "p8")  # views i0, i1 become references; i2 is the query of p4
README_SECTION = "## Localize against your own photos"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(method: str, url: str, body: bytes | None = None, headers: dict | None = None, timeout=60):
    """(status, JSON body) of one HTTP call; error statuses are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def multipart(files: list[tuple[str, Path]], fields: list[tuple[str, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        )
    for name, path in files:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{path.name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        )
        parts.append(head.encode() + path.read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post_image(url: str, path: Path) -> tuple[int, dict]:
    body, content_type = multipart([("image", path)], [])
    return request("POST", url, body, {"Content-Type": content_type})


def wait_for(check, what: str, deadline: float, server: subprocess.Popen) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited ({server.returncode}) while waiting for {what}")
        try:
            if check():
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        time.sleep(1)
    raise SystemExit(f"timed out waiting for {what}")


def newcomer_path(base: str, shared: Path, deadline: float, server: subprocess.Popen) -> None:
    wait_for(lambda: request("GET", f"{base}/healthz", timeout=5)[0] == 200, "/healthz", deadline, server)
    status, home = request("GET", f"{base}/", headers={"Accept": "application/json"})
    assert status == 200 and "next_steps" in home, (status, home)
    with urllib.request.urlopen(urllib.request.Request(f"{base}/", headers={"Accept": "text/html"})) as page:
        assert page.status == 200 and b"<html" in page.read(4096).lower(), "GET / serves no page"
    print(f"GET / -> the web page; as JSON: {home['status']}")
    status, body = post_image(f"{base}/localize", _view(shared, "p0", "i2"))
    assert status == 503 and "POST /index/images" in body["error"]["message"], (status, body)
    print(f"POST /localize before any reference -> 503: {body['error']['message']}")

    files, fields = [], []
    for k, place in enumerate(PLACES):
        for view in ("i0", "i1"):
            files.append(("image", _view(shared, place, view)))
            fields += [("lat", f"{-27.47 + 0.01 * k:.6f}"), ("lon", "153.02")]
    body, ctype = multipart(files, fields)
    headers = {"Content-Type": ctype, "X-API-Key": API_KEY}
    status, uploaded = request("POST", f"{base}/index/images", body, headers)
    assert status == 201 and len(uploaded["stored"]) == len(files), (status, uploaded)
    print(f"POST /index/images -> 201, {len(uploaded['stored'])} references stored")
    status, job = request("POST", f"{base}/index/rebuild", b"", {"X-API-Key": API_KEY})
    assert status == 202, (status, job)

    def built() -> bool:
        _, s = request("GET", f"{base}/index/status", timeout=10)
        if s["state"] == "failed":
            raise SystemExit(f"rebuild failed: {s['last_error']}")
        return s["state"] == "idle" and s["num_images"] == len(files)

    wait_for(built, "the rebuild", deadline, server)
    print(f"POST /index/rebuild -> indexed {len(files)} images")

    query = _view(shared, "p4", "i2")
    status, result = post_image(f"{base}/localize", query)
    assert status == 200, (status, result)
    top = result["matches"][0]
    expected = {_view(shared, "p4", v).name for v in ("i0", "i1")}
    assert top["name"] in expected, f"top match {top['name']} is not a view of p4 ({expected})"
    assert abs(result["location"]["lat"] - (-27.47 + 0.01 * 2)) < 1e-6, result["location"]
    print(
        f"POST /localize {query.name} -> top match {top['name']} ({top['mnn_matches']} MNN matches), "
        f"location {result['location']['lat']:.4f},{result['location']['lon']:.4f}, "
        f"{result['timings_ms']['total']:.0f} ms"
    )


def readme_commands() -> list[list[str]]:
    """The `selavpr` command lines of the README's first bash block under README_SECTION, as written."""
    text = (REPO / "README.md").read_text()
    assert README_SECTION in text, f"the README has no section {README_SECTION!r}"
    section = text.split(README_SECTION, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, f"no bash block under {README_SECTION!r}"
    assert "path,lat,lon" in block.group(1), "the README's locations.csv header changed"
    commands = [shlex.split(line) for line in block.group(1).splitlines() if "bin/selavpr " in line]
    assert [c[1:3] for c in commands] == [["index", "build"], ["localize", "query.jpg"]], commands
    return commands


def readme_cli_path(shared: Path, workdir: Path, env: dict, deadline: float) -> None:
    """The README's commands, run in a folder laid out as it says: photos/ with a locations.csv, query.jpg."""
    photos = workdir / "photos"
    photos.mkdir(parents=True)
    rows = ["path,lat,lon"]
    for k, place in enumerate(PLACES):
        for view in ("i0", "i1"):
            name = f"{place}-{view}.jpg"
            shutil.copy(_view(shared, place, view), photos / name)
            rows.append(f"{name},{48.8584 + 0.001 * k:.6f},2.294500")
    (photos / "locations.csv").write_text("\n".join(rows) + "\n")
    shutil.copy(_view(shared, "p4", "i2"), workdir / "query.jpg")
    outputs = []
    for command in readme_commands():
        argv = [str(REPO / command[0]), *command[1:]]  # .venv/bin/selavpr of this clone, as the README says
        timeout = max(deadline - time.monotonic(), 1)
        done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}: {done.stderr[-4000:]}"
        outputs.append(done.stdout)
        print(f"README: {' '.join(command)} -> exit 0")
    report = json.loads(outputs[0].strip().splitlines()[-1])
    assert report["total"] == 2 * len(PLACES) and report["skipped"] == 0, report
    answer = json.loads(outputs[1])
    top = answer["matches"][0]
    assert top["name"].startswith("p4-"), f"top match {top['name']} is not a view of p4"
    assert abs(answer["location"]["lat"] - (48.8584 + 0.002)) < 1e-6, answer["location"]
    print(f"README: localize query.jpg -> {top['name']}, confidence {answer['location']['confidence']}")


def _view(shared: Path, place: str, view: str) -> Path:
    return next((shared / "matching_triplets" / place / view).glob("*.jpg"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    shared = os.environ.get("SELAVPR_SHARED_DATA", REPO.parent / "shared" / "data")
    parser.add_argument("--shared-data", type=Path, default=Path(shared))
    parser.add_argument("--timeout", type=float, default=1500, help="seconds for the whole path")
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="selavpr-newcomer-") as tmp:
        env = {
            **os.environ,
            "SELAVPR_PORT": str(port),
            "SELAVPR_HOST": "127.0.0.1",
            "SELAVPR_INDEX_DIR": f"{tmp}/data/index",
            "SELAVPR_REFERENCES": f"{tmp}/data/references",
            "SELAVPR_CACHE_DIR": f"{tmp}/cache",
            "SELAVPR_API_KEY": API_KEY,
        }
        log_path = Path(tmp) / "serve.log"
        with open(log_path, "w") as log:
            print(f"make serve on 127.0.0.1:{port} (log: {log_path})", flush=True)
            server = subprocess.Popen(
                ["make", "serve"],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                newcomer_path(f"http://127.0.0.1:{port}", args.shared_data, deadline, server)
                _stop(server)
                readme_cli_path(args.shared_data, Path(tmp) / "own-photos", env, deadline)
            except (AssertionError, SystemExit, Exception) as exc:
                print(
                    f"NEWCOMER PATH FAILED: {type(exc).__name__}: {exc}\n--- server log ---", file=sys.stderr
                )
                print(log_path.read_text()[-20000:], file=sys.stderr)
                return 1
            finally:
                _stop(server)
    print("newcomer path: ok")
    return 0


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


if __name__ == "__main__":
    sys.exit(main())
