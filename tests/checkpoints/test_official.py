"""The official-layout reader on variants of the fixture checkpoint (shards, untied head, safetensors,
another grid size) and on broken copies of it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from virtue import (
    CheckpointError,
    MissingSamWeightsError,
    UnknownLayoutError,
    VirtueModel,
    WeightMismatchError,
)
from virtue.processing.sam import grid_points

QUERY = "<|image_pad|> \nFind the caption.\nReferring object bbox: [108, 22, 132, 152]"


def copy_checkpoint(fixture_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(fixture_dir / "checkpoint", dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def load(path: Path) -> VirtueModel:
    return VirtueModel.from_pretrained(path, allow_hub=False)


def probe_inputs(fixture_images) -> list:
    return [{"image": fixture_images["rocket.png"], "text": QUERY, "box": [108, 22, 132, 152]},
            {"image": fixture_images["coffee.png"]}, "The rocket standing on the launch pad at dusk"]


def test_sharded_bins_with_untied_head(fixture_dir, fixture_images, _official_model, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    state["lm_head.weight"] = torch.randn_like(state["lm_head.weight"])  # untied: its own values
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for name, part in shards.items():
        torch.save({k: state[k].clone() for k in part}, ckpt / name)
        weight_map.update({k: name for k in part})
    (ckpt / "pytorch_model.bin").unlink()
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((ckpt / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = False
    (ckpt / "config.json").write_text(json.dumps(config))
    inputs = probe_inputs(fixture_images)
    np.testing.assert_allclose(load(ckpt).encode(inputs), _official_model.encode(inputs), atol=1e-6)


def test_official_weights_as_safetensors(fixture_dir, fixture_images, _official_model, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(ckpt / "model.safetensors"))
    (ckpt / "pytorch_model.bin").unlink()
    inputs = probe_inputs(fixture_images)
    np.testing.assert_allclose(load(ckpt).encode(inputs), _official_model.encode(inputs), atol=1e-6)


def test_grid_size_comes_from_the_checkpoint(fixture_dir, fixture_images, _official_model, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    config = json.loads((ckpt / "config.json").read_text())
    config["virtue_sam"]["points_per_side"] = 2
    (ckpt / "config.json").write_text(json.dumps(config))
    model = load(ckpt)
    assert model.config.sam.points_per_side == 2
    path = fixture_images["coffee.png"]
    w, h = 240, 160
    grid_in_pixels = grid_points(2, 1024) * np.array([w / 1024, h / 1024])
    no_prompt = model.encode({"image": path})
    explicit = _official_model.encode({"image": path, "points": grid_in_pixels.tolist()})
    np.testing.assert_allclose(no_prompt, explicit, atol=1e-5)
    assert np.abs(no_prompt - _official_model.encode({"image": path})).max() > 1e-3


def test_missing_connector_file(fixture_dir, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    (ckpt / "sam2_reducer_and_vlm_layer.pth").unlink()
    with pytest.raises(CheckpointError, match="sam2_reducer_and_vlm_layer.pth: missing"):
        load(ckpt)


def test_connector_with_an_extra_key(fixture_dir, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    data = torch.load(ckpt / "sam2_reducer_and_vlm_layer.pth", weights_only=True)
    data["sam2vlm_layer"]["4.weight"] = torch.zeros(2)
    torch.save(data, ckpt / "sam2_reducer_and_vlm_layer.pth")
    with pytest.raises(WeightMismatchError, match=r"sam2vlm_layer\.4\.weight"):
        load(ckpt)


def test_connector_of_the_wrong_width(fixture_dir, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    data = torch.load(ckpt / "sam2_reducer_and_vlm_layer.pth", weights_only=True)
    data["sam2vlm_layer"]["2.weight"] = torch.zeros(7, 256)
    torch.save(data, ckpt / "sam2_reducer_and_vlm_layer.pth")
    with pytest.raises(WeightMismatchError, match=r"connector\.mlp\.2\.weight: expected \(24, 256\), got \(7, 256\)"):
        load(ckpt)


def test_unknown_weight_key_and_bad_head(fixture_dir, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    state = torch.load(ckpt / "pytorch_model.bin", weights_only=True)
    torch.save({**state, "adapter.lora_A": torch.zeros(1)}, ckpt / "pytorch_model.bin")
    with pytest.raises(WeightMismatchError, match="adapter.lora_A"):
        load(ckpt)
    torch.save({**state, "lm_head.weight": torch.zeros(3, 24)}, ckpt / "pytorch_model.bin")
    with pytest.raises(WeightMismatchError, match="lm_head.weight has shape"):
        load(ckpt)


def test_missing_sam_weights_lists_where_it_looked(fixture_dir, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    (ckpt / "sam2.1_hiera_toy.pt").unlink()
    with pytest.raises(MissingSamWeightsError) as info:
        load(ckpt)
    assert "sam2.1_hiera_toy.pt" in str(info.value) and "hub" in str(info.value)


def test_explicit_sam_checkpoint_is_used(fixture_dir, fixture_images, _official_model, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    elsewhere = tmp_path / "sam"
    elsewhere.mkdir()
    for name in ("sam2.1_hiera_toy.pt", "sam2.1_hiera_toy.yaml"):
        shutil.move(ckpt / name, elsewhere / name)
    model = VirtueModel.from_pretrained(ckpt, sam_checkpoint=elsewhere / "sam2.1_hiera_toy.pt", allow_hub=False)
    inputs = probe_inputs(fixture_images)[:2]
    np.testing.assert_allclose(model.encode(inputs), _official_model.encode(inputs), atol=1e-6)


def test_missing_shard_and_unknown_layout(fixture_dir, tmp_path):
    ckpt = copy_checkpoint(fixture_dir, tmp_path)
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {"a": "nope.bin"}}))
    with pytest.raises(CheckpointError, match="nope.bin"):
        load(ckpt)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnknownLayoutError, match="not a VIRTUE checkpoint"):
        load(other)
    with pytest.raises(CheckpointError, match="no local folder"):
        load(tmp_path / "does-not-exist")
