"""FLOPs counted from the config equal what torch's FLOP counter sees on a real (tiny) forward."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from virtue.model.backbone import build_qwen, last_hidden, pack_rows
from virtue.model.flops import forward_flops, llm_flops, vision_flops
from virtue.model.presets import real_config, tiny_config


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_llm_and_vit_formulas_match_the_counter():
    cfg = tiny_config(hidden_size=64, num_layers=2, vision_depth=2)
    qwen = build_qwen(cfg.backbone, attn_implementation="eager")  # attention as matmuls the counter sees
    rows = [torch.randn(10, 64), torch.randn(10, 64)]
    assert counted(lambda: last_hidden(qwen, *pack_rows(rows, None))) == llm_flops(cfg, [10, 10], causal=False)
    grid = torch.tensor([[1, 4, 6], [1, 6, 6]])
    pixels = torch.randn(4 * 6 + 6 * 6, 1176)
    assert counted(lambda: qwen.visual(pixels, grid_thw=grid)) == vision_flops(cfg, [(1, 4, 6), (1, 6, 6)])


def test_real_2b_orders_of_magnitude():
    """A SCaR query at the official 980x980 (70x70 patches): the ViT (~10 TFLOPs) dominates one row; its
    1,521-token LLM pass ~4.7 TFLOPs at 2 x 1.5 G parameters per token; SAM2's encoder ~0.65 TFLOPs."""
    f = forward_flops(real_config("2b"), images=[(1, 70, 70)], image_rows=[(1225 + 40, 3)])
    assert 9e12 < f.vision < 11e12
    assert 4e12 < f.llm < 5.5e12
    assert 5e11 < f.sam_image < 8e11 and f.sam_prompt < f.sam_image / 100
    two_prompts = forward_flops(real_config("2b"), images=[(1, 70, 70)], image_rows=[(1265, 3), (1265, 3)])
    assert two_prompts.vision == f.vision and two_prompts.llm == 2 * f.llm  # image work once, per-row LLM
