"""The Localize view in Chromium against a real server: pick, drop, phone camera, why-this-match,
error messages, and what a first visit costs."""

from __future__ import annotations

import io
import json
import re

from PIL import Image
from playwright.sync_api import expect

from tests.e2e.browser.conftest import SCREENSHOTS, UPLOAD_LIMIT
from tests.e2e.browser.pages import OffOrigin, drop_file, open_page

SCORE = re.compile(r"score \d\.\d{3}")


def localize_api(server, path, top_k: int = 5) -> dict:
    response = server.post(
        "/localize", files={"image": (path.name, path.read_bytes())}, data={"top_k": top_k}
    )
    assert response.status_code == 200, response.text
    return response.json()


def expect_matches(page, expected: dict) -> None:
    matches = page.locator("#matches .match")
    expect(matches).to_have_count(len(expected["matches"]), timeout=60_000)
    assert [int(i) for i in matches.evaluate_all("els => els.map(e => e.dataset.id)")] == [
        m["id"] for m in expected["matches"]
    ]
    for match, card in zip(expected["matches"], matches.all(), strict=True):
        expect(card.locator(".score")).to_have_text(f"score {match['global_score']:.3f}")
        expect(card.locator(".mnn")).to_have_text(f"{match['mnn_matches']} MNN")
        expect(card.locator(".distance")).to_have_text(re.compile(r"\d+ m away|km away"))
    # thumbnails loaded from the server, resized there
    widths = matches.locator("img").evaluate_all(
        "imgs => Promise.all(imgs.map(i => i.decode().then(() => i.naturalWidth)))"
    )
    assert all(0 < w <= 320 for w in widths)


def test_pick_a_file_and_see_matches_map_and_timings(site, server, screenshots):
    query = server.queries[3]
    expected = localize_api(server, query)
    site.set_input_files("#query-file", str(query))
    expect_matches(site, expected)
    assert expected["matches"][0]["path"].startswith("p3/")  # the right place, first
    expect(site.locator("#query-preview")).to_have_attribute("src", re.compile("^blob:"))
    expect(site.locator("#estimate")).to_contain_text(f"{expected['location']['lat']:.5f}")
    expect(site.locator("#map .confidence-circle")).to_have_count(1)
    expect(site.locator("#map .leaflet-marker-icon")).to_have_count(1)
    expect(site.locator("#map-note")).to_be_visible()  # no tile URL set: plain background and a note
    expect(site.locator("#timings")).to_contain_text("total")
    expect(site.locator("#timings")).to_contain_text("round trip")
    site.screenshot(path=screenshots / "localize-desktop.png", full_page=True)

    site.select_option("#top-k", "3")
    site.set_input_files("#query-file", str(server.queries[5]))
    expect_matches(site, localize_api(server, server.queries[5], top_k=3))


def test_drag_and_drop_a_photo(site, server):
    query = server.queries[7]
    drop_file(site, "#drop-zone", query)
    expect_matches(site, localize_api(server, query))
    expect(site.locator("#query-caption")).to_contain_text(query.name)


def test_phone_layout_with_the_camera_input(browser, playwright, server, screenshots):
    context = browser.new_context(**playwright.devices["Pixel 7"])
    page = context.new_page()
    guard = open_page(page, server.base)
    camera = page.locator("#camera-file")
    expect(camera).to_have_attribute("capture", "environment")
    expect(camera).to_have_attribute("accept", "image/*")
    width = page.evaluate("innerWidth")
    assert page.locator("label.camera").bounding_box()["width"] > 0.8 * width  # a big button on a phone
    camera.set_input_files(str(server.queries[1]))
    expect_matches(page, localize_api(server, server.queries[1]))
    # one column: the map sits under the photo, nothing scrolls sideways
    query_box, map_box = page.locator("#query-preview").bounding_box(), page.locator("#map").bounding_box()
    assert map_box["y"] >= query_box["y"] + query_box["height"]
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    page.screenshot(path=screenshots / "localize-phone.png", full_page=True)
    assert guard.problems(page) == []
    context.close()


def test_why_this_match_draws_the_endpoints_pairs(site, server, screenshots):
    query = server.queries[0]
    site.set_input_files("#query-file", str(query))
    first = site.locator("#matches .match").first
    expect(first).to_be_visible(timeout=60_000)
    reference_id = first.get_attribute("data-id")
    first.locator("button").click()
    version, cap = site.evaluate("[state.result.index_version, PAIRS_DRAWN]")
    answer = server.post(
        "/localize/pairs",
        files={"image": (query.name, query.read_bytes())},
        data={"reference_id": reference_id, "index_version": version, "max_pairs": str(cap)},
    ).json()
    assert answer["mnn_matches"] > cap and len(answer["pairs"]) == cap  # capped and thinned
    expect(first.locator(".mnn")).to_have_text(f"{answer['mnn_matches']} MNN")  # what re-ranking counted
    expect(site.locator("#pairs-svg line")).to_have_count(len(answer["pairs"]), timeout=60_000)
    expect(site.locator("#pairs-summary")).to_contain_text(
        f"{answer['mnn_matches']} mutual nearest-neighbour"
    )
    first_line = site.locator("#pairs-svg line").first
    scale = 480 / answer["query_size"]["height"]
    assert abs(float(first_line.get_attribute("x1")) - answer["pairs"][0]["query"][0] * scale) < 0.01
    images = site.locator("#pairs-svg image")
    expect(images).to_have_count(2)
    assert images.nth(1).get_attribute("href").startswith(f"/index/references/{reference_id}/image")
    site.wait_for_load_state("networkidle")
    site.locator("#pairs-view").screenshot(path=screenshots / "why-this-match.png")


