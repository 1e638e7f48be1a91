"""The OpenAI-compatible routes of `virtue serve` (`/v1/embeddings`, `/v1/models`) against a real uvicorn on
127.0.0.1, called with the official `openai` client and with raw HTTP, with the tiny random model.

Expected embeddings are computed with `tiny_model.encode` before the server starts (the model is not
thread-safe; the server runs it on its own thread).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import openai
import pytest

import virtue.model.embedder as embedder_module
from tests.apps.test_server import ATOL, WrappedModel, b64, client, decoded, png_bytes, running
from virtue.apps.server import ServeConfig, create_app
from virtue.processing.text import IMAGE_TOKEN, with_image_token

NAME = "local/tiny-virtue"  # a hub-style name, as `--model` gives by default
INSTRUCTION = "Find the caption that best describes the segmented object."


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + b64(png)


def openai_client(url: str) -> openai.OpenAI:
    # The client insists on an API key; the server ignores it. No retries: errors surface at once.
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60.0,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


def assert_openai_error(response: httpx.Response, status: int, *needles: str, param: Any = "any",
                        code: str | None = None) -> dict:
    """A raw answer in OpenAI's error shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error"), body
    for needle in needles:
        assert needle in error["message"], (needle, body)
    if param != "any":
        assert error["param"] == param, body
    if code is not None:
        assert error["code"] == code, body
    return error


@contextlib.contextmanager
def expect(kind: type[openai.APIStatusError], status: int, *needles: str, param: Any = "any",
           code: str | None = None) -> Iterator[None]:
    """The client raises its own error type, with the server's message and fields."""
    with pytest.raises(kind) as info:
        yield
    err = info.value
    assert type(err) is kind and err.status_code == status, (type(err), err)
    assert err.type == ("server_error" if status >= 500 else "invalid_request_error"), err.body
    for needle in needles:
        assert needle in str(err) and needle in err.message, (needle, str(err))
    if param != "any":
        assert err.param == param, err.body
    if code is not None:
        assert err.code == code, err.body


@pytest.fixture
def llm_tokens(monkeypatch):
    """Records how many positions the language model reads per `encode` call: every row's tokens plus the
    segmentation tokens in front of each image row (the rows as `pack_rows` packs them)."""
    counts: list[int] = []
    pack_rows = embedder_module.pack_rows

    def recording(rows, prefix):
        counts.append(sum(int(r.shape[0]) for r in rows) + (0 if prefix is None else len(rows) * prefix.shape[1]))
        return pack_rows(rows, prefix)

    def tokens_of(model, inputs: list) -> int:
        counts.clear()
        monkeypatch.setattr(embedder_module, "pack_rows", recording)
        try:
            model.encode(inputs)
        finally:
            monkeypatch.setattr(embedder_module, "pack_rows", pack_rows)
        return sum(counts)

    return tokens_of


# Qwen2-VL's image sizing, virtue-spec §2.1: sides in multiples of 28 (14 px patches, 2x2 merge), between 4 and
# 1280 visual tokens' worth of pixels, an image with a side under 28 px first resized to 56 x 56.
FACTOR, MIN_PIXELS, MAX_PIXELS = 28, 28 * 28 * 4, 28 * 28 * 1280


def visual_tokens(width: int, height: int) -> int:
    """The merged visual tokens of an image (spec §2.1's smart_resize, written out here, not the package's)."""
    if min(width, height) < FACTOR:
        width = height = 56
    h, w = round(height / FACTOR) * FACTOR, round(width / FACTOR) * FACTOR
    if h * w > MAX_PIXELS:
        beta = math.sqrt(height * width / MAX_PIXELS)
        h = max(FACTOR, math.floor(height / beta / FACTOR) * FACTOR)
        w = max(FACTOR, math.floor(width / beta / FACTOR) * FACTOR)
    elif h * w < MIN_PIXELS:
        beta = math.sqrt(MIN_PIXELS / (height * width))
        h, w = math.ceil(height * beta / FACTOR) * FACTOR, math.ceil(width * beta / FACTOR) * FACTOR
    return h * w // FACTOR**2


