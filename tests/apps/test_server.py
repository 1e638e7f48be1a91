"""`virtue serve`'s app against a real uvicorn server on 127.0.0.1, with the tiny random model.

Expected embeddings are computed with `tiny_model.encode` *before* the server starts, since the model is not
thread-safe and the server runs it on its own thread.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from tests.conftest import MINI_SCAR
from virtue.apps.server import ServeConfig, create_app
from virtue.cli import serve as serve_cli
from virtue.errors import InputError, PromptError

ATOL = 1e-5


# --------------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port in a background thread; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, timeout=60.0, trust_env=False)  # trust_env: no proxy for loopback


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decoded(data: bytes) -> Image.Image:
    """The image the server will see for these bytes."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.copy()


def assert_error(response: httpx.Response, status: int, *needles: str, index: int | None = None) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail", "input", "field"}, body
    for needle in needles:
        assert needle in body["detail"], (needle, body)
    if index is not None:
        assert body["input"] == index, body


class WrappedModel:
    """The real model behind a delay, a gate and, optionally, a failure on texts equal to `poison`. While the gate
    is closed `encode` waits (`entered` tells that a call has started), so the queue fills deterministically; the
    poison stands in for an error only the model finds. Not the code under test."""

    def __init__(self, model, delay: float = 0.0, poison: str | None = None):
        self.model, self.delay, self.poison = model, delay, poison
        self.calls: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def encode(self, inputs, **kwargs):
        self.calls.append(len(inputs))
        self.entered.set()
        assert self.gate.wait(30), "the gate was never opened"
        time.sleep(self.delay)
        for i, item in enumerate(inputs):
            if self.poison is not None and getattr(item, "text", None) == self.poison:
                raise InputError(f"input {i}: the model refuses this text")
        return self.model.encode(inputs, **kwargs)


@pytest.fixture(scope="module")
def images(fixture_images) -> dict[str, bytes]:
    out = {name: fixture_images[name].read_bytes() for name in ("coffee_small.png", "chelsea.png", "rocket.png")}
    out["photo.jpg"] = sorted((MINI_SCAR / "images").glob("*.jpg"))[0].read_bytes()
    return out


def region_mask(data: bytes) -> bytes:
    img = decoded(data)
    mask = np.zeros((img.height, img.width), np.uint8)
    mask[img.height // 4 : img.height // 2, img.width // 3 : img.width // 2] = 255
    return png_bytes(Image.fromarray(mask))


# --------------------------------------------------------------------------------------------------- tests
def test_health_openapi_and_embed_match_encode(tiny_model, images):
    jpg, png = images["photo.jpg"], images["rocket.png"]
    mask = region_mask(png)
    json_items = [
        {"image": b64(png), "box": [20, 10, 200, 150], "text": "Find the caption that best describes the object."},
        "a rocket on a launch pad",
        {"image": b64(jpg), "points": [[100, 120], [20, 30]], "labels": [1, 0]},
        {"image": "data:image/png;base64," + b64(png), "mask": b64(mask)},
        {"image": b64(jpg)},
    ]
    expected = tiny_model.encode([
        {"image": decoded(png), "box": [20, 10, 200, 150], "text": "Find the caption that best describes the object."},
        "a rocket on a launch pad",
        {"image": decoded(jpg), "points": [[100, 120], [20, 30]], "labels": [1, 0]},
        {"image": decoded(png), "mask": np.asarray(decoded(mask).convert("L"))},
        {"image": decoded(jpg)},
    ])
    expected_upload = tiny_model.encode([{"image": decoded(png), "text": "What is it?", "box": [5, 5, 120, 100]}])
    config = ServeConfig(model_name="tiny")
    with running(create_app(tiny_model, config)) as url, client(url) as http:
        health = http.get("/health").json()
        assert health["status"] == "ok" and health["model"] == "tiny" and health["dim"] == 32
        assert health["device"] == "cpu" and health["queue_depth"] == 0 and health["search"] is False

        r = http.post("/embed", json={"inputs": json_items})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["dim"] == 32 and body["model"] == "tiny"
        np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=ATOL)

        r = http.post("/embed", files={"image": ("rocket.png", png, "image/png")},
                      data={"text": "What is it?", "box": "[5, 5, 120, 100]"})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), expected_upload, atol=ATOL)

        schema = http.get("/openapi.json").json()
        assert {"/embed", "/search", "/health"} <= set(schema["paths"])
        content = schema["paths"]["/embed"]["post"]["requestBody"]["content"]
        assert {"application/json", "multipart/form-data"} <= set(content)
        components = schema["components"]["schemas"]
        assert {"EmbedRequest", "EmbedItem", "EmbedResponse", "ErrorBody", "SearchRequest"} <= set(components)
        assert components["EmbedItem"]["examples"] and "box" in components["EmbedItem"]["properties"]
        assert {"413", "422", "503"} <= set(schema["paths"]["/embed"]["post"]["responses"])
        assert http.get("/docs").status_code == 200


