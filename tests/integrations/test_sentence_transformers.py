"""sentence-transformers 6: folders written by `virtue` load with the installed `SentenceTransformer` and embed
exactly as `VirtueModel.encode`; the saved prompts reproduce the official query and candidate texts.

Nothing here reaches the network: the hub is switched off and every socket connection attempt fails the test."""

from __future__ import annotations

import importlib
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from tests.conftest import FIXTURE, require
from virtue import EmbedInput, InputError, PromptError, VirtueModel, mmeb_query_text, scar_query_text
from virtue.checkpoints.st_files import MODULE_TYPE
from virtue.errors import ConfigError
from virtue.integrations.sentence_transformers import PROMPTS, VirtueModule, apply_prompt, as_sentence_transformer
from virtue.processing.text import SCAR_INSTRUCTION
from virtue.prompts import Box, Points, VisualPrompt

st = require("sentence_transformers", "the sentence-transformers integration: pip install -e '.[st]'")
SentenceTransformer = st.SentenceTransformer

ATOL = 1e-5
BOX = [108, 22, 132, 152]  # on rocket.png (240 x 160), the box of the fixture's SCaR cases c1 / f1 / g3


@pytest.fixture(scope="module", autouse=True)
def no_network():
    """HF offline (env and the already-imported constant), and a socket guard that records and refuses every
    connection, so a download attempt fails loudly instead of being caught and ignored."""
    import huggingface_hub.constants as hf_constants

    attempts: list = []

    def refuse(sock, address):
        attempts.append(address)
        raise OSError(f"network access in a test: {address}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(hf_constants, "HF_HUB_OFFLINE", True)
        mp.setattr(socket.socket, "connect", refuse)
        yield
    assert not attempts, f"tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory) -> tuple[VirtueModel, Path]:
    """A tiny random VIRTUE (clean compatibility setting), saved by `virtue`."""
    from virtue.model.presets import tiny_config

    torch.manual_seed(0)
    model = VirtueModel(tiny_config(), tokenizer).eval()
    path = tmp_path_factory.mktemp("st") / "tiny"
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def st_model(tiny) -> SentenceTransformer:
    return SentenceTransformer(str(tiny[1]), trust_remote_code=True, device="cpu")


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    return {n: Image.open(FIXTURE / "images" / n).convert("RGB") for n in ("rocket.png", "astronaut.png", "coffee.png")}


@pytest.fixture(scope="module")
def mixed(tiny, images) -> tuple[list, np.ndarray]:
    """Every input kind in one list, and what `VirtueModel.encode` gives for it (computed once)."""
    inputs = mixed_inputs(images)
    return inputs, tiny[0].encode(inputs)


def mixed_inputs(images: dict[str, Image.Image]) -> list:
    rocket, astronaut = images["rocket.png"], images["astronaut.png"]
    mask = np.zeros((rocket.height, rocket.width), bool)
    mask[30:120, 100:140] = True
    return [
        "A cat",
        rocket,
        {"image": astronaut, "box": [66, 6, 128, 74]},
        "The rocket standing on the launch pad at dusk, surrounded by towers and bright floodlights.",
        {"image": rocket, "text": "Describe the object.", "box": BOX},
        {"image": rocket, "points": [[120, 60], [20, 20]], "labels": [1, 0]},
        {"image": FIXTURE / "images" / "coffee.png", "text": "a cup"},
        {"image": rocket, "mask": mask},
        np.asarray(astronaut),
        "cat",
    ]


# ------------------------------------------------------------------------------------------------ loading
def test_saved_folder_is_a_sentence_transformer(tiny, st_model):
    _, path = tiny
    modules = json.loads((path / "modules.json").read_text())
    assert [m["type"] for m in modules] == ["virtue.integrations.sentence_transformers.VirtueModule",
                                             "sentence_transformers.base.modules.normalize.Normalize"]
    config = json.loads((path / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == PROMPTS and config["default_prompt_name"] is None
    assert set(config["requirements"]) == {"virtue", "sentence_transformers"}
    assert isinstance(st_model[0], VirtueModule) and type(st_model[1]).__name__ == "Normalize"
    assert st_model.modalities == ["text", "image", ("image", "text"), "message"]
    assert st_model.supports(("image", "text")) and not st_model.supports("audio")
    assert st_model.get_embedding_dimension() == 32 and st_model.similarity_fn_name == "cosine"
    assert st_model.prompts["query"] == SCAR_INSTRUCTION
    # The library layout is untouched: virtue still reads the folder.
    assert VirtueModel.from_pretrained(path, allow_hub=False).config == tiny[0].config


def test_saved_module_type_names_this_module_class():
    """The checkpoint layer writes the module class as a string (it does not import the integration): that string
    must name the class that loads the folder."""
    module, _, name = MODULE_TYPE.rpartition(".")
    assert getattr(importlib.import_module(module), name) is VirtueModule


def test_loading_needs_trust_remote_code(tiny):
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        SentenceTransformer(str(tiny[1]), device="cpu")


# ------------------------------------------------------------------------------------------------ equality
def test_encode_equals_virtue_encode(tiny, st_model, images, mixed):
    """The promised check: texts, images and boxed regions, alone and as one mixed list, equal
    `VirtueModel.encode` within 1e-5."""
    model, _ = tiny
    texts = ["A cat", "The rocket standing on the launch pad at dusk.", "cat"]
    pictures = [images["rocket.png"], images["astronaut.png"], FIXTURE / "images" / "coffee.png"]
    regions = [{"image": images["rocket.png"], "box": BOX}, {"image": images["astronaut.png"], "box": [66, 6, 128, 74]},
               {"image": images["rocket.png"], "box": [10, 10, 60, 90], "text": "the left tower"}]
    for batch in (texts, pictures, regions):
        got = st_model.encode(batch, batch_size=2)
        want = model.encode(batch)
        assert got.shape == want.shape == (len(batch), 32)
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)
    inputs, want = mixed
    got = st_model.encode(inputs, batch_size=3)
    assert got.shape == (len(inputs), 32)
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


def test_encode_options(tiny, st_model, images, mixed):
    model, _ = tiny
    inputs, want = mixed
    normalized = st_model.encode(inputs, normalize_embeddings=True, batch_size=len(inputs))
    np.testing.assert_allclose(normalized, want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(normalized, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(st_model.encode(inputs, batch_size=1), want, atol=ATOL, rtol=0)
    tensor = st_model.encode(inputs[:3], convert_to_tensor=True)
    assert isinstance(tensor, torch.Tensor) and tensor.shape == (3, 32)
    np.testing.assert_allclose(tensor.numpy(), want[:3], atol=ATOL, rtol=0)
    single = st_model.encode(inputs[2])
    assert single.shape == (32,)
    np.testing.assert_allclose(single, want[2], atol=ATOL, rtol=0)
    squashed = st_model.encode(inputs[:3], image_resize=(64, 64))
    np.testing.assert_allclose(squashed, model.encode(inputs[:3], image_resize=(64, 64)), atol=ATOL, rtol=0)


def test_st_conventions_paths_and_messages(tiny, st_model, images):
    """A string naming an existing image file is an image (as ST reads it); chat messages are accepted, a system
    message being the input's instruction."""
    model, _ = tiny
    path = FIXTURE / "images" / "coffee.png"
    np.testing.assert_allclose(st_model.encode([str(path)]), model.encode([path]), atol=ATOL)
    np.testing.assert_allclose(st_model.encode({"image": str(path)}), model.encode({"image": path}), atol=ATOL)
    message = [{"role": "user", "content": [{"type": "image", "image": images["rocket.png"]},
                                            {"type": "text", "text": "a rocket"}]}]
    np.testing.assert_allclose(st_model.encode([message])[0], model.encode({"image": images["rocket.png"],
                                                                            "text": "a rocket"}), atol=ATOL)
    system = [{"role": "system", "content": PROMPTS["mmeb_cls"]}, {"role": "user", "content": "a red square"}]
    np.testing.assert_allclose(st_model.encode([system])[0],
                               model.encode(mmeb_query_text(PROMPTS["mmeb_cls"], "a red square", with_image=False,
                                                            family="t2i")), atol=ATOL)


# ------------------------------------------------------------------------------------------------ prompts
def test_encode_query_default_prompt_is_the_official_scar_query(tiny, st_model, images):
    model, _ = tiny
    rocket, astronaut = images["rocket.png"], images["astronaut.png"]
    queries = [{"image": rocket, "box": BOX}, {"image": astronaut, "box": [66, 6, 128, 74]}]
    official = [{**q, "text": scar_query_text(q["box"])} for q in queries]
    np.testing.assert_allclose(st_model.encode_query(queries), model.encode(official), atol=ATOL, rtol=0)
    # ... which is neither the plain encoding nor what `encode` (no prompt) gives.
    assert np.abs(st_model.encode(queries) - model.encode(official)).max() > 1e-3
    # The same text the official SCaR evaluation wrote in the fixture (case c1).
    cases = {c["name"]: c for c in json.loads((FIXTURE / "cases.json").read_text())["cases"]}
    built = apply_prompt(EmbedInput(image=rocket, prompt=VisualPrompt(box=Box.from_xyxy(BOX))), PROMPTS["query"])
    assert built.text == cases["c1"]["items"][0]["text"]


def test_prompt_name_and_prompt_select_mmeb_instructions(tiny, st_model, images):
    model, _ = tiny
    rocket = images["rocket.png"]
    cases = {c["name"]: c for c in json.loads((FIXTURE / "cases.json").read_text())["cases"]}
    # MMEB classification query: the fixture's case a2 text, from the "mmeb_cls" prompt.
    a2 = cases["a2"]["items"][0]["text"]
    assert apply_prompt(EmbedInput(image=rocket), PROMPTS["mmeb_cls"]).text == a2
    want = model.encode({"image": rocket, "text": a2})
    np.testing.assert_allclose(st_model.encode(rocket, prompt_name="mmeb_cls"), want, atol=ATOL)
    np.testing.assert_allclose(st_model.encode_query(rocket, prompt=PROMPTS["mmeb_cls"]), want, atol=ATOL)
    # VQA: the instruction on its own line, the question after it, as the official qa parser writes it.
    vqa = st_model.encode_query({"image": rocket, "text": "What is in the image?"}, prompt_name="mmeb_vqa")
    text = mmeb_query_text(PROMPTS["mmeb_vqa"], "What is in the image?", family="qa")
    assert text == "<|image_pad|>\nRepresent the given image with the following question: What is in the image?\n"
    np.testing.assert_allclose(vqa, model.encode({"image": rocket, "text": text}), atol=ATOL)
    # Text-to-image query.
    t2i = st_model.encode_query(["a red square"], prompt_name="mmeb_t2i")
    want = model.encode(["Find me an everyday image that matches the given caption: a red square\n"])
    np.testing.assert_allclose(t2i, want, atol=ATOL)
    with pytest.raises(ValueError, match="not found in the configured prompts"):
        st_model.encode("x", prompt_name="no_such_prompt")


def test_encode_document_writes_candidates_as_the_official_evaluation(tiny, st_model, images):
    model, _ = tiny
    rocket = images["rocket.png"]
    cases = {c["name"]: c for c in json.loads((FIXTURE / "cases.json").read_text())["cases"]}
    candidates = ["A cat", rocket, "The rocket standing on the launch pad at dusk."]
    official = ["A cat", {"image": rocket, "text": cases["e1"]["items"][0]["text"]},
                "The rocket standing on the launch pad at dusk."]
    np.testing.assert_allclose(st_model.encode_document(candidates), model.encode(official), atol=ATOL, rtol=0)
    # An image candidate with a caption, under MMEB's candidate instruction.
    got = st_model.encode_document({"image": rocket, "text": "a red rocket"}, prompt_name="mmeb_image")
    want = model.encode({"image": rocket, "text": "<|image_pad|>\nRepresent the given image. a red rocket\n"})
    np.testing.assert_allclose(got, want, atol=ATOL)


def test_apply_prompt_rules():
    image = Image.new("RGB", (64, 48))
    points = EmbedInput(image=image, prompt=VisualPrompt(points=Points([[10, 10]])))
    assert apply_prompt(points, "Find it.").text == "<|image_pad|> \nFind it.\n"
    boxed = EmbedInput(text="the dog", image=image, prompt=VisualPrompt(box=Box.from_xyxy([1, 2, 30.5, 40])))
    want = "<|image_pad|> \nFind it. the dog\nReferring object bbox: [1, 2, 30.5, 40]"
    assert apply_prompt(boxed, "Find it.").text == want
    assert apply_prompt(boxed, "").text == "the dog"
    with pytest.raises(InputError, match="already holds the image placeholder"):
        apply_prompt(EmbedInput(text="<|image_pad|>\nhi", image=image), "Find it.")


# ------------------------------------------------------------------------------------------------ errors
def test_bad_dict_names_the_input_and_the_key(st_model, images):
    rocket = images["rocket.png"]
    with pytest.raises(InputError, match=r"input \{'image': <PIL image RGB 240x160>, 'boxx': \[1, 2, 30, 40\]\}: "
                                         r"unknown key\(s\) \['boxx'\]"):
        st_model.encode(["fine", {"image": rocket, "boxx": [1, 2, 30, 40]}])
    # Found inside VirtueModel.encode (the box against the image's size): still named by the input, not by its
    # row in ST's length-sorted batch.
    with pytest.raises(PromptError, match=r"input \{'image': <PIL image RGB 240x160>, 'box': \[100, 20, 400, 60\]\}"):
        st_model.encode(["fine", "also fine", {"image": rocket, "box": [100, 20, 400, 60]}])
    with pytest.raises(InputError, match="one image per input"):
        st_model.encode([[{"role": "user", "content": [{"type": "image", "image": rocket},
                                                        {"type": "image", "image": rocket}]}]])


# ------------------------------------------------------------------------------------------------ other folders
def test_converted_official_checkpoint_reproduces_official_embeddings(converted_dir):
    """`virtue convert` output loads in ST, and the saved prompts give the official evaluation's embeddings of
    the fixture (SCaR query c1, MMEB query a2, image candidate e1, text candidate d1)."""
    model = SentenceTransformer(str(converted_dir), trust_remote_code=True, device="cpu")
    rocket = Image.open(FIXTURE / "images" / "rocket.png")
    coffee = Image.open(FIXTURE / "images" / "coffee.png")
    with safe_open(str(FIXTURE / "expected.safetensors"), "pt") as f:
        expected = {name: f.get_tensor(f"{name}/embedding")[0].numpy() for name in ("c1", "a2", "e1", "d1")}
    got = {
        "c1": model.encode_query({"image": rocket, "box": BOX}),
        "a2": model.encode_query(coffee, prompt_name="mmeb_cls"),
        "e1": model.encode_document(rocket),
        "d1": model.encode_document("A cat"),
    }
    for name, vector in got.items():
        np.testing.assert_allclose(vector, expected[name], atol=ATOL, rtol=0, err_msg=name)


def test_st_save_round_trip_keeps_prompts_and_library_layout(tiny, mixed, tmp_path):
    model, path = tiny
    loaded = SentenceTransformer(str(path), trust_remote_code=True, device="cpu", prompts={"query": "Find it."})
    loaded.save(str(tmp_path / "saved"))
    config = json.loads((tmp_path / "saved" / "config_sentence_transformers.json").read_text())
    assert config["prompts"]["query"] == "Find it." and "virtue" in config["requirements"]
    again = SentenceTransformer(str(tmp_path / "saved"), trust_remote_code=True, device="cpu")
    inputs, want = mixed[0][:3], mixed[1][:3]
    np.testing.assert_allclose(again.encode(inputs), want, atol=ATOL, rtol=0)
    assert again.prompts["query"] == "Find it."
    reread = VirtueModel.from_pretrained(tmp_path / "saved", allow_hub=False)
    np.testing.assert_allclose(reread.encode(inputs), want, atol=ATOL, rtol=0)


def test_in_memory_model(tiny, mixed):
    """`as_sentence_transformer`: the same pipeline and prompts around an already loaded model, no files."""
    model, _ = tiny
    wrapped = as_sentence_transformer(model)
    assert wrapped.prompts == PROMPTS and wrapped[0].model is model
    np.testing.assert_allclose(wrapped.encode(mixed[0][:4]), mixed[1][:4], atol=ATOL, rtol=0)


def test_model_kwargs(tiny):
    _, path = tiny
    half = SentenceTransformer(str(path), trust_remote_code=True, device="cpu", model_kwargs={"dtype": "bfloat16"})
    assert half[0].model.dtype == torch.bfloat16
    assert half.encode(["A cat"]).dtype == np.float32
    with pytest.raises(ConfigError, match=r"model_kwargs: \['low_cpu_mem_usage'\] not supported"):
        SentenceTransformer(str(path), trust_remote_code=True, device="cpu", model_kwargs={"low_cpu_mem_usage": True})