def expected_usage(model, inputs: list) -> int:
    """Usage counted without the processor: the tokenizer's tokens of each input's text as the model formats it
    (`with_image_token`: the placeholder, and the default text of an image without one), the one placeholder
    replaced by the image's visual tokens, plus the SAM2 branch's segmentation tokens for an image input."""
    tokenizer = model.processor.tokenizer
    placeholder = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    total = 0
    for item in inputs:
        text, image = (item, None) if isinstance(item, str) else (item.get("text"), item.get("image"))
        ids = tokenizer(with_image_token(text, image is not None, "expected"))["input_ids"]
        total += len(ids)
        if image is not None:
            assert ids.count(placeholder) == 1  # the formatted text holds the placeholder once, as one token
            total += visual_tokens(*image.size) - 1 + model.config.sam.num_tokens
    return total


# --------------------------------------------------------------------------------------------------- tests
def test_openai_client_gets_the_embeddings_of_encode(tiny_model, fixture_images, llm_tokens):
    png = fixture_images["rocket.png"].read_bytes()  # 240 x 160
    small = fixture_images["coffee_small.png"].read_bytes()  # 60 x 40
    texts = ["a rocket on a launch pad", "a cup of coffee", "two words"]
    region = {"image": decoded(png), "box": [20, 10, 200, 150], "text": INSTRUCTION}
    mixed = [region, "a rocket", {"image": decoded(small), "points": [[30, 20]], "labels": [1]}]
    expected_texts = tiny_model.encode(texts)
    expected_single = tiny_model.encode(["hello"])
    expected_mixed = tiny_model.encode(mixed)
    tokens_texts, tokens_mixed = llm_tokens(tiny_model, texts), llm_tokens(tiny_model, mixed)
    tokens_single = llm_tokens(tiny_model, ["hello"])
    tokenizer = tiny_model.processor.tokenizer
    assert tokens_texts == sum(len(tokenizer(t)["input_ids"]) for t in texts)
    # What the language model read (recorded above) is the count made without the processor. The images:
    # 240 x 160 -> 252 x 168 -> 54 visual tokens; 60 x 40 -> 84 x 56 (raised to 4 tokens' pixels) -> 6.
    assert (visual_tokens(240, 160), visual_tokens(60, 40)) == (54, 6)
    counted = [expected_usage(tiny_model, inputs) for inputs in (texts, ["hello"], mixed)]
    assert [tokens_texts, tokens_single, tokens_mixed] == counted
    mixed_json = [{"image": data_url(png), "box": [20, 10, 200, 150], "text": INSTRUCTION}, "a rocket",
                  {"image": data_url(small), "points": [[30, 20]], "labels": [1]}]

    with running(create_app(tiny_model, ServeConfig(model_name=NAME))) as url, openai_client(url) as oa:
        # the client's default: it asks for base64 and decodes it to floats itself
        r = oa.embeddings.create(model=NAME, input=texts)
        assert r.object == "list" and r.model == NAME and [d.index for d in r.data] == [0, 1, 2]
        assert all(d.object == "embedding" for d in r.data)
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), expected_texts, atol=ATOL)
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens_texts

        # float: JSON lists; a single string; dimensions equal to the model's size and `user` accepted
        r = oa.embeddings.create(model=NAME, input="hello", encoding_format="float", dimensions=32, user="u-1")
        assert len(r.data) == 1 and isinstance(r.data[0].embedding, list) and len(r.data[0].embedding) == 32
        np.testing.assert_allclose(np.array([r.data[0].embedding]), expected_single, atol=ATOL)
        assert r.usage.prompt_tokens == tokens_single

        # base64 asked for explicitly: the client hands back the string, little-endian float32
        r = oa.embeddings.create(model=NAME, input=texts, encoding_format="base64")
        rows = np.stack([np.frombuffer(base64.b64decode(d.embedding), dtype="<f4") for d in r.data])
        np.testing.assert_allclose(rows, expected_texts, atol=ATOL)

        # an image with a box (and text), a text and an image with a point, objects inside `input`
        r = oa.embeddings.create(model=NAME, input=mixed_json)
        np.testing.assert_allclose(np.array([d.embedding for d in r.data]), expected_mixed, atol=ATOL)
        # usage: what the language model read, text + visual + segmentation tokens
        assert r.usage.prompt_tokens == r.usage.total_tokens == tokens_mixed
        r = oa.embeddings.create(model=NAME, input="", extra_body={"input": mixed_json[:1]})  # the extra_body form
        np.testing.assert_allclose(np.array([r.data[0].embedding]), expected_mixed[:1], atol=ATOL)

        models = oa.models.list()
        assert [m.id for m in models.data] == [NAME] and models.data[0].object == "model"
        assert oa.models.retrieve(NAME).id == NAME
        with expect(openai.NotFoundError, 404, "`gpt-4` does not exist", f"serves `{NAME}`",
                    code="model_not_found"):
            oa.models.retrieve("gpt-4")

        # raw HTTP: float is the default without `encoding_format`, the answer is OpenAI's shape exactly
        with client(url) as http:
            raw = http.post("/v1/embeddings", json={"model": NAME, "input": mixed_json})
            assert raw.status_code == 200, raw.text
            body = raw.json()
            assert set(body) == {"object", "data", "model", "usage"} and body["object"] == "list"
            assert set(body["data"][0]) == {"object", "index", "embedding"}
            assert body["usage"] == {"prompt_tokens": tokens_mixed, "total_tokens": tokens_mixed}
            np.testing.assert_allclose(np.array([d["embedding"] for d in body["data"]]), expected_mixed, atol=ATOL)
            schema = http.get("/openapi.json").json()
            assert {"/v1/embeddings", "/v1/models", "/embed"} <= set(schema["paths"])
            assert {"EmbeddingsRequest", "OpenAIErrorResponse"} <= set(schema["components"]["schemas"])
            stats = http.get("/health").json()["stats"]
        assert stats["requests"] == 6 and stats["items"] == 3 + 1 + 3 + 3 + 1 + 3  # through the shared queue


