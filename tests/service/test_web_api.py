"""The endpoints behind the web page, in-process with a tiny model: the page itself, its settings, the
reference listing and renditions, and the 'why this match' pairs."""

from __future__ import annotations

import fnmatch
import io
import sqlite3
import tomllib

import pytest
from PIL import Image

from app.routers.web import STATIC_DIR, content_security_policy
from tests.conftest import REPO
from tests.service_helpers import files, running, settings_for

pytestmark = pytest.mark.anyio


async def test_page_and_its_assets_come_from_this_origin(built, tiny_ckpt):
    refs, index = built
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        page = await client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for asset in (
            "/static/app.js",
            "/static/exif.js",
            "/static/app.css",
            "/static/vendor/leaflet/leaflet.js",
        ):
            assert f'"{asset}"' in page.text
            response = await client.get(asset, headers={"Accept-Encoding": "gzip"})
            assert response.status_code == 200, asset
        assert response.headers["content-encoding"] == "gzip"  # leaflet.js: 148 kB, compressed on the wire
        assert (await client.get("/static/vendor/leaflet/images/marker-icon.png")).status_code == 200
        assert (await client.get("/static/../settings.py")).status_code == 404
    assert "BSD" in (STATIC_DIR / "vendor" / "leaflet" / "LICENSE").read_text()


async def test_ui_config_exposes_limits_and_tiles(built, tiny_ckpt):
    refs, index = built
    settings = settings_for(refs, index, tiny_ckpt, max_upload_bytes=5000, api_key="k")
    async with running(settings) as (_, client):
        config = (await client.get("/ui/config")).json()
    assert config["max_upload_bytes"] == 5000
    assert config["admin_key_required"] is True and config["localize_key_required"] is False
    assert config["tiles"] is None
    tiles = settings_for(refs, index, tiny_ckpt, tile_url="https://{s}.tile.example.org/{z}/{x}/{y}.png")
    async with running(tiles) as (_, client):
        config = (await client.get("/ui/config")).json()
        page = await client.get("/")
    assert config["tiles"]["url"].startswith("https://{s}.tile.example.org")
    assert "https://*.tile.example.org" in page.headers["content-security-policy"]


def test_content_security_policy_without_tiles_allows_no_other_origin():
    policy = content_security_policy(None)
    assert "http" not in policy and "img-src 'self' blob: data:" in policy


async def test_reference_listing_pages_through_the_index(built, tiny_ckpt):
    refs, index = built
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        first = (await client.get("/index/references", params={"limit": 4})).json()
        rest = (await client.get("/index/references", params={"offset": 4, "limit": 200})).json()
        assert (await client.get("/index/references", params={"limit": 201})).status_code == 422
        beyond = (await client.get("/index/references", params={"offset": 1000})).json()
    assert first["total"] == 9 and len(first["items"]) == 4 and len(rest["items"]) == 5
    assert beyond["items"] == []
    items = first["items"] + rest["items"]
    assert [i["id"] for i in items] == list(range(9))
    located = [i for i in items if i["lat"] is not None]
    assert [i["path"] for i in located] == ["p1/i0/Image059.jpg"] and located[0]["name"] == "Image059.jpg"


async def test_thumbnails_are_resized_jpegs_with_cache_validation(built, tiny_ckpt):
    refs, index = built
    async with running(settings_for(refs, index, tiny_ckpt)) as (app, client):
        version = app.state.service.localizer.index.name
        thumb = await client.get("/index/references/0/thumbnail")
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert thumb.headers["cache-control"] == "no-cache"  # an id may name another image after a rebuild
        with Image.open(io.BytesIO(thumb.content)) as image:
            assert max(image.size) == 320
        again = await client.get(
            "/index/references/0/thumbnail", headers={"If-None-Match": thumb.headers["etag"]}
        )
        assert again.status_code == 304 and not again.content
        pinned = await client.get(f"/index/references/0/image?v={version}")
        assert (
            "immutable" in pinned.headers["cache-control"] and pinned.headers["etag"] != thumb.headers["etag"]
        )
        with Image.open(io.BytesIO(pinned.content)) as image:
            assert max(image.size) == 960  # already under 1280: never enlarged
        assert (await client.get("/index/references/0/image?v=v999999")).status_code == 404
        assert (await client.get("/index/references/9/thumbnail")).status_code == 404
        assert (await client.get("/index/references/0/original")).status_code == 422