def test_bad_requests_get_4xx_naming_the_input(tiny_model, images):
    png = images["coffee_small.png"]  # 60 x 40
    rng = np.random.default_rng(0)
    noisy = png_bytes(Image.fromarray(rng.integers(0, 256, (90, 90, 3), dtype=np.uint8)))  # ~24 KB, 8100 px
    huge = png_bytes(Image.new("RGB", (200, 200), "white"))  # few bytes, 40000 px
    config = ServeConfig(max_request_bytes=400_000, max_image_bytes=20_000, max_image_pixels=10_000,
                         max_batch_size=4, max_text_chars=100)
    expected = tiny_model.encode([{"image": decoded(png), "box": [1, 1, 59, 39]}])
    with running(create_app(tiny_model, config)) as url, client(url) as http:
        def post(*inputs: Any) -> httpx.Response:
            return http.post("/embed", json={"inputs": list(inputs)})

        assert_error(post("ok", {"image": "not base64!"}), 422, "input 1: image: invalid base64", index=1)
        assert_error(post({"image": b64(b"GIF89a this is no image")}), 422, "input 0: image: not a PNG or JPEG",
                     index=0)
        assert_error(post({"image": b64(png[: len(png) // 2])}), 422, "input 0: image: cannot decode", index=0)
        assert_error(post("a", {"image": b64(png), "box": [10, 10, 100, 30]}), 422,
                     "input 1: box [10, 10, 100, 30] lies outside the 60x40 image", index=1)
        assert_error(post({"image": b64(png), "box": [10, 10, 30]}), 422, "input 0: box:", index=0)
        assert_error(post({"image": b64(png), "points": [[1, 2]], "labels": [7]}), 422, "input 0:", "labels")
        assert_error(post({"image": b64(png), "mask": b64(huge)}), 413, "input 0: mask:", "pixels")
        assert_error(post({"image": b64(png), "mask": b64(png_bytes(Image.new("L", (30, 20), 255)))}), 422,
                     "input 0: mask of shape 30x20 (WxH) does not match the 60x40 image")
        assert_error(post({"text": "x", "colour": "red"}), 422, "input 0: colour:", index=0)
        assert_error(post("a", "b", "c", "d", "e"), 413, "inputs: 5 items; the limit is 4")
        assert_error(post({"image": b64(noisy)}), 413, "input 0: image:", "exceeds the limit of 20000 bytes", index=0)
        assert_error(post("fine", {"image": b64(huge)}), 413, "input 1: image: 200x200 = 40000 pixels", index=1)
        assert_error(post("x" * 101), 413, "input 0: text has 101 characters; the limit is 100", index=0)
        assert_error(post(), 422, "inputs:")
        assert_error(post(""), 422, "input 0: empty input", index=0)
        assert_error(post("fine", {}), 422, "input 1: empty input", index=1)
        assert_error(post({"text": "<|image_pad|> without an image"}), 422, "input 0: text contains <|image_pad|>")
        assert_error(post(5), 422, "input 0:", index=0)
        assert_error(http.post("/embed", content=b'{"inputs": [', headers={"content-type": "application/json"}),
                     422, "Invalid JSON")
        assert_error(http.post("/embed", content=b"x" * 500_000, headers={"content-type": "application/json"}),
                     413, "the limit is 400000 bytes")
        chunked = iter([b"x" * 100_000] * 5)  # no Content-Length: counted while it streams in
        assert_error(http.post("/embed", content=chunked, headers={"content-type": "application/json"}), 413,
                     "more than 400000 bytes")
        assert_error(http.post("/embed", content=b"hello", headers={"content-type": "text/plain"}), 415,
                     "application/json")
        # multipart: not an image, an unknown field, a box that is not JSON, a box outside the image
        assert_error(http.post("/embed", files={"image": ("a.png", b"no image", "image/png")}), 422,
                     "input 0: image: not a PNG or JPEG")
        assert_error(http.post("/embed", files={"image": ("a.png", png, "image/png")}, data={"colour": "red"}), 422,
                     "unknown form field(s) ['colour']")
        assert_error(http.post("/embed", files={"image": ("a.png", png, "image/png")}, data={"box": "1 2 3 4"}), 422,
                     "input 0: box: expected JSON")
        assert_error(http.post("/embed", files={"image": ("a.png", png, "image/png")}, data={"box": "[1, 2, 3, 99]"}),
                     422, "input 0: box [1, 2, 3, 99] lies outside the 60x40 image")
        assert_error(http.post("/embed", files={"image": ("a.png", noisy, "image/png")}), 413, "input 0: image:")
        # no search index configured
        assert_error(http.post("/search", json={"query": "a cat"}), 409, "--db")
        assert_error(http.post("/search", json={"query": {"text": "a", "box": [1, 2]}, "top_k": 0}), 422, "query:")

        # the server is unharmed and never answered 500
        r = post({"image": b64(png), "box": [1, 1, 59, 39]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), expected, atol=ATOL)
        assert http.get("/health").json()["stats"]["retried_batches"] == 0


def test_concurrent_requests_are_batched_and_match_encode_alone(tiny_model, images):
    # 60x40, 225x150 and 240x160 pixels
    png1, png2, png3 = images["coffee_small.png"], images["chelsea.png"], images["rocket.png"]
    mask = region_mask(png2)
    # (request JSON items, the same inputs for encode)
    shapes: list[tuple[list, list]] = [
        (["a cup of coffee"], ["a cup of coffee"]),
        ([{"image": b64(png1), "box": [5, 5, 50, 35]}, "a cat"],
         [{"image": decoded(png1), "box": [5, 5, 50, 35]}, "a cat"]),
        ([{"image": b64(png2), "points": [[100, 70]], "text": "Which animal?"}],
         [{"image": decoded(png2), "points": [[100, 70]], "text": "Which animal?"}]),
        ([{"image": b64(png3)}], [{"image": decoded(png3)}]),
        (["one", "two words", "a somewhat longer third text"], ["one", "two words", "a somewhat longer third text"]),
        ([{"image": b64(png2), "mask": b64(mask)}, {"image": b64(png1), "text": "the cup"}, "coffee"],
         [{"image": decoded(png2), "mask": np.asarray(decoded(mask).convert("L"))},
          {"image": decoded(png1), "text": "the cup"}, "coffee"]),
        ([{"image": b64(png3), "box": [30, 10, 200, 150], "points": [[100, 80]], "labels": [1]}],
         [{"image": decoded(png3), "box": [30, 10, 200, 150], "points": [[100, 80]], "labels": [1]}]),
    ]
    expected = [tiny_model.encode(inputs) for _, inputs in shapes]  # each request alone
    n_requests, n_threads = 200, 8
    config = ServeConfig(max_batch_items=16, max_wait_ms=20, queue_size=256)
    with running(create_app(tiny_model, config)) as url:
        def worker(thread: int) -> list[tuple[int, int, list]]:
            out = []
            with client(url) as http:
                for n in range(thread, n_requests, n_threads):
                    r = http.post("/embed", json={"inputs": shapes[n % len(shapes)][0]})
                    out.append((n, r.status_code, r.json()["embeddings"] if r.status_code == 200 else r.text))
            return out

        start = time.perf_counter()
        with ThreadPoolExecutor(n_threads) as pool:
            results = [row for rows in pool.map(worker, range(n_threads)) for row in rows]
        elapsed = time.perf_counter() - start
        with client(url) as http:
            stats = http.get("/health").json()["stats"]
    assert sorted(n for n, _, _ in results) == list(range(n_requests))  # none lost
    for n, status, body in results:
        assert status == 200, (n, body)
        np.testing.assert_allclose(np.array(body), expected[n % len(shapes)], atol=ATOL, err_msg=f"request {n}")
    assert stats["requests"] == n_requests and stats["rejected"] == 0 and stats["retried_batches"] == 0
    assert stats["batches"] < n_requests and stats["largest_batch"] > 3, stats  # requests were merged
    print(f"\n{n_requests} requests in {elapsed:.1f} s, {stats['batches']} batches, largest {stats['largest_batch']}")


def test_full_queue_answers_503_with_retry_after(tiny_model):
    held = WrappedModel(tiny_model)
    expected = tiny_model.encode(["a held request"])
    config = ServeConfig(queue_size=1, max_batch_items=1, max_wait_ms=0, retry_after_s=2)
    with running(create_app(held, config)) as url, client(url) as http:
        def one() -> httpx.Response:
            with client(url) as own:
                return own.post("/embed", json={"inputs": ["a held request"]})

        held.gate.clear()
        with ThreadPoolExecutor(2) as pool:
            try:
                # one request inside the model, one waiting: the queue (size 1) is full
                encoding = pool.submit(one)
                assert held.entered.wait(30), "the first request never reached the model"
                waiting = pool.submit(one)
                deadline = time.monotonic() + 30
                while http.get("/health").json()["queue_depth"] < 1:
                    assert time.monotonic() < deadline, "the second request was never queued"
                    time.sleep(0.01)
                busy = [one() for _ in range(4)]
            finally:
                held.gate.set()
            ok = [encoding.result(), waiting.result()]
        for r in busy:
            assert r.headers["retry-after"] == "2"
            assert_error(r, 503, "server busy")
        for r in ok:
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array(r.json()["embeddings"]), expected, atol=ATOL)
        # the queue drained: served again, and every refusal counted
        assert http.post("/embed", json={"inputs": ["a held request"]}).status_code == 200
        assert http.get("/health").json()["stats"]["rejected"] == 4


def test_a_request_the_model_rejects_does_not_fail_its_batch(tiny_model, images):
    png = images["coffee_small.png"]
    good_a = ["first", {"image": b64(png), "box": [5, 5, 50, 35]}]
    good_b = ["second"]
    expected_a = tiny_model.encode(["first", {"image": decoded(png), "box": [5, 5, 50, 35]}])
    expected_b = tiny_model.encode(good_b)
    model = WrappedModel(tiny_model, delay=0.4, poison="poison")
    config = ServeConfig(max_batch_items=32, max_wait_ms=0)
    with running(create_app(model, config)) as url:
        def post(items: list) -> httpx.Response:
            with client(url) as http:
                return http.post("/embed", json={"inputs": items})

        with ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(post, ["blocks the model while the others queue up"])
            assert model.entered.wait(30), "the blocking request never reached the model"
            a, bad, b = (pool.submit(post, items) for items in (good_a, ["fine", "poison"], good_b))
            assert blocker.result().status_code == 200
            ra, rbad, rb = a.result(), bad.result(), b.result()
        with client(url) as http:
            stats = http.get("/health").json()["stats"]
    assert ra.status_code == 200 and rb.status_code == 200, (ra.text, rb.text)
    np.testing.assert_allclose(np.array(ra.json()["embeddings"]), expected_a, atol=ATOL)
    np.testing.assert_allclose(np.array(rb.json()["embeddings"]), expected_b, atol=ATOL)
    # the index is the item's place in its own request, not in the merged batch
    assert_error(rbad, 422, "input 1: the model refuses this text", index=1)
    assert stats["retried_batches"] == 1 and 5 in model.calls, (stats, model.calls)


def test_prompts_on_an_exif_rotated_photo_are_checked_as_encode_checks_them(tiny_model):
    # An 80x40 JPEG whose EXIF orientation (6) shows it as 40x80: the model (clean setting) reads it upright, so a
    # box in the lower half of the displayed photo is valid there, and one past its displayed width is not.
    assert tiny_model.config.compat.exif_orientation
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (80, 40), (200, 30, 30)).save(buffer, "JPEG", exif=exif)
    jpeg = buffer.getvalue()
    upright_box, stored_box = [5, 50, 35, 75], [45, 5, 75, 35]
    expected = tiny_model.encode([{"image": decoded(jpeg), "box": upright_box}])
    with pytest.raises(PromptError, match="outside"):
        tiny_model.encode([{"image": decoded(jpeg), "box": stored_box}])
    with running(create_app(tiny_model, ServeConfig())) as url, client(url) as http:
        r = http.post("/embed", json={"inputs": [{"image": b64(jpeg), "box": upright_box}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), expected, atol=ATOL)
        r = http.post("/embed", json={"inputs": [{"image": b64(jpeg), "box": stored_box}]})
        assert_error(r, 422, "input 0: box [45, 5, 75, 35] lies outside the 40x80 image", index=0)


def test_cli_flags_build_the_config():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    serve_cli.register(sub)
    args = parser.parse_args(["serve", "--model", "some/dir", "--port", "8123", "--max-batch-size", "7",
                              "--max-wait-ms", "2.5", "--batch-size", "4"])
    assert args.host == "127.0.0.1" and args.port == 8123 and args.db is None and args.run is serve_cli.run
    config = serve_cli.config_from_args(args)
    assert config == ServeConfig(model_name="some/dir", max_batch_size=7, max_wait_ms=2.5, encode_batch_size=4)



def test_search_matches_the_search_module(tiny_model, fixture_images, tmp_path):
    from virtue.search import index_directory, search

    root = tmp_path / "photos"
    root.mkdir()
    for name in ("coffee_small.png", "chelsea.png", "rocket.png"):
        shutil.copyfile(fixture_images[name], root / name)
    region = {"image": "chelsea.png", "box": [60, 20, 180, 140], "id": "cat", "label": "cat"}
    (root / "regions.jsonl").write_text(json.dumps(region) + "\n")
    db = tmp_path / "photos.lancedb"
    index_directory(tiny_model, root, db, show_progress_bar=False)
    png = fixture_images["rocket.png"].read_bytes()
    queries = [  # (JSON query, the same for `search`, kind)
        ("a cat on a table", "a cat on a table", "all"),
        ({"image": b64(png), "box": [20, 10, 200, 150]}, {"image": decoded(png), "box": [20, 10, 200, 150]}, "all"),
        ("a cup of coffee", "a cup of coffee", "image"),
    ]
    expected = [search(tiny_model, db, query, top_k=3, kind=kind) for _, query, kind in queries]
    with running(create_app(tiny_model, ServeConfig(), search_db=db)) as url, client(url) as http:
        assert http.get("/health").json()["search"] is True
        for (query, _, kind), hits in zip(queries, expected, strict=True):
            r = http.post("/search", json={"query": query, "top_k": 3, "kind": kind})
            assert r.status_code == 200, r.text
            got = r.json()["hits"]
            assert [(h["kind"], h["rel_path"], h["region_id"]) for h in got] == [
                (h.kind, h.rel_path, h.region_id) for h in hits
            ]
            np.testing.assert_allclose([h["score"] for h in got], [h.score for h in hits], atol=ATOL)
        assert_error(http.post("/search", json={"query": "a", "kind": "everything"}), 422, "kind")
        assert_error(http.post("/search", json={"query": {"image": b64(png), "box": [0, 0, 999, 10]}}), 422,
                     "query: box [0, 0, 999, 10] lies outside the 240x160 image")
    with running(create_app(tiny_model, ServeConfig(), search_db=tmp_path / "nothing")) as url, client(url) as http:
        assert_error(http.post("/search", json={"query": "a cat"}), 409, "no index here")