def test_bad_requests_raise_the_clients_errors(tiny_model, fixture_images):
    png = fixture_images["coffee_small.png"].read_bytes()  # 60 x 40
    config = ServeConfig(model_name=NAME, max_batch_size=4, max_text_chars=100, max_request_bytes=100_000,
                         max_image_pixels=10_000)
    expected = tiny_model.encode([{"image": decoded(png), "box": [1, 1, 59, 39]}])
    with running(create_app(tiny_model, config)) as url, openai_client(url) as oa:
        def create(input: Any, **kwargs: Any) -> Any:  # noqa: A002
            return oa.embeddings.create(model=kwargs.pop("model", NAME), input=input, **kwargs)

        # token ids (what LangChain's OpenAIEmbeddings sends by default): refused, saying how to send text
        for ids, param in (([[9707, 1879], [1312]], "input"), ([9707, 1879], "input"), (["ok", [9707]], "input[1]")):
            with expect(openai.UnprocessableEntityError, 422, "token ids are not accepted", "Send the text itself",
                        "check_embedding_ctx_length=False", param=param, code="token_ids_not_supported"):
                create(ids)
        # a box outside the image: the message names the input, `param` the item
        with expect(openai.UnprocessableEntityError, 422, "input 1: box [10, 10, 100, 30] lies outside the 60x40",
                    param="input[1]", code="invalid_prompt"):
            create(["fine", {"image": data_url(png), "box": [10, 10, 100, 30]}])
        with expect(openai.UnprocessableEntityError, 422, "input 0: box:", param="input[0].box"):
            create([{"image": data_url(png), "box": [10, 10, 30]}])
        with expect(openai.UnprocessableEntityError, 422, "input 2: image: invalid base64", param="input[2].image"):
            create(["a", "b", {"image": "data:image/png;base64,not base64!"}])
        with expect(openai.UnprocessableEntityError, 422, "input 0: colour:", param="input[0].colour"):
            create([{"text": "x", "colour": "red"}])
        # limits of POST /embed: items (413 -> the client's APIStatusError), text length, pixels
        with expect(openai.APIStatusError, 413, "input: 5 items; the limit is 4", param="input",
                    code="too_many_inputs"):
            create(["a", "b", "c", "d", "e"])
        with expect(openai.APIStatusError, 413, "input 0: text has 101 characters; the limit is 100",
                    param="input[0].text", code="text_too_long"):
            create("x" * 101)
        with expect(openai.APIStatusError, 413, "input 1: image: 200x200 = 40000 pixels", param="input[1].image"):
            create(["a", {"image": data_url(png_bytes(_white(200, 200)))}])
        # dimensions other than the model's; a model name that is not served
        with expect(openai.UnprocessableEntityError, 422, "tiny-virtue embeds in 32 dimensions; 16",
                    param="dimensions", code="invalid_dimensions"):
            create("a", dimensions=16)
        with expect(openai.NotFoundError, 404, "The model `text-embedding-3-small` does not exist",
                    f"serves `{NAME}`", param="model", code="model_not_found"):
            create("a", model="text-embedding-3-small")
        with expect(openai.UnprocessableEntityError, 422, "input 0: empty input", param="input[0]"):
            create([""])
        with expect(openai.UnprocessableEntityError, 422, "encoding_format:", param="encoding_format"):
            create("a", extra_body={"encoding_format": "int8"})
        with expect(openai.UnprocessableEntityError, 422, "input: the list is empty", param="input"):
            create([])

        with client(url) as http:
            def post(body: Any) -> httpx.Response:
                return http.post("/v1/embeddings", json=body)

            assert_openai_error(post({"model": NAME, "input": ["a"], "temperature": 1}), 422,
                                "temperature: unknown parameter", param="temperature")
            assert_openai_error(post({"input": ["a"]}), 422, "model: Field required", param="model")
            assert_openai_error(post({"model": NAME, "input": [True]}), 422, "input 0: expected a string or an "
                                "object", "got a boolean", param="input[0]")
            assert_openai_error(post({"model": NAME, "input": 3.5}), 422, "input: expected a string", param="input")
            assert_openai_error(http.post("/v1/embeddings", content=b'{"model": ', headers={
                "content-type": "application/json"}), 422, "invalid JSON", code="invalid_json")
            # errors no /v1 endpoint wrote are in OpenAI's shape too: the body-size limit, unknown routes, methods
            assert_openai_error(post({"model": NAME, "input": "x" * 150_000}), 413, "the limit is 100000 bytes",
                                code="request_too_large")
            assert_openai_error(http.post("/v1/chat/completions", json={}), 404, "POST /v1/chat/completions",
                                "POST /v1/embeddings", code="not_found")
            assert_openai_error(http.get("/v1/embeddings"), 405, "GET /v1/embeddings", code="method_not_allowed")
            # /embed keeps its own error shape
            r = http.post("/embed", json={"inputs": ["a"] * 5})
            assert r.status_code == 413 and r.json()["error"] == "too_many_inputs", r.text

            # the server is unharmed, and nothing answered 500
            r = post({"model": NAME, "input": [{"image": data_url(png), "box": [1, 1, 59, 39]}]})
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(np.array([r.json()["data"][0]["embedding"]]), expected, atol=ATOL)