async def test_a_record_pointing_outside_the_references_is_refused(workspace, tiny_ckpt):
    refs, index = workspace
    outside = refs.parent / "secret.jpg"
    Image.new("RGB", (64, 64)).save(outside)
    (db_path,) = index.glob("versions/*/meta.sqlite")
    with sqlite3.connect(db_path) as db:
        db.execute("UPDATE images SET path = '../secret.jpg' WHERE id = 0")
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        response = await client.get("/index/references/0/thumbnail")
    assert response.status_code == 404 and "no longer available" in response.json()["error"]["message"]


async def test_pairs_in_pixels_agree_with_the_localize_counts(built, tiny_ckpt, shared_data):
    refs, index = built
    query = (shared_data / "matching_triplets" / "p1" / "i1").glob("*.jpg").__next__().read_bytes()
    async with running(settings_for(refs, index, tiny_ckpt, precision="float32")) as (_, client):
        result = (await client.post("/localize", files=files(query))).json()
        match = result["matches"][0]
        form = {"reference_id": str(match["id"]), "index_version": result["index_version"]}
        full = (
            await client.post("/localize/pairs", files=files(query), data={**form, "max_pairs": "2000"})
        ).json()
        capped = (
            await client.post("/localize/pairs", files=files(query), data={**form, "max_pairs": "10"})
        ).json()
        stale = await client.post("/localize/pairs", files=files(query), data={**form, "index_version": "v0"})
        missing = await client.post("/localize/pairs", files=files(query), data={"reference_id": "99"})
        text = await client.post("/localize/pairs", files=files(b"hello", "a.txt"), data=form)
    assert full["mnn_matches"] == match["mnn_matches"] == len(full["pairs"]) > 10
    assert capped["mnn_matches"] == full["mnn_matches"] and len(capped["pairs"]) == 10
    assert capped["pairs"][0] == full["pairs"][0] and capped["pairs"][-1] == full["pairs"][-1]
    width, height = full["query_size"]["width"], full["query_size"]["height"]
    assert (width, height) == Image.open(io.BytesIO(query)).size
    assert all(0 <= p["query"][0] <= width and 0 <= p["query"][1] <= height for p in full["pairs"])
    ref = full["reference_size"]
    assert all(
        0 <= p["reference"][0] <= ref["width"] and 0 <= p["reference"][1] <= ref["height"]
        for p in full["pairs"]
    )
    assert stale.status_code == 409 and stale.json()["error"]["type"] == "index_changed"
    assert missing.status_code == 404
    assert text.status_code == 415


async def test_pairs_obey_the_upload_limit_and_the_localize_key(built, tiny_ckpt):
    refs, index = built
    settings = settings_for(refs, index, tiny_ckpt, max_upload_bytes=2048, localize_api_key="q")
    async with running(settings) as (_, client):
        unauthorised = await client.post("/localize/pairs", files=files(b"x"), data={"reference_id": "0"})
        big = await client.post(
            "/localize/pairs",
            files=files(b"x" * 200_000),
            data={"reference_id": "0"},
            headers={"X-API-Key": "q"},
        )
    assert unauthorised.status_code == 401
    assert big.status_code == 413


def test_every_static_file_ships_in_the_package():
    """pyproject's package-data globs must cover every file of the page, or an installed server lacks it."""
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "app"
    ]
    app_dir = REPO / "app"
    files = [p.relative_to(app_dir).as_posix() for p in STATIC_DIR.rglob("*") if p.is_file()]
    missing = [
        f
        for f in files
        if not any(fnmatch.fnmatch(f, pat) and f.count("/") == pat.count("/") for pat in patterns)
    ]
    assert files and missing == []
