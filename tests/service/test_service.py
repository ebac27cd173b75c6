"""The HTTP service in-process (httpx ASGI transport, lifespan run by hand), with a tiny model."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from tests.helpers import noise_images, tiny_checkpoint
from tests.service_helpers import files, jpeg, running, settings_for, wait_idle

pytestmark = pytest.mark.anyio


async def test_localize_answers_like_the_cli(built, tiny_ckpt):
    refs, index = built
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        assert (await client.get("/healthz")).json() == {"status": "alive"}
        assert (await client.get("/readyz")).json() == {"status": "ready", "index_version": "v000001"}
        query = jpeg(refs / "p1" / "i0" / "Image059.jpg")
        response = await client.post("/localize", files=files(query), params={"top_k": 2})
        assert response.status_code == 200
        body = response.json()
        assert [m["rank"] for m in body["matches"]] == [1, 2]
        assert body["matches"][0]["path"] == "p1/i0/Image059.jpg"
        assert body["location"]["lat"] == -27.4772 and body["index_version"] == "v000001"
        assert set(body["timings_ms"]) == {"decode", "extract", "search", "rerank", "total"}
        form = await client.post("/localize", files=files(query), data={"top_k": "3", "rerank_k": "4"})
        assert len(form.json()["matches"]) == 3


async def test_batch_returns_one_result_each_in_order(built, tiny_ckpt):
    refs, index = built
    paths = [refs / "p0" / "i0" / "Image001.jpg", refs / "p2" / "i1", refs / "p1" / "i2"]
    paths = [p if p.is_file() else next(p.iterdir()) for p in paths]
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        multipart = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]
        response = await client.post("/localize/batch", files=multipart, params={"top_k": 1})
        assert response.status_code == 200
        tops = [r["matches"][0]["path"] for r in response.json()["results"]]
        assert tops == [p.relative_to(refs).as_posix() for p in paths]


async def test_concurrent_requests_share_model_forwards(built, tiny_ckpt):
    refs, index = built
    query = jpeg(refs / "p0" / "i0" / "Image001.jpg")
    async with running(settings_for(refs, index, tiny_ckpt)) as (app, client):
        responses = await asyncio.gather(*(client.post("/localize", files=files(query)) for _ in range(12)))
        assert all(r.status_code == 200 for r in responses)
        batches = app.state.metrics.batch_size.collect()[0].samples
        count = next(s.value for s in batches if s.name.endswith("_count"))
        total = next(s.value for s in batches if s.name.endswith("_sum"))
        assert total == 12 and count < 12  # at least one forward served several requests


@pytest.mark.parametrize(
    ("payload", "status", "kind"),
    [
        (b"", 400, "empty_image"),
        (b"%PDF-1.4 definitely not a photo", 415, "unsupported_media_type"),
        ("truncated", 400, "corrupt_image"),
    ],
)
async def test_bad_images_get_a_clear_error(built, tiny_ckpt, payload, status, kind):
    refs, index = built
    if payload == "truncated":
        data = jpeg(refs / "p0" / "i0" / "Image001.jpg")
        payload = data[: len(data) // 3]
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        response = await client.post("/localize", files=files(payload))
        assert response.status_code == status
        assert response.json()["error"]["type"] == kind and response.json()["error"]["message"]
        assert (await client.get("/healthz")).status_code == 200  # still alive


async def test_parameters_and_missing_field(built, tiny_ckpt):
    refs, index = built
    query = jpeg(refs / "p0" / "i0" / "Image001.jpg")
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        assert (await client.post("/localize")).status_code == 422
        assert (await client.post("/localize", data={"other": "x"})).status_code == 422
        for params in ({"top_k": 0}, {"top_k": 101}, {"rerank_k": 1001}, {"top_k": "many"}):
            response = await client.post("/localize", files=files(query), params=params)
            assert response.status_code == 422, params
            assert response.json()["error"]["type"] == "validation_error"
        assert (await client.post("/localize", files=files(query), data={"top_k": "x"})).status_code == 422


async def test_upload_limit_is_enforced_before_decoding(built, tiny_ckpt, monkeypatch, tmp_path):
    refs, index = built
    settings = settings_for(refs, index, tiny_ckpt, max_upload_bytes=100_000)
    noise = noise_images(tmp_path, 1, size=(400, 400))[0]  # ~480 kB of random pixels
    buffer = io.BytesIO(noise.read_bytes())
    noise.unlink()
    assert len(buffer.getvalue()) > 200_000
    async with running(settings) as (app, client):
        decoded = []
        monkeypatch.setattr(app.state.service, "prepare", lambda data: decoded.append(data))
        response = await client.post("/localize", files=files(buffer.getvalue()))
        assert response.status_code == 413 and response.json()["error"]["type"] == "payload_too_large"

        async def stream():  # no Content-Length: the limit must hold while the body streams
            body = b'--b\r\nContent-Disposition: form-data; name="image"; filename="x"\r\n\r\n'
            yield body
            for _ in range(40):
                yield b"\0" * 10_000

        chunked = await client.post(
            "/localize", content=stream(), headers={"content-type": "multipart/form-data; boundary=b"}
        )
        assert chunked.status_code == 413
        assert decoded == []


async def test_decompression_bomb_is_refused(built, tiny_ckpt):
    refs, index = built
    buffer = io.BytesIO()
    Image.new("L", (6000, 6000)).save(buffer, format="PNG")  # tiny file, 36 megapixels
    async with running(settings_for(refs, index, tiny_ckpt, max_pixels=10_000_000)) as (_, client):
        response = await client.post("/localize", files=files(buffer.getvalue(), "bomb.png"))
        assert response.status_code == 413 and response.json()["error"]["type"] == "image_too_large"


async def test_api_keys(workspace, tiny_ckpt):
    refs, index = workspace
    query = jpeg(refs / "p0" / "i0" / "Image001.jpg")
    async with running(settings_for(refs, index, tiny_ckpt, api_key="s3cret")) as (_, client):
        assert (await client.post("/index/rebuild")).status_code == 401
        assert (await client.post("/index/rebuild", headers={"X-API-Key": "nope"})).status_code == 401
        assert (await client.post("/index/images", files=files(query))).status_code == 401
        assert (await client.post("/localize", files=files(query))).status_code == 200  # open by default
        assert (await client.get("/index/status")).status_code == 200
        accepted = await client.post("/index/rebuild", headers={"X-API-Key": "s3cret"})
        assert accepted.status_code == 202
        await wait_idle(client)
    async with running(settings_for(refs, index, tiny_ckpt, localize_api_key="k2")) as (_, client):
        assert (await client.post("/localize", files=files(query))).status_code == 401
        ok = await client.post("/localize", files=files(query), headers={"X-API-Key": "k2"})
        assert ok.status_code == 200


async def test_rebuild_under_load_switches_versions_atomically(workspace, tiny_ckpt):
    refs, index = workspace
    noise_images(refs / "extra", 40)
    query = jpeg(refs / "p0" / "i0" / "Image001.jpg")
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        first = await client.post("/index/rebuild")
        second = await client.post("/index/rebuild")
        third = await client.post("/index/rebuild")
        assert first.status_code == second.status_code == third.status_code == 202
        assert (first.json()["state"], second.json()["state"]) == ("running", "queued")
        assert second.json()["job_id"] == third.json()["job_id"] != first.json()["job_id"]
        versions, errors = set(), 0
        while True:
            responses = await asyncio.gather(
                *(client.post("/localize", files=files(query)) for _ in range(4))
            )
            errors += sum(r.status_code != 200 for r in responses)
            versions |= {r.json()["index_version"] for r in responses if r.status_code == 200}
            status = (await client.get("/index/status")).json()
            if status["state"] != "running":
                break
        assert errors == 0 and status["state"] == "idle" and status["last_error"] is None
        assert not status["queued"] and status["num_images"] == 49
        served = status["index_version"]
        assert served in ("v000002", "v000003")  # the queued run found nothing new to encode
        after = await client.post("/localize", files=files(query))
        assert after.json()["index_version"] == served
        assert versions <= {"v000001", "v000002", "v000003"}


async def test_upload_references_under_server_chosen_names(workspace, tiny_ckpt):
    refs, index = workspace
    photo = jpeg(refs / "p0" / "i0" / "Image001.jpg")
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        response = await client.post(
            "/index/images",
            files=[("image", ("../../etc/passwd.jpg", photo, "image/jpeg"))],
            data={"lat": "51.5", "lon": "-0.12"},
            params={"rebuild": "true"},
        )
        assert response.status_code == 201
        stored = response.json()["stored"][0]
        assert stored["path"].startswith("uploads/") and "passwd" not in stored["path"]
        assert stored["name"] == "passwd.jpg"  # the display name: last component only, never a path
        assert (refs / stored["path"]).read_bytes() == photo
        assert response.json()["rebuild"]["state"] == "running"
        status = await wait_idle(client)
        assert status["num_images"] == 10
        rel = stored["path"].removeprefix("uploads/")
        assert f"{rel},51.50000000,-0.12000000,passwd.jpg" in (refs / "uploads" / "locations.csv").read_text()
        found = await client.post("/localize", files=files(photo), params={"top_k": 2})
        by_path = {m["path"]: m for m in found.json()["matches"]}
        assert by_path[stored["path"]]["name"] == "passwd.jpg"  # the match says which photo it was

        before = sorted(p.name for p in (refs / "uploads").rglob("*"))
        bad = await client.post(
            "/index/images", files=[("image", ("a.jpg", photo, "")), ("image", ("b", b"nope", ""))]
        )
        assert bad.status_code == 415
        assert sorted(p.name for p in (refs / "uploads").rglob("*")) == before  # nothing written
        unpaired = await client.post("/index/images", files=files(photo), data={"lat": "1"})
        assert unpaired.status_code == 422


async def test_metrics_expose_stages_requests_and_index(built, tiny_ckpt):
    refs, index = built
    async with running(settings_for(refs, index, tiny_ckpt)) as (_, client):
        await client.post("/localize", files=files(jpeg(refs / "p0" / "i0" / "Image001.jpg")))
        await client.post("/localize", files=files(b""))
        text = (await client.get("/metrics")).text
        for needle in (
            'selavpr_stage_seconds_count{stage="extract"} 1.0',
            'selavpr_stage_seconds_count{stage="rerank"} 1.0',
            'selavpr_requests_total{endpoint="/localize",status="200"} 1.0',
            'selavpr_requests_total{endpoint="/localize",status="400"} 1.0',
            "selavpr_batch_size_count 1.0",
            "selavpr_index_images 9.0",
            'selavpr_index_info{version="v000001"} 1.0',
            'selavpr_errors_total{kind="empty_image"} 1.0',
            "process_resident_memory_bytes",
        ):
            assert needle in text, needle


async def test_starts_without_index_and_builds_one(tmp_path, built, tiny_ckpt):
    refs, _ = built
    async with running(settings_for(refs, tmp_path / "index", tiny_ckpt)) as (_, client):
        ready = await client.get("/readyz")
        if ready.status_code == 503:
            assert "is being built" in ready.json()["error"]["message"]
            response = await client.post("/localize", files=files(jpeg(refs / "p0" / "i0" / "Image001.jpg")))
            assert response.status_code == 503
        await wait_idle(client)
        assert (await client.get("/readyz")).status_code == 200


async def test_no_references_no_index_is_not_ready(tmp_path, tiny_ckpt):
    (tmp_path / "refs").mkdir()
    async with running(settings_for(tmp_path / "refs", tmp_path / "index", tiny_ckpt)) as (_, client):
        response = await client.get("/readyz")
        assert response.status_code == 503 and "no index" in response.json()["error"]["message"]
        assert (await client.get("/index/status")).json()["index_version"] is None
        # a first run explains itself: GET / and the 503 name the HTTP way to add references
        home = (await client.get("/", headers={"Accept": "application/json"})).json()
        assert home["ready"] is False and any("POST /index/images" in step for step in home["next_steps"])
        photo = io.BytesIO()
        Image.new("RGB", (64, 48), "gray").save(photo, format="PNG")
        refused = await client.post("/localize", files=files(photo.getvalue(), "q.png"))
        message = refused.json()["error"]["message"]
        assert refused.status_code == 503 and "POST /index/images" in message and str(tmp_path) not in message


async def test_index_of_another_model_is_not_served_until_rebuilt(workspace, tmp_path, tiny_ckpt):
    refs, index = workspace
    other = tiny_checkpoint(tmp_path / "other", seed=12)
    async with running(settings_for(refs, index, other)) as (_, client):
        # not served; the service re-encodes the references with its own model at start-up
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and "built with another model" in ready.json()["error"]["message"]
        queued = await client.post("/index/rebuild")  # runs once more after the start-up build
        assert queued.status_code == 202 and queued.json()["state"] == "queued"
        report = (await wait_idle(client))["last_report"]
        assert report["encoded"] + report["reused"] == 9
        assert (await client.get("/readyz")).status_code == 200
