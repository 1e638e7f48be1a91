"""The frozen SAM2 branch: image encoder once per image, then the prompt-conditioned two-way transformer.

Built on `transformers.Sam2Model`; only the seams VIRTUE needs are called (virtue-spec §2.3): the 64x64
FPN level plus `no_memory_embedding`, the prompt encoder, and the image-side output of the mask
decoder's two-way transformer. Masks are not decoded.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Sam2Config, Sam2Model

from virtue.processing.sam import SamPrompt


def build_sam2(sam2_kwargs: dict, attn_implementation: str = "sdpa") -> Sam2Model:
    config = Sam2Config(**sam2_kwargs)
    config._attn_implementation = attn_implementation
    return Sam2Model(config)


class SamBranch(nn.Module):
    def __init__(self, sam2_kwargs: dict, attn_implementation: str = "sdpa"):
        super().__init__()
        self.model = build_sam2(sam2_kwargs, attn_implementation)
        # The memory/video parts of SAM2 do not exist in Sam2Model; nothing else here is trained.
        self.requires_grad_(False)

    @property
    def mask_input_size(self) -> int:
        return self.model.prompt_encoder.mask_input_size[0]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> image embeddings [N, C, S/16, S/16], `no_memory_embedding` added (single-frame SAM2)."""
        fpn = self.model.vision_encoder(pixels).fpn_hidden_states
        lowest = fpn[-1]  # [N, C, 64, 64]
        return lowest + self.model.no_memory_embedding.view(1, -1, 1, 1)

    def fuse(self, image_embeds: torch.Tensor, prompts: list[SamPrompt]) -> torch.Tensor:
        """Prompt-conditioned map [N, C, 64, 64]: row i is image_embeds[i] read through prompts[i].

        Rows are grouped by prompt length so no padding tokens enter the attention.
        """
        out = torch.empty_like(image_embeds)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, p in enumerate(prompts):
            groups.setdefault((len(p.labels), p.mask is not None), []).append(i)
        for idx in groups.values():
            out[idx] = self._fuse_group(image_embeds[idx], [prompts[i] for i in idx])
        return out

    def _fuse_group(self, image_embeds: torch.Tensor, prompts: list[SamPrompt]) -> torch.Tensor:
        sam = self.model
        n, c, h, w = image_embeds.shape
        dtype = image_embeds.dtype
        device = image_embeds.device
        coords = torch.stack([p.coords for p in prompts]).to(device=device, dtype=dtype)[:, None]  # [n,1,k,2]
        labels = torch.stack([p.labels for p in prompts]).to(device)[:, None]  # [n,1,k]
        # pad=True appends SAM's "not a point" token, as SAM2's predictor does when no box is passed.
        sparse = sam.prompt_encoder._embed_points(coords, labels, pad=True)  # [n,1,k+1,C]
        if prompts[0].mask is not None:
            masks = torch.stack([p.mask for p in prompts]).to(device=device, dtype=dtype)
            dense = sam.prompt_encoder.mask_embed(masks)  # [n,C,64,64]
        else:
            dense = sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, h, w)
        decoder = sam.mask_decoder
        output_tokens = torch.cat(
            [decoder.obj_score_token.weight, decoder.iou_token.weight, decoder.mask_tokens.weight]
        )  # [6, C]: object score, IoU, 4 mask tokens, in SAM2's order
        tokens = torch.cat([output_tokens.expand(n, 1, -1, -1).to(dtype), sparse.to(dtype)], dim=2)
        pos = sam.get_image_wide_positional_embeddings().to(dtype).expand(n, -1, -1, -1)
        _, keys = decoder.transformer(
            point_embeddings=tokens,
            image_embeddings=image_embeds + dense,
            image_positional_embeddings=pos,
            attention_similarity=None,
        )  # keys: [n, 1, h*w, C]
        return keys[:, 0].transpose(1, 2).reshape(n, c, h, w)
