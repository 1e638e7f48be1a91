"""Attention of the Qwen2-VL vision tower over a batch of small same-size images in one call.

transformers' `VisionAttention` (non-flash implementations) runs one attention call per image, in a Python loop,
in every one of the ViT's 32 blocks. When every image of the call has the same size, the tokens are consecutive
runs of one length, so a view turns them into one batched attention call: the same arithmetic per image
(bit-identical on the CPU), fewer calls, no copies, and no mask over all tokens (8 photos at 1344² would need
~5 GB for a dense block-diagonal one).

Kept only where it was measured faster (benchmarks/vision_tower.py, CPU, 1 thread, 1280-wide blocks, two runs):
64 thumbnails of 56² ran in 0.91-0.94x the time of the loop, where the per-image overhead shows; for photos (8 at
448²: 0.99-1.01x, 2 at 980²: 0.99-1.06x) the attention arithmetic dominates and batching bought nothing, so images
above
`MAX_BATCHED_PATCHES` patches, and calls mixing sizes, keep transformers' loop. On CUDA, `flash_attention_2`
(when installed) uses transformers' own varlen path instead.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention, apply_rotary_pos_emb_vision

EXPECTED_PARAMETERS = ["hidden_states", "cu_seqlens", "position_embeddings", "max_seqlen", "kwargs"]
MAX_BATCHED_PATCHES = 256  # 224x224 pixels


class BatchedVisionAttention(VisionAttention):
    """transformers' `VisionAttention` with one attention call for a batch of small same-size images."""

    def forward(self, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor, position_embeddings=None,
                max_seqlen: int | None = None, **kwargs) -> torch.Tensor:
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        if lengths.numel() < 2 or int(lengths[0]) > MAX_BATCHED_PATCHES or bool((lengths != lengths[0]).any()):
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq, images, length = hidden_states.shape[0], lengths.numel(), int(lengths[0])
        q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)  # [seq, heads, head_dim] each
        # Images are consecutive runs of `length` tokens: a view gives [images, heads, length, head_dim].
        qb, kb, vb = (t.view(images, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        dropout = self.attention_dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(qb, kb, vb, dropout_p=dropout, scale=self.scaling)
        return self.proj(out.transpose(1, 2).reshape(seq, -1))


def group_vision_attention(visual: nn.Module) -> bool:
    """Switch every block of `visual` to `BatchedVisionAttention` (same weights, same module names); False
    (nothing changed) when its attention implementation or `VisionAttention.forward`'s signature is not the
    one this was written for."""
    if getattr(visual.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return False
    blocks = getattr(visual, "blocks", [])
    if not blocks or list(inspect.signature(VisionAttention.forward).parameters)[1:] != EXPECTED_PARAMETERS:
        return False
    for block in blocks:
        if type(block.attn) is VisionAttention:
            block.attn.__class__ = BatchedVisionAttention
    return True
