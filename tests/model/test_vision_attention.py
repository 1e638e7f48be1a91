"""The ViT's batched attention for small same-size images gives what transformers' per-image loop gives."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention

from virtue.model import vision_attention
from virtue.model.backbone import build_qwen
from virtue.model.presets import tiny_config


@pytest.fixture(scope="module")
def towers():
    torch.manual_seed(0)
    batched = build_qwen(tiny_config(vision_depth=2).backbone).visual.eval()
    looped = copy.deepcopy(batched)
    for block in looped.blocks:
        block.attn.__class__ = VisionAttention
    return batched, looped


@pytest.mark.parametrize("grids", [[(1, 4, 4)] * 6, [(1, 4, 4)] * 3 + [(1, 6, 4)] * 2, [(1, 18, 18)] * 2],
                         ids=["same-size", "mixed", "above-the-limit"])
def test_batched_equals_the_loop(towers, grids, monkeypatch):
    batched, looped = towers
    assert isinstance(batched.blocks[0].attn, vision_attention.BatchedVisionAttention)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, _real=torch.nn.functional.scaled_dot_product_attention, **k:
                        calls.append(a[0].shape[0]) or _real(*a, **k))
    grid = torch.tensor(grids)
    pixels = torch.randn(int((grid[:, 1] * grid[:, 2]).sum()), 1176)
    with torch.no_grad():
        ours = batched(pixels, grid_thw=grid).pooler_output
        calls_batched, calls[:] = list(calls), []
        reference = looped(pixels, grid_thw=grid).pooler_output
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    same_small = len(set(grids)) == 1 and grids[0][1] * grids[0][2] <= vision_attention.MAX_BATCHED_PATCHES
    # one call per block with every image in it, or transformers' loop (one call per image and block)
    assert calls_batched == ([len(grids)] * 2 if same_small else calls)


def test_the_swap_survives_copies_and_pickling(towers):
    batched, _ = towers
    again = pickle.loads(pickle.dumps(batched))
    assert isinstance(again.blocks[1].attn, vision_attention.BatchedVisionAttention)
    assert set(again.state_dict()) == set(batched.state_dict())