class CountingTokenizer:
    """The model's tokenizer with its tokenising calls recorded (copies record into the same list); every other
    attribute is the tokenizer's own. Not the code under test."""

    COUNTED = frozenset({"encode", "encode_plus", "batch_encode_plus", "tokenize"})

    def __init__(self, tokenizer, calls: list):
        self._tokenizer, self.calls = tokenizer, calls

    def __call__(self, text, *args, **kwargs):
        self.calls.append(text)
        return self._tokenizer(text, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._tokenizer, name)
        if name not in self.COUNTED:
            return value

        def counted(text, *args, **kwargs):
            self.calls.append(text)
            return value(text, *args, **kwargs)

        return counted

    def __deepcopy__(self, memo):  # a private copy of the tokenizer would still be counted
        return CountingTokenizer(copy.deepcopy(self._tokenizer, memo), self.calls)


def test_each_input_is_tokenised_once(tiny_model, fixture_images, llm_tokens, monkeypatch):
    # The request's check tokenises each input (for usage) and `encode` reuses those ids: one call per input.
    png = fixture_images["rocket.png"].read_bytes()  # 240 x 160
    texts = ["a rocket on a launch pad", "a cup of coffee", "two words", "a somewhat longer fourth text"]
    region = {"image": decoded(png), "box": [20, 10, 200, 150], "text": INSTRUCTION}
    expected = tiny_model.encode([*texts, region])
    tokens = llm_tokens(tiny_model, [*texts, region])
    counted = expected_usage(tiny_model, [*texts, region])
    assert tokens == counted
    items = [*texts, {"image": data_url(png), "box": [20, 10, 200, 150], "text": INSTRUCTION}]
    calls: list = []
    monkeypatch.setattr(tiny_model.processor, "tokenizer", CountingTokenizer(tiny_model.processor.tokenizer, calls))
    with running(create_app(tiny_model, ServeConfig(model_name=NAME))) as url, client(url) as http:
        r = http.post("/v1/embeddings", json={"model": NAME, "input": items})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array([d["embedding"] for d in r.json()["data"]]), expected, atol=ATOL)
        assert r.json()["usage"]["prompt_tokens"] == tokens
        assert len(calls) == len(items) and set(texts) <= set(calls), calls
        calls.clear()
        r = http.post("/embed", json={"inputs": items})  # the same door
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["embeddings"]), expected, atol=ATOL)
        assert len(calls) == len(items), calls


