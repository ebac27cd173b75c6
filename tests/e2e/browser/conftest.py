"""A real `selavpr serve` process with the default weights and the shared images as references, and
Debian's Chromium driven by Playwright. Without Chromium the tests skip, except under CI (CI=true),
where they fail: CI installs it with `make browser`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO
from tests.e2e.browser.pages import open_page
from tests.servers import serve_args, serve_process

CHROMIUM = Path(os.environ.get("SELAVPR_CHROMIUM", "/usr/bin/chromium"))
# As root Chromium needs --no-sandbox; the rest keep it from calling any host of its own accord.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = REPO / "out" / "screenshots"
API_KEY = "browser-test-key"
UPLOAD_LIMIT = 8 * 2**20
# place K of the shared triplets stands ~110 m north of place K-1 (the images have no GPS of their own)
BASE_LAT, BASE_LON, STEP_DEG = -27.4770, 153.0280, 0.001
REFERENCE_VIEWS = ("i0", "i2")  # i1 of each place is left out to serve as a query


def _unavailable() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "the playwright package is missing (make install-dev)"
    if not CHROMIUM.is_file():
        return f"Chromium not found at {CHROMIUM} (make browser installs it; SELAVPR_CHROMIUM overrides)"
    return None


@pytest.fixture(scope="session", autouse=True)
def require_chromium() -> None:
    reason = _unavailable()
    if reason is None:
        from playwright.sync_api import expect

        expect.set_options(timeout=30_000)  # a CPU forward on a busy 2-core machine takes seconds
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"browser tests must run in CI: {reason}")
    pytest.skip(reason)


# Package scope, not session: the sync API runs an event loop in this thread while it is started, and the
# asyncio tests after this package need the thread free of it again.
@pytest.fixture(scope="package")
def playwright(require_chromium) -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright) -> Iterator:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_FLAGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser) -> Iterator:
    """A desktop-sized page in a fresh context (no cache, no sessionStorage)."""
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    yield context.new_page()
    context.close()


@pytest.fixture(scope="session")
def screenshots() -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


@dataclass
class Server:
    base: str
    references: Path
    queries: list[Path]  # one unindexed view per place, place order
    log: Path

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.base + path, timeout=60, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.base + path, timeout=120, **kwargs)


@pytest.fixture(scope="package")
def server(tmp_path_factory, shared_data, require_chromium) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("web")
    refs, queries, rows = root / "refs", [], ["path,lat,lon"]
    for place in sorted((shared_data / "matching_triplets").glob("p*")):
        k = int(place.name[1:])
        for view in REFERENCE_VIEWS:
            (image,) = (place / view).glob("*.jpg")
            target = refs / place.name / view / image.name
            target.parent.mkdir(parents=True)
            shutil.copy(image, target)
            rows.append(f"{target.relative_to(refs).as_posix()},{BASE_LAT + STEP_DEG * k:.6f},{BASE_LON:.6f}")
        queries += sorted((place / "i1").glob("*.jpg"))
    (refs / "locations.csv").write_text("\n".join(rows) + "\n")
    log = root / "serve.log"
    args = [*serve_args(refs, root / "index"), "--max-upload-bytes", str(UPLOAD_LIMIT)]
    # no SELAVPR_TILE_URL: the default, no tiles, nothing fetched from outside; the first start converts
    # the default weights into a fresh cache, then indexes
    env = {"SELAVPR_API_KEY": API_KEY, "SELAVPR_TILE_URL": None}
    with serve_process(args, env, log=log, ready_s=300) as (base, _):
        yield Server(base, refs, queries, log)


@pytest.fixture
def site(page, server) -> Iterator:
    """The page, opened on the server, with every request leaving its origin aborted; none may occur, nor
    a script error or a Content-Security-Policy violation."""
    guard = open_page(page, server.base)
    yield page
    assert guard.problems(page) == [], "requests off the origin, script errors or CSP violations"
