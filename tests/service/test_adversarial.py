"""Adversarial suite against one real `selavpr serve` process: the OpenAPI schema fuzzed (schemathesis),
the decode path fuzzed with mutated real photos and random bytes (hypothesis), and a 400 MB
unauthenticated upload over a real socket. Never a 5xx, never a dead process."""

from __future__ import annotations

import io
import os
import shutil

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from app.main import create_app
from app.settings import Settings
from bench.abuse import bytes_sent_before_the_answer
from tests.conftest import SHARED_DATA
from tests.helpers import tiny_checkpoint
from tests.servers import serve_args, serve_process

ADMIN_KEY = "adversarial-key"
FUZZ = settings(
    max_examples=int(os.environ.get("SELAVPR_FUZZ_EXAMPLES", "25")),
    deadline=None,
    derandomize=True,  # the same inputs every run: a failure reproduces
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data) -> str:
    root = tmp_path_factory.mktemp("adversarial")
    refs = root / "refs"
    shutil.copytree(shared_data / "matching_triplets" / "p0", refs / "p0")
    env = {"SELAVPR_API_KEY": ADMIN_KEY, "SELAVPR_REQUEST_TIMEOUT_S": "20"}
    args = serve_args(refs, root / "index", tiny_checkpoint(root / "tiny"))
    with serve_process(args, env) as (base, proc):
        yield base
        assert proc.poll() is None, "the server died"
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200


def test_unauthenticated_400mb_upload_is_refused_before_1mb(server):
    sent, status = bytes_sent_before_the_answer(server, "/index/images", 400 * 2**20)
    assert b" 401 " in status and sent < 2**20, (sent, status)
    # with the key, a body over the request limit is refused from Content-Length, before reading it
    sent, status = bytes_sent_before_the_answer(
        server, "/index/images", 600 * 2**20, f"X-API-Key: {ADMIN_KEY}\r\n"
    )
    assert b" 413 " in status and sent < 2**20, (sent, status)


def _real_photos() -> list[bytes]:
    paths = sorted((SHARED_DATA / "matching_triplets" / "p1").rglob("*.jpg"))
    photos = [p.read_bytes() for p in paths]
    from PIL import Image

    with Image.open(paths[0]) as image:
        png = io.BytesIO()
        image.resize((96, 64)).save(png, format="PNG")
    return [*photos, png.getvalue()]


@st.composite
def mutated_images(draw) -> bytes:
    photos = _real_photos()
    if not photos or draw(st.booleans()):
        return draw(st.binary(min_size=0, max_size=4096))
    data = bytearray(draw(st.sampled_from(photos)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "cut", "splice"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 4096))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def test_decode_path_fuzz_never_fails_the_server(server):
    @FUZZ
    @given(image=mutated_images(), batch=st.booleans())
    def check(image: bytes, batch: bool) -> None:
        path = "/localize/batch" if batch else "/localize"
        response = httpx.post(f"{server}{path}", files={"image": ("x.jpg", image)}, timeout=60)
        assert response.status_code in (200, 400, 413, 415), response.text
        assert response.headers["content-type"].startswith("application/json")

    check()
    assert httpx.get(f"{server}/healthz", timeout=5).status_code == 200


SCHEMA = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@pytest.fixture
def base_url(server) -> str:
    return server


@SCHEMA.parametrize()
@FUZZ
def test_openapi_schema_no_5xx_and_answers_match(case, base_url):
    response = case.call(base_url=base_url, timeout=60)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
