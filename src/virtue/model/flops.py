"""FLOPs of a forward pass, counted from the config (2 FLOPs per multiply-add; what MFU is computed from).

* LLM (Qwen2 decoder), per row of S tokens (segmentation tokens included, padding excluded): per layer the
  projections 2·S·(d·q + 2·d·kv + q·d + 3·d·f) and attention 2·2·S²·q, halved when `causal` (the keys a
  causal kernel needs to visit); q = heads·head_dim, kv = kv_heads·head_dim, f = FFN width. The LM head
  (2·S·d·vocab) is not part of an embedding's forward; it is counted only when asked (`lm_head=True`), for a
  baseline that computes logits as the official forward does.
* ViT (Qwen2-VL), per image of N patches: patch embedding 2·N·(3·T·P²)·e, per block 2·N·e²·(4 + 2r) (qkv,
  proj and the r·e-wide MLP; 24·N·e² for r = 4) + 4·N²·e (full attention within the image), the 2x2 merger
  2·(N/4)·(4e·4e + 4e·d).
* SAM2: the image encoder and the two-way transformer are counted by running them on the meta device under
  `torch.utils.flop_counter.FlopCounterMode` (no memory, no compute): Hiera's windows and pooling are exact.
* Connector: Conv2d(k, stride k) and the 2-layer MLP on (64/k)² tokens.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from virtue.config import VirtueConfig


@dataclass(frozen=True)
class Flops:
    vision: int = 0
    sam_image: int = 0
    sam_prompt: int = 0
    connector: int = 0
    llm: int = 0
    lm_head: int = 0

    @property
    def total(self) -> int:
        return self.vision + self.sam_image + self.sam_prompt + self.connector + self.llm + self.lm_head

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(a + b for a, b in zip(self.as_tuple(), other.as_tuple(), strict=True)))

    def as_tuple(self) -> tuple[int, ...]:
        return (self.vision, self.sam_image, self.sam_prompt, self.connector, self.llm, self.lm_head)


def llm_flops(config: VirtueConfig, seq_lens: Sequence[int], *, causal: bool = True, attention: bool = True) -> int:
    t = config.backbone["text_config"]
    d, f, layers = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    head = t.get("head_dim") or d // t["num_attention_heads"]
    q, kv = t["num_attention_heads"] * head, t["num_key_value_heads"] * head
    linear = 2 * (d * q + 2 * d * kv + q * d + 3 * d * f)
    total = 0
    for s in seq_lens:
        scores = 2 * 2 * s * s * q if attention else 0
        total += layers * (linear * s + (scores // 2 if causal else scores))
    return total


def lm_head_flops(config: VirtueConfig, seq_lens: Sequence[int]) -> int:
    """Logits over the vocabulary at every position of rows of these lengths."""
    t = config.backbone["text_config"]
    return sum(2 * s * t["hidden_size"] * t["vocab_size"] for s in seq_lens)


def vision_flops(config: VirtueConfig, grids: Sequence[tuple[int, int, int]], *, attention: bool = True) -> int:
    v = config.backbone["vision_config"]
    e, d, depth, ratio = v["embed_dim"], v["hidden_size"], v["depth"], v["mlp_ratio"]
    patch = 3 * v["temporal_patch_size"] * v["patch_size"] ** 2
    merged = e * v["spatial_merge_size"] ** 2
    total = 0
    for t, h, w in grids:
        n = t * h * w
        total += 2 * n * patch * e + depth * (2 * n * e * e * (4 + 2 * ratio) + (4 * n * n * e if attention else 0))
        total += 2 * (n // v["spatial_merge_size"] ** 2) * (merged * merged + merged * d)
    return total


def connector_flops(config: VirtueConfig, rows: int) -> int:
    c, k, side = config.sam.dim, config.sam.reducer_kernel, config.sam.embed_grid
    tokens = (side // k) ** 2
    conv = 2 * c * k * k * c * tokens
    mlp = 2 * tokens * (c * c + c * config.hidden_size)
    return rows * (conv + mlp)


@functools.lru_cache(maxsize=16)
def _sam_counts(sam2_json: str, prompt_tokens: int) -> tuple[int, int]:
    """(image encoder FLOPs per image, two-way transformer FLOPs per row with `prompt_tokens` sparse tokens)."""
    from torch.utils.flop_counter import FlopCounterMode

    from virtue.config import SamBranchConfig
    from virtue.model.sam_branch import SamBranch

    cfg = SamBranchConfig(sam2=json.loads(sam2_json))
    s, c, side = cfg.image_size, cfg.dim, cfg.embed_grid
    with torch.device("meta"):
        sam = SamBranch(cfg.sam2)
        with FlopCounterMode(display=False) as image:
            embeds = sam.encode_images(torch.empty(1, 3, s, s))
        tokens = torch.empty(1, 1, 6 + prompt_tokens, c)  # 6 output tokens + the prompt's
        with FlopCounterMode(display=False) as prompt:
            sam.model.mask_decoder.transformer(
                point_embeddings=tokens, image_embeddings=embeds, attention_similarity=None,
                image_positional_embeddings=torch.empty(1, c, side, side),
            )
    return image.get_total_flops(), prompt.get_total_flops()


def sam_flops(config: VirtueConfig, images: int, prompt_tokens: Sequence[int]) -> tuple[int, int]:
    """(image encoder FLOPs for `images` images, prompt fusion FLOPs for rows with these sparse token counts;
    a k-point prompt has k + 1 tokens with SAM's padding point, a box 3, the 3x3 grid 10)."""
    sam2 = json.dumps(config.sam.sam2, sort_keys=True)
    per_image = _sam_counts(sam2, 1)[0]
    return images * per_image, sum(_sam_counts(sam2, n)[1] for n in prompt_tokens)


def forward_flops(
    config: VirtueConfig,
    *,
    images: Sequence[tuple[int, int, int]] = (),
    image_rows: Sequence[tuple[int, int]] = (),
    text_rows: Sequence[int] = (),
    lm_head: bool = False,
) -> Flops:
    """FLOPs of embedding a set of inputs.

    images: the grid (t, h, w) of every distinct image encoded (ViT and SAM2 image encoder run once per image).
    image_rows: (text tokens including the image's visual tokens, SAM sparse prompt tokens) of every image row;
        the row's LLM sequence adds the segmentation tokens when the SAM branch is on.
    text_rows: token counts of the text-only rows.
    lm_head: also count logits over the vocabulary at every position (what the official forward computes).
    """
    sam_on = config.sam.enabled
    seq = [n + (config.sam.num_tokens if sam_on else 0) for n, _ in image_rows] + list(text_rows)
    image, prompt = sam_flops(config, len(images), [p for _, p in image_rows]) if sam_on else (0, 0)
    return Flops(
        vision=vision_flops(config, images),
        sam_image=image,
        sam_prompt=prompt,
        connector=connector_flops(config, len(image_rows)) if sam_on else 0,
        llm=llm_flops(config, seq),
        lm_head=lm_head_flops(config, seq) if lm_head else 0,
    )
