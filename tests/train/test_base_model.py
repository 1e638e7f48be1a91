"""The official starting point built from its parts: a Qwen2-VL-Instruct folder (as transformers writes it) +
a SAM2 `.pt` in Meta's format + a freshly initialised, seeded connector; trained, exported, reloaded."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import FIXTURE
from virtue import VirtueModel
from virtue.config import qwen_config
from virtue.errors import MissingSamWeightsError, UnknownLayoutError
from virtue.model.presets import tiny_config
from virtue.train.config import TrainConfig
from virtue.train.trainer import train

SAM_PT = FIXTURE / "checkpoint" / "sam2.1_hiera_toy.pt"


def write_qwen2vl(folder, tokenizer, *, stock_names: bool = False) -> dict[str, torch.Tensor]:
    """A tiny Qwen2-VL-Instruct written by transformers' save_pretrained (hub / transformers 4.x key names:
    model.layers.*, visual.*); `stock_names` renames to model.language_model.* / model.visual.*."""
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(123)
    model = Qwen2VLForConditionalGeneration(qwen_config(tiny_config().backbone))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    weights = load_file(str(folder / "model.safetensors"))
    if stock_names:
        renamed = {}
        for key, tensor in weights.items():
            if key.startswith("visual."):
                key = "model." + key
            elif key.startswith("model."):
                key = "model.language_model." + key.removeprefix("model.")
            renamed[key] = tensor
        save_file(renamed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        weights = renamed
    return weights


@pytest.fixture(scope="module")
def qwen_dirs(tmp_path_factory, tokenizer):
    old = tmp_path_factory.mktemp("qwen-hub-names")
    new = tmp_path_factory.mktemp("qwen-stock-names")
    return (old, write_qwen2vl(old, tokenizer)), (new, write_qwen2vl(new, tokenizer, stock_names=True))


def test_base_loads_qwen_sam_and_a_seeded_default_connector(qwen_dirs):
    (old, weights), (new, _) = qwen_dirs
    a = VirtueModel.from_base(old, sam_checkpoint=SAM_PT, seed=7, allow_hub=False)
    b = VirtueModel.from_base(new, sam_checkpoint=SAM_PT, seed=7, allow_hub=False)
    c = VirtueModel.from_base(old, sam_checkpoint=SAM_PT, seed=8, allow_hub=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # both key layouts give the same model
    assert torch.equal(sa["qwen.language_model.layers.0.self_attn.q_proj.weight"],
                       weights["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(sa["qwen.visual.patch_embed.proj.weight"], weights["visual.patch_embed.proj.weight"])
    official = VirtueModel.from_pretrained(FIXTURE / "checkpoint", allow_hub=False)  # same toy SAM2 file
    sam = {k: v for k, v in official.state_dict().items() if k.startswith("sam.")}
    assert all(torch.equal(sa[k], v) for k, v in sam.items())
    connector = [k for k in sa if k.startswith("connector.")]
    assert all(torch.equal(sa[k], sb[k]) for k in connector)  # same seed, same connector
    assert not torch.equal(sa["connector.reducer.weight"], sc["connector.reducer.weight"])
    # PyTorch's default init, as the official code: kaiming-uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
    w = sa["connector.reducer.weight"]
    bound = 1 / math.sqrt(w.shape[1] * w.shape[2] * w.shape[3])
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    first = sa["connector.mlp.0.weight"]
    assert first.abs().max() <= 1 / math.sqrt(first.shape[1])
    assert a.config.compat.boxes_in_raw_pixels is False  # clean by default


def test_base_errors_name_the_problem(qwen_dirs, tmp_path):
    (old, _), _ = qwen_dirs
    with pytest.raises(MissingSamWeightsError, match="places tried"):
        VirtueModel.from_base(old, allow_hub=False)
    with pytest.raises(UnknownLayoutError, match="from_base"):
        VirtueModel.from_pretrained(old, allow_hub=False)


def test_train_from_base_export_reload(qwen_dirs, tmp_path, fixture_images):
    _, (new, _) = qwen_dirs
    cfg = TrainConfig.from_dict({
        "model": {"base": str(new), "sam_checkpoint": str(SAM_PT), "dtype": "bfloat16"},
        "data": {"sources": [{"kind": "synthetic", "n": 12, "seed": 0}], "global_batch_size": 4,
                 "num_workers": 0},
        "gradcache": {"query_chunk": 2, "target_chunk": 2},
        "trainable": {"lora": True, "connector": True},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "max_steps": 2},
        "output": {"dir": str(tmp_path / "run"), "tensorboard": False, "export_dtype": "float32"},
    })
    result = train(cfg, show_progress_bar=False)
    saved = json.loads((result.export_dir / "config.json").read_text())
    assert saved["model_type"] == "virtue"
    reloaded = VirtueModel.from_pretrained(result.export_dir, allow_hub=False)
    inputs = [{"image": fixture_images["rocket.png"], "box": [10, 10, 100, 100], "text": "x"}, "a red circle"]
    np.testing.assert_allclose(reloaded.encode(inputs), result.model.encode(inputs), atol=1e-6)
