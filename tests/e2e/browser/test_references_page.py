"""The References view in Chromium against a real server: status, browsing, adding photos with a
location (typed, or read from EXIF GPS in the browser), the API key dialog, a rebuild with progress."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tests.e2e.browser.conftest import API_KEY

TOKYO = (35.6593, 139.6984)  # the README's GPS of tokyo_query.jpg
# records what the progress line showed while the rebuild ran (the page polls; nothing may be missed)
WATCH_PROGRESS = """() => {
    window.progressSeen = [];
    new MutationObserver(() => {
        const box = document.getElementById("rebuild-box");
        if (!box.hidden) window.progressSeen.push(document.getElementById("rebuild-phase").textContent);
    }).observe(document.getElementById("view-references"),
               { subtree: true, childList: true, attributes: true, characterData: true });
}"""


def test_status_browse_add_with_locations_and_rebuild(site, server, shared_data, screenshots):
    before = server.get("/index/status").json()
    site.click("#tab-references")
    expect(site.locator("#index-state")).to_have_text("idle")
    expect(site.locator("#index-version")).to_have_text(before["index_version"])
    expect(site.locator("#index-count")).to_have_text(str(before["num_images"]))
    expect(site.locator("#index-report")).to_contain_text(f"{before['num_images']} images")
    cards = site.locator("#ref-grid .ref")
    expect(cards).to_have_count(min(before["num_images"], 24))
    expect(cards.first.locator(".where")).to_contain_text("-27.47700, 153.02800")
    assert cards.first.locator("img").evaluate("i => i.decode().then(() => i.naturalWidth)") == 320
    site.screenshot(path=screenshots / "references.png", full_page=True)

    tokyo = shared_data / "tokyo_pair"
    site.set_input_files("#ref-files", [str(tokyo / "tokyo_query.jpg"), str(tokyo / "tokyo_db.png")])
    rows = site.locator("#ref-table tbody tr")
    expect(rows).to_have_count(2)
    from_exif, typed = rows.nth(0), rows.nth(1)
    expect(from_exif).to_contain_text("location from the photo's GPS data")
    lat, lon = (float(from_exif.locator(f"input.{k}").input_value()) for k in ("lat", "lon"))
    assert abs(lat - TOKYO[0]) < 1e-3 and abs(lon - TOKYO[1]) < 1e-3
    expect(typed).to_contain_text("no GPS data")
    typed.locator("input.lat").fill("35.6594")
    typed.locator("input.lon").fill("139.6985")
    site.screenshot(path=screenshots / "references-add.png", full_page=True)

    site.evaluate(WATCH_PROGRESS)
    site.click("#upload")
    dialog = site.locator("#key-dialog")  # the server wants a key; the page asks once
    expect(dialog).to_be_visible()
    site.fill("#key-input", API_KEY)
    site.click("#key-save")
    expect(site.locator("#upload-message")).to_have_text("2 of 2 uploaded.", timeout=60_000)
    expect(site.locator("#index-count")).to_have_text(str(before["num_images"] + 2), timeout=120_000)
    expect(site.locator("#index-state")).to_have_text("idle")
    assert site.evaluate("sessionStorage.getItem('selavpr.apiKey')") == API_KEY
    seen = site.evaluate("window.progressSeen")
    # The bar was shown while the rebuild ran, with its phase line. Which phases a 700 ms poll catches
    # depends on the machine's speed (an idle one builds 2 images in about a second), so any phase counts.
    phases = ("starting", "scanning", "hashing", "encoding", "publishing", "done")
    assert seen and all(
        re.fullmatch(rf"({'|'.join(phases)}): \d+ / \d+(, about \d+ s left)?", line) for line in seen
    ), seen

    after = server.get("/index/status").json()
    assert (
        after["num_images"] == before["num_images"] + 2 and after["index_version"] != before["index_version"]
    )
    expect(site.locator("#index-version")).to_have_text(after["index_version"])
    listing = server.get("/index/references", params={"limit": 200}).json()["items"]
    added = sorted(
        (round(i["lat"], 4), round(i["lon"], 4)) for i in listing if i["path"].startswith("uploads/")
    )
    assert added == [(round(lat, 4), round(lon, 4)), (35.6594, 139.6985)]
    expect(site.locator("#browse-range")).to_contain_text(f"of {after['num_images']}")
    site.locator("#ref-grid img").evaluate_all("imgs => Promise.all(imgs.map(i => i.decode()))")
    site.screenshot(path=screenshots / "references-rebuilt.png", full_page=True)


def test_a_wrong_key_is_refused_in_words(site, server):
    site.click("#tab-references")
    site.click("#rebuild")
    site.fill("#key-input", "not-the-key")
    site.click("#key-save")
    expect(site.locator("#rebuild-message")).to_contain_text("the key given was missing or wrong")
    site.wait_for_timeout(1500)  # a status poll or two later the message is still there
    expect(site.locator("#rebuild-message")).to_contain_text("the key given was missing or wrong")
    assert server.get("/index/status").json()["state"] == "idle"
