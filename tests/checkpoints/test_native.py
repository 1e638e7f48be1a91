"""The library layout: save/load round trips, conversion, and the compatibility setting."""

from __future__ import annotations

import numpy as np
import pytest

from virtue import CheckpointError, CompatConfig, PromptError, VirtueModel
from virtue.model.convert import convert_checkpoint


def inputs(fixture_images) -> list:
    return [{"image": fixture_images["rocket.png"], "text": "Describe the object.", "box": [108, 22, 132, 152]},
            {"image": fixture_images["astronaut.png"], "points": [[60, 60]]}, "A rocket"]


def test_tiny_model_round_trip(tiny_model, fixture_images, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".pth", ".pt")) for f in files)
    loaded = VirtueModel.from_pretrained(tmp_path / "m", allow_hub=False)
    assert loaded.config == tiny_model.config
    np.testing.assert_allclose(loaded.encode(inputs(fixture_images)), tiny_model.encode(inputs(fixture_images)),
                               atol=1e-6)


def test_converted_checkpoint_keeps_dtypes_and_compat(converted_dir, fixture_dir):
    from safetensors import safe_open

    with safe_open(str(converted_dir / "model.safetensors"), "pt") as f:
        assert f.get_slice("qwen.language_model.embed_tokens.weight").get_dtype() == "BF16"
        assert f.get_slice("connector.reducer.weight").get_dtype() == "F32"
    model = VirtueModel.from_pretrained(converted_dir, allow_hub=False)
    assert model.config.compat == CompatConfig.official()
    with pytest.raises(CheckpointError, match="already in the library layout"):
        convert_checkpoint(converted_dir, converted_dir.parent / "again", allow_hub=False)
    with pytest.raises(CheckpointError, match="not empty"):
        convert_checkpoint(fixture_dir / "checkpoint", converted_dir, allow_hub=False)


def test_compat_override_changes_box_and_image_handling(fixture_dir, fixture_images, _official_model):
    clean = VirtueModel.from_pretrained(fixture_dir / "checkpoint", compat=CompatConfig.clean(), allow_hub=False)
    official = _official_model.encode(inputs(fixture_images))
    fixed = clean.encode(inputs(fixture_images))
    assert np.abs(official[0] - fixed[0]).max() > 1e-3  # boxes scaled, SAM input normalised once
    assert np.abs(official[1] - fixed[1]).max() > 1e-3  # SAM input normalised once
    np.testing.assert_allclose(official[2], fixed[2], atol=1e-7)  # text does not touch SAM


def test_model_without_sam_branch(tokenizer, fixture_images):
    from virtue.model.presets import tiny_config

    model = VirtueModel(tiny_config(sam_enabled=False), tokenizer).eval()
    assert model.sam is None
    assert model.encode({"image": fixture_images["rocket.png"], "text": "hi"}).shape == (32,)
    with pytest.raises(PromptError, match="no SAM branch"):
        model.encode({"image": fixture_images["rocket.png"], "box": [1, 1, 20, 20]})


def test_sentence_transformers_files_are_an_explicit_choice(tiny_model, fixture_images, tmp_path):
    """Every library save writes the ST files unless asked not to (what `SentenceTransformer.save` asks, as it
    writes its own); the weights and config are the same either way."""
    from virtue.checkpoints.st_files import MODULE_CONFIG_FILE, MODULES_FILE, NORMALIZE_DIR, ST_CONFIG_FILE

    tiny_model.save_pretrained(tmp_path / "with")
    tiny_model.save_pretrained(tmp_path / "without", sentence_transformers_files=False)
    for name in (MODULES_FILE, ST_CONFIG_FILE, MODULE_CONFIG_FILE, f"{NORMALIZE_DIR}/config.json"):
        assert (tmp_path / "with" / name).is_file(), name
        assert not (tmp_path / "without" / name).exists(), name
    expected = tiny_model.encode(inputs(fixture_images))
    for folder in ("with", "without"):
        loaded = VirtueModel.from_pretrained(tmp_path / folder, allow_hub=False)
        np.testing.assert_allclose(loaded.encode(inputs(fixture_images)), expected, atol=1e-6)
