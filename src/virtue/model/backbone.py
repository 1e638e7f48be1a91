"""Qwen2-VL used as an encoder: embed, scatter vision features, prepend segmentation tokens, run the
decoder with explicit positions, take the last position. Logits are never computed."""

from __future__ import annotations

import torch
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLModel

from virtue.config import qwen_config
from virtue.model.vision_attention import group_vision_attention


def build_qwen(backbone: dict, attn_implementation: str = "sdpa") -> Qwen2VLModel:
    config = qwen_config(backbone)
    for part in (config, config.text_config, config.vision_config):
        part._attn_implementation = attn_implementation
        # A stored dtype (bf16 in checkpoints) would make transformers build the sub-models under
        # torch.set_default_dtype, for the whole process; they are built in the caller's dtype instead.
        part.dtype = None
    model = Qwen2VLModel(config)
    group_vision_attention(model.visual)  # small same-size images: one attention call per block, not a loop
    return model


def pack_rows(
    rows: list[torch.Tensor], prefix: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad token embeddings into one batch, optional segmentation tokens in front.

    rows: per row [L_i, D]; prefix: [B, T, D] or None.
    Returns inputs_embeds [B, T + L, D], attention_mask [B, T + L], position_ids [3, B, T + L].

    Positions do not depend on the batch (virtue-spec §2.5): segmentation tokens at 0, real token j at
    T + j. For a batch of one this is exactly the official scheme B; pads are masked and their
    positions never reach a real token.
    """
    batch, width = len(rows), max(r.shape[0] for r in rows)
    hidden = rows[0].shape[1]
    ref = rows[0]
    offset = 0 if prefix is None else prefix.shape[1]
    embeds = ref.new_zeros(batch, offset + width, hidden)
    mask = torch.zeros(batch, offset + width, dtype=torch.long, device=ref.device)
    positions = torch.zeros(batch, offset + width, dtype=torch.long, device=ref.device)
    if prefix is not None:
        embeds[:, :offset] = prefix
        mask[:, :offset] = 1
    for i, r in enumerate(rows):
        n = r.shape[0]
        embeds[i, offset + width - n :] = r
        mask[i, offset + width - n :] = 1
        positions[i, offset + width - n :] = torch.arange(offset, offset + n, device=ref.device)
    return embeds, mask, positions.unsqueeze(0).expand(3, -1, -1)


def last_hidden(qwen: Qwen2VLModel, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
    """Final-norm hidden state of the last position [B, D] (left padding puts every row's end there)."""
    out = qwen.language_model(
        inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
    )
    return out.last_hidden_state[:, -1]