def test_readable_errors_for_a_text_file_a_broken_image_and_an_oversize_file(site, server, screenshots):
    message = site.locator("#localize-message")
    site.set_input_files(
        "#query-file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}]
    )
    expect(message).to_contain_text("not an image the service accepts")
    site.screenshot(path=screenshots / "error-text-file.png")

    truncated = server.queries[2].read_bytes()[:3000]
    site.set_input_files(
        "#query-file", files=[{"name": "cut.jpg", "mimeType": "image/jpeg", "buffer": truncated}]
    )
    expect(message).to_contain_text("could not be read as an image")

    posts = []
    site.on("request", lambda r: posts.append(r.url) if r.method == "POST" else None)
    big = {"name": "huge.jpg", "mimeType": "image/jpeg", "buffer": b"\xff\xd8" + bytes(UPLOAD_LIMIT)}
    site.set_input_files("#query-file", files=[big])
    expect(message).to_have_text(
        "huge.jpg is 8.0 MB; the limit is 8.0 MB (8,388,610 bytes; at most 8,388,608). It was not sent."
    )
    site.screenshot(path=screenshots / "error-oversize.png")
    assert posts == []


def test_server_refusals_read_as_sentences(site, server):
    """413/503 cannot be provoked at will from a healthy server and a page that checks sizes first:
    here the answers are replayed as the service words them."""
    message = site.locator("#localize-message")
    answers = {
        413: ("payload_too_large", "request body over 8,454,144 bytes", "too large for the service"),
        503: ("unavailable", "the model is loading", "not ready yet (the model is loading). Try again"),
    }
    for status, (kind, text, shown) in answers.items():
        body = json.dumps({"error": {"status": status, "type": kind, "message": text}})
        site.route("**/localize", replay(status, body))
        site.set_input_files("#query-file", str(server.queries[4]))
        expect(message).to_contain_text(shown)
        site.unroute("**/localize")


def replay(status: int, body: str):
    return lambda route: route.fulfill(status=status, body=body, content_type="application/json")


def test_first_visit_page_weight(browser, server):
    """Bytes a first visit transfers (headers and bodies, compressed as sent), written to out/."""
    context = browser.new_context()
    page = context.new_page()
    responses = []
    page.on("requestfinished", lambda request: responses.append(request))
    open_page(page, server.base)
    page.wait_for_load_state("networkidle")
    sizes = {r.url.removeprefix(server.base): r.sizes() for r in responses}
    total = sum(s["responseBodySize"] + s["responseHeadersSize"] for s in sizes.values())
    report = {
        "bytes_transferred": total,
        "requests": len(sizes),
        "by_url": {u: s["responseBodySize"] + s["responseHeadersSize"] for u, s in sizes.items()},
    }
    (SCREENSHOTS.parent / "page-weight.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    context.close()
    assert "/static/vendor/leaflet/leaflet.js" in sizes
    assert total < 150_000, report  # Leaflet gzipped is most of it


def test_with_a_tile_url_the_map_draws_tiles_and_their_attribution(browser, server, screenshots):
    """The tile setting as the page receives it, pointed at this origin (no outside host is reachable
    here): tiles are requested from it and the attribution is shown instead of the plain-map note."""
    config = server.get("/ui/config").json()
    config["tiles"] = {"url": server.base + "/tiles/{z}/{x}/{y}.png", "attribution": "© Test Tiles"}
    tile = _grey_png()
    tiles_served = []
    page = browser.new_page()
    guard = OffOrigin(server.base)
    guard.watch(page)
    page.route("**/ui/config", lambda route: route.fulfill(json=config))
    page.route(
        "**/tiles/**",
        lambda route: (
            tiles_served.append(route.request.url),
            route.fulfill(body=tile, content_type="image/png"),
        ),
    )
    page.goto(server.base + "/")
    page.wait_for_selector("body[data-ready=true]")
    page.set_input_files("#query-file", str(server.queries[2]))
    expect(page.locator("#map .leaflet-tile-loaded").first).to_be_visible(timeout=60_000)
    expect(page.locator("#map .leaflet-control-attribution")).to_contain_text("© Test Tiles")
    expect(page.locator("#map-note")).to_be_hidden()
    page.screenshot(path=screenshots / "localize-with-tiles.png")
    assert guard.problems(page) == []
    page.close()
    assert tiles_served and all("/tiles/" in url for url in tiles_served)


def _grey_png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (256, 256), (200, 210, 200)).save(out, "PNG")
    return out.getvalue()


def test_an_answer_below_the_chosen_probability_shows_an_unknown_place(site, server):
    query = server.queries[4]
    response = server.post(
        "/localize",
        files={"image": (query.name, query.read_bytes())},
        data={"top_k": 5, "min_probability": "0.95"},
    )
    expected = response.json()
    site.select_option("#min-probability", "0.95")
    site.set_input_files("#query-file", str(query))
    # the matches are listed either way
    expect(site.locator("#matches .match")).to_have_count(len(expected["matches"]), timeout=60_000)
    estimate = site.locator("#estimate")
    if expected["status"] == "unknown":
        expect(estimate).to_contain_text("Unknown place")
        expect(estimate).to_have_class(re.compile("unknown"))
        expect(site.locator("#map .confidence-circle")).to_have_count(0)
    else:
        expect(estimate).to_contain_text(f"probability {expected['probability'] * 100:.0f} %")
    site.select_option("#min-probability", "")
