"""What a review of the core found, each case reproduced: SAM2 weights swapped silently, late validation, errors
outside the documented types, no length limit, process-wide flags, EXIF orientation, missing folders taken for
hub ids."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import FIXTURE
from virtue import CompatConfig, ImageError, InputError, PromptError, VirtueModel
from virtue.errors import CheckpointError, MissingSamWeightsError
from virtue.model.precision import cudnn_tf32_off
from virtue.model.presets import tiny_config


def official_copy(tmp_path, **virtue_sam):
    """The official fixture checkpoint with its SAM2 file moved away (and virtue_sam edited)."""
    dst = tmp_path / "ckpt"
    shutil.copytree(FIXTURE / "checkpoint", dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    config = json.loads((dst / "config.json").read_text())
    config["virtue_sam"].update(virtue_sam)
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "sam2.1_hiera_toy.pt").rename(tmp_path / "elsewhere.pt")
    return dst


def hub_sam_folder(tmp_path, model) -> str:
    """What the hub fallback would download: the toy SAM2 in transformers' layout."""
    folder = tmp_path / "hub-sam2"
    model.sam.model.save_pretrained(folder)
    return str(folder)


# --- SAM2 weights -----------------------------------------------------------------------------------------------


def test_hub_fallback_refused_for_another_sam2_size(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: calls.append(a) or str(tmp_path))
    ckpt = official_copy(tmp_path, config_path="sam2.1_hiera_l.yaml")
    with pytest.raises(MissingSamWeightsError, match="holds Hiera-B\\+ but virtue_sam.config_path names Hiera-l"):
        VirtueModel.from_pretrained(ckpt)
    assert calls == []  # refused before downloading anything


def test_hub_fallback_is_logged_and_recorded(tmp_path, monkeypatch, official_model, caplog):
    folder = hub_sam_folder(tmp_path, official_model)
    monkeypatch.setattr("huggingface_hub.snapshot_download", lambda *a, **k: folder)
    ckpt = official_copy(tmp_path, config_path="sam2.1_hiera_b+.yaml")  # b+: the fallback is the right size
    with caplog.at_level(logging.WARNING):
        model = VirtueModel.from_pretrained(ckpt)
    assert "using Hugging Face Hub facebook/sam2.1-hiera-base-plus" in caplog.text
    assert "sam2.1_hiera_toy.pt" in caplog.text  # what was looked for
    files = model.sam_source["files"]
    assert [f["file"] for f in files] == ["model.safetensors"]
    assert "Hugging Face Hub" in model.sam_source["description"]


def test_sam2_source_recorded_and_kept(official_model, tmp_path):
    (record,) = official_model.sam_source["files"]
    pt = FIXTURE / "checkpoint" / "sam2.1_hiera_toy.pt"
    assert record["file"] == pt.name and record["bytes"] == pt.stat().st_size
    assert record["sha256"] == hashlib.sha256(pt.read_bytes()).hexdigest()
    official_model.save_pretrained(tmp_path / "saved")
    assert VirtueModel.from_pretrained(tmp_path / "saved", allow_hub=False).sam_source == official_model.sam_source


# --- validation before compute ----------------------------------------------------------------------------------


def test_every_bad_input_named_before_any_compute(official_model, fixture_images, monkeypatch):
    calls = []
    monkeypatch.setattr(type(official_model), "forward", lambda self, *a, **k: calls.append(1))
    good = [{"image": fixture_images["rocket.png"], "box": [10, 10, 100, 100]} for _ in range(24)]
    bad = good[:10] + [{"image": fixture_images["rocket.png"], "box": [10, 10, 300, 50]}] + good[10:]
    bad.append({"image": fixture_images["rocket.png"], "points": [[-5, 10]]})
    with pytest.raises(PromptError) as info:
        official_model.encode(bad, batch_size=4)
    assert calls == []
    message = str(info.value)
    assert "2 bad inputs" in message and "input 10: box" in message and "input 25: points[0]" in message