class GatedModel(WrappedModel):
    """The gated model (see `WrappedModel`) that breaks, not with an input error, on the text "boom" (a
    stand-in for a bug or a device failure)."""

    def encode(self, inputs, **kwargs):
        if any(getattr(item, "text", None) == "boom" for item in inputs):
            raise RuntimeError("device lost")
        return super().encode(inputs, **kwargs)


def test_full_queue_answers_503_and_failures_500_in_openai_shape(tiny_model):
    gated = GatedModel(tiny_model)
    expected = tiny_model.encode(["a request"])
    config = ServeConfig(model_name=NAME, queue_size=1, max_batch_items=1, max_wait_ms=0, retry_after_s=2)
    with running(create_app(gated, config)) as url, client(url) as http:
        def one(_: int) -> httpx.Response:
            with client(url) as own:
                return own.post("/v1/embeddings", json={"model": NAME, "input": ["a request"]})

        def wait_for(what: str, ready: Callable[[dict], bool]) -> None:
            deadline = time.monotonic() + 30
            while not ready(http.get("/health").json()):
                assert time.monotonic() < deadline, what
                time.sleep(0.01)

        assert one(0).status_code == 200  # served once before the queue is filled
        # With the model held, at most one request is encoding and one waits; the others are refused.
        gated.gate.clear()
        with ThreadPoolExecutor(6) as pool:
            try:
                futures = [pool.submit(one, n) for n in range(6)]
                wait_for("4 requests refused", lambda health: health["stats"]["rejected"] >= 4)
            finally:
                gated.gate.set()
            responses = [f.result() for f in futures]
        ok = [r for r in responses if r.status_code == 200]
        busy = [r for r in responses if r.status_code == 503]
        # two when the worker took the first request before the second arrived, else one
        assert len(ok) in (1, 2) and len(ok) + len(busy) == 6, [r.status_code for r in responses]
        for r in busy:
            assert r.headers["retry-after"] == "2"
            assert_openai_error(r, 503, "server busy", code="server_busy")
        for r in ok:
            np.testing.assert_allclose(np.array([r.json()["data"][0]["embedding"]]), expected, atol=ATOL)

        # the client's own type for a 503 (with max_retries > 0 it retries, honouring Retry-After)
        # One request held in `encode` first, then one waiting: sent together, the second could be refused
        # before the worker took the first.
        gated.gate.clear()
        gated.entered.clear()
        with ThreadPoolExecutor(2) as pool, openai_client(url) as oa:
            try:
                blockers = [pool.submit(one, 0)]
                assert gated.entered.wait(30), "the first request never reached the model"
                blockers.append(pool.submit(one, 1))
                wait_for("the queue did not fill", lambda health: health["queue_depth"] >= 1)
                with expect(openai.InternalServerError, 503, "server busy", code="server_busy"):
                    oa.embeddings.create(model=NAME, input="a request")
            finally:
                gated.gate.set()
            assert all(f.result().status_code == 200 for f in blockers)
        # a failure of the model that is no input error: 500, in OpenAI's shape as well
        assert_openai_error(http.post("/v1/embeddings", json={"model": NAME, "input": "boom"}), 500,
                            "internal error (RuntimeError)", code="internal_error")


def _white(width: int, height: int):
    from PIL import Image

    return Image.new("RGB", (width, height), "white")