def test_mixed_problems_are_all_named(official_model, fixture_images, tmp_path):
    with pytest.raises(InputError) as info:
        official_model.encode(["fine", {"image": tmp_path / "missing.png"},
                               {"image": fixture_images["rocket.png"], "box": [10, 10, 300, 50]}])
    assert type(info.value) is InputError
    assert "input 1: file not found" in str(info.value) and "input 2: box" in str(info.value)


# --- image reading ----------------------------------------------------------------------------------------------


def test_image_failures_are_image_errors(official_model, tmp_path, monkeypatch):
    with pytest.raises(ImageError, match="input 0: image is empty"):
        official_model.encode(np.zeros((0, 5, 3), np.float32))
    big = tmp_path / "big.png"
    Image.new("1", (3000, 2000)).save(big)
    monkeypatch.setattr(official_model.processor, "max_image_pixels", 1_000_000)
    with pytest.raises(ImageError, match="3000x2000 = 6,000,000 pixels exceeds the limit of 1,000,000"):
        official_model.encode({"image": big})
    # PIL's own decompression-bomb refusal becomes an ImageError too; PIL's process-wide limit is left alone.
    monkeypatch.setattr(official_model.processor, "max_image_pixels", None)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(ImageError, match="input 0: cannot read .*DecompressionBombError"):
        official_model.encode({"image": big})
    assert Image.MAX_IMAGE_PIXELS == 1_000_000


# --- length -----------------------------------------------------------------------------------------------------


def test_text_past_the_limit(tiny_model):
    long_text = "word " * 40_000
    limit = tiny_model.processor.length_limit(False)
    with pytest.raises(InputError, match=f"input 0: 40,00[0-9] tokens, above the limit of {limit:,}"):
        tiny_model.encode(long_text)
    text = " ".join(f"w{i}" for i in range(60))
    with pytest.raises(InputError, match="above the limit of 20 \\(max_length"):
        tiny_model.encode(text, max_length=20)
    truncated = tiny_model.encode(text, max_length=20, truncate=True)
    ids = tiny_model.processor.token_ids(text)[:20]
    np.testing.assert_allclose(truncated, tiny_model.encode(tiny_model.processor.tokenizer.decode(ids)), atol=1e-6)


# --- process-wide state -----------------------------------------------------------------------------------------


WAIT_S = 30  # a generous bound on each handshake, so that a broken scope fails the test instead of hanging it


def test_tf32_scope_is_shared_by_overlapping_calls():
    """Two threads share the process-wide flag. Nested (the second call leaves first) and overlapping without
    nesting (A enters, B enters, A leaves while B still runs): a scope that saves the flag on entry and restores it
    on exit turns TF32 back on under B in the second case, and leaves it off once both are gone."""
    before = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    seen, started, release = [], threading.Event(), threading.Event()

    def first():
        with cudnn_tf32_off():
            started.set()
            release.wait(WAIT_S)
            seen.append(("first", torch.backends.cudnn.allow_tf32))

    def second():
        started.wait(WAIT_S)
        with cudnn_tf32_off():
            seen.append(("second-in", torch.backends.cudnn.allow_tf32))
        release.set()  # the first call is still inside: the flag must stay off for it

    # Overlapping, not nested: each step waits on the previous one's event, so the order is fixed.
    overlap, a_in, b_in, a_out = [], threading.Event(), threading.Event(), threading.Event()

    def a():
        with cudnn_tf32_off():
            a_in.set()
            overlap.append(("a waited for b", b_in.wait(WAIT_S)))
        a_out.set()

    def b():
        overlap.append(("b waited for a", a_in.wait(WAIT_S)))
        with cudnn_tf32_off():
            b_in.set()
            overlap.append(("b waited for a to leave", a_out.wait(WAIT_S)))
            overlap.append(("b after a left", torch.backends.cudnn.allow_tf32))

    try:
        run_threads(first, second)
        assert seen == [("second-in", False), ("first", False)]
        assert torch.backends.cudnn.allow_tf32 is True  # restored once the last call left

        run_threads(a, b)
        assert overlap == [("b waited for a", True), ("a waited for b", True), ("b waited for a to leave", True),
                           ("b after a left", False)]
        assert torch.backends.cudnn.allow_tf32 is True  # restored once the last call (b) left
    finally:
        torch.backends.cudnn.allow_tf32 = before


def run_threads(*targets) -> None:
    threads = [threading.Thread(target=t) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * WAIT_S)
    assert not any(t.is_alive() for t in threads), "a thread is stuck"


def test_building_in_bfloat16_leaves_the_default_dtype_alone(tokenizer):
    observed, stop = set(), threading.Event()

    def watch():
        while not stop.is_set():
            observed.add(torch.get_default_dtype())
            observed.add(torch.zeros(1).dtype)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        model = VirtueModel.from_pretrained(FIXTURE / "checkpoint", dtype=torch.bfloat16, allow_hub=False)
    finally:
        stop.set()
        watcher.join()
    assert observed == {torch.float32}
    assert next(model.qwen.parameters()).dtype == torch.bfloat16


# --- EXIF orientation -------------------------------------------------------------------------------------------


@pytest.fixture
def rotated_photo(tmp_path):
    """A JPEG stored 120 x 80 with EXIF orientation 6: viewers show it turned, 80 x 120."""
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_for_users_not_for_official_or_datasets(tokenizer, rotated_photo):
    from PIL import ImageOps

    torch.manual_seed(0)
    clean = VirtueModel(tiny_config(), tokenizer).eval()
    upright = ImageOps.exif_transpose(Image.open(rotated_photo))
    assert upright.size == (80, 120)
    box = [5, 90, 60, 115]  # drawn on the photo as displayed: outside the stored 120 x 80 pixels
    np.testing.assert_allclose(clean.encode({"image": rotated_photo, "box": box}),
                               clean.encode({"image": upright, "box": box}), atol=1e-6)
    from virtue.inputs import as_stored, parse_input

    stored = Image.open(rotated_photo)
    stored.load()
    row = as_stored(parse_input({"image": rotated_photo}))  # a dataset row: its boxes are in stored pixels
    np.testing.assert_allclose(clean.encode(row), clean.encode(np.asarray(stored)), atol=1e-6)
    official = VirtueModel(tiny_config(compat=CompatConfig.official()), tokenizer).eval()
    assert CompatConfig.official().exif_orientation is False
    with pytest.raises(PromptError, match="outside the 120x80 image"):
        official.encode({"image": rotated_photo, "box": box})
    old = CompatConfig.from_dict({"sam_input_from_qwen_pixels": True, "boxes_in_raw_pixels": True})
    assert old.exif_orientation is False  # configs saved before the flag keep the official reading


# --- names ------------------------------------------------------------------------------------------------------


def test_local_looking_names_never_reach_the_hub(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_hub)
    monkeypatch.chdir(tmp_path)
    for name in ("./models/virtue-2b", "~/no-such-virtue", "/no/such/virtue"):
        with pytest.raises(CheckpointError, match="no local folder .*the hub is not asked"):
            VirtueModel.from_pretrained(name)


def test_missing_folder_that_looks_like_a_hub_id_says_both(tmp_path, monkeypatch):
    def offline(repo_id, **kwargs):
        raise OSError(f"cannot reach the hub for {repo_id}")

    monkeypatch.setattr("huggingface_hub.snapshot_download", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as info:
        VirtueModel.from_pretrained("models/virtue-2b")
    message = str(info.value)
    assert f"no local folder {tmp_path}/models/virtue-2b" in message
    assert "not downloadable from the hub (OSError: cannot reach the hub for models/virtue-2b)" in message
