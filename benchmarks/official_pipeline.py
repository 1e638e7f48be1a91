"""A baseline that does what the official implementation does to embed SCaR queries and their candidates, written
here from `../shared/docs/virtue-spec.md` (§2.1-2.6, §8.1, §10) with this package's model parts, so that a speed
ratio against it says what this package's `encode` buys over the official pipeline, not over its own switches.

What it does, per batch of `batch_size` (16, the official eval's `per_device_eval_batch_size`) consecutive rows,
in input order (no sorting by size, no grouping by image, no checks ahead of time):
* every row's image is read and squashed to 1344x1344 (PIL bicubic, `virtue_eval.yaml`), then preprocessed on its
  own for Qwen2-VL (smart_resize to 980x980, CLIP-normalise), in the calling thread, in turn (nothing prefetched);
* SAM2's 1024x1024 input is made on the CPU in float32 (SAM2Transforms: resize + ImageNet-normalise of the
  Qwen-normalised image for the released weights), the batch stacked and then copied to the device;
* the Qwen ViT and SAM2's image encoder run for every row (no feature reuse: k prompts on a photo cost k times);
* the rows' boxes go to the prompt encoder together, one box per image row (`bboxes`), text and image rows are
  never mixed in one batch (which the official code cannot do correctly, §10.7);
* the LLM runs over the left-padded batch with `use_cache=True` and `output_hidden_states=True`, and the LM head's
  logits over the whole vocabulary are computed for every position and thrown away (§2.4 step 6, §10.16);
* candidates (texts) in batches of 16 through the same LLM call.

What it does not reproduce: the official processor objects' own Python overhead and its collator/DataLoader,
pickling the embeddings, `torch.autocast` (it runs in the model's dtype, like `encode`), and the official position
ids, which depend on the padding (§2.5): it uses the batch-independent ones, so that its vectors equal `encode`'s
(checked by the benchmarks' smoke test) and the comparison is of work done, not of results.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from virtue.inputs import EmbedInput, parse_input
from virtue.model.backbone import pack_rows

OFFICIAL_BATCH_SIZE = 16
OFFICIAL_RESIZE = (1344, 1344)


@torch.inference_mode()
def encode_like_official(
    model: Any,
    inputs: Sequence[Any],
    *,
    batch_size: int = OFFICIAL_BATCH_SIZE,
    image_resize: tuple[int, int] | None = OFFICIAL_RESIZE,
    lm_head: bool = True,
) -> np.ndarray:
    """L2-normalised float32 [N, D] embeddings of `inputs` (texts, or images with a box / points / no prompt), the
    official pipeline's way (module docstring). `lm_head=False` skips the discarded logits: what the rest of the
    official pipeline costs (at a reduced width with the full vocabulary the head's share is far above a real
    model's)."""
    items = [parse_input(x, i) for i, x in enumerate(inputs)]
    out = []
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        kinds = {item.has_image for item in batch}
        if len(kinds) > 1:
            raise ValueError(f"rows {start}..{start + len(batch) - 1}: the official pipeline cannot mix text and "
                             "image rows in one batch (virtue-spec §10.7); order the inputs by kind")
        if kinds == {True}:
            out.append(_image_batch(model, batch, start, image_resize, lm_head))
        else:
            out.append(_text_batch(model, batch, start, lm_head))
    return torch.cat(out).float().cpu().numpy()


def _image_batch(model: Any, batch: list[EmbedInput], start: int, image_resize: tuple[int, int] | None,
                 lm_head: bool):
    proc, device = model.processor, model.device
    prepared, sam_inputs, token_ids, sizes = [], [], [], []
    for n, item in enumerate(batch):  # one sample at a time, as the official processor is called
        where = f"input {start + n}"
        loaded = proc.load(item, where, image_resize)  # read, squash, RGB
        image = proc.prepare_image(loaded)  # Qwen resize + normalise (+ the clean SAM source)
        prepared.append(image)
        sam_inputs.append(proc.sam_input(image, "cpu"))  # SAM2Transforms run on the CPU, in float32
        token_ids.append(proc.row_ids(item, where, image.qwen.num_tokens))
        sizes.append(loaded.size_wh)
    visual = model.qwen.visual
    pixels = torch.cat([p.qwen.patches(device, visual.dtype) for p in prepared])
    grid = torch.tensor([p.qwen.grid_thw for p in prepared], device=device)
    vision = visual(pixels, grid_thw=grid).pooler_output  # every row's image, no reuse
    per_row = torch.split(vision, [p.qwen.num_tokens for p in prepared])
    embed = model.qwen.language_model.embed_tokens
    rows = []
    for ids, feats in zip(token_ids, per_row, strict=True):
        ids_t = torch.tensor(ids, device=device)
        row = embed(ids_t)
        rows.append(row.masked_scatter((ids_t == proc.image_token_id)[:, None], feats.to(row.dtype)))
    prefix = None
    if model.sam is not None:
        sam_dtype = next(model.sam.parameters()).dtype
        images = model.sam.encode_images(torch.stack(sam_inputs).to(device, sam_dtype))  # every row's image
        prompts = [proc.sam_prompt(item, size, model.sam.mask_input_size) for item, size in zip(batch, sizes,
                                                                                                   strict=True)]
        fused = model.sam.fuse(images, prompts)
        prefix = model.connector(fused.to(model.connector.reducer.weight.dtype)).to(rows[0].dtype)
    return _llm(model, *pack_rows(rows, prefix), lm_head=lm_head)


def _text_batch(model: Any, batch: list[EmbedInput], start: int, lm_head: bool):
    proc, device = model.processor, model.device
    embed = model.qwen.language_model.embed_tokens
    rows = [embed(torch.tensor(proc.row_ids(item, f"input {start + n}"), device=device))
            for n, item in enumerate(batch)]
    return _llm(model, *pack_rows(rows, None), lm_head=lm_head)


def _llm(model: Any, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, *, lm_head: bool):
    lm = model.qwen.language_model
    out = lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
             output_hidden_states=True)
    hidden = out.last_hidden_state
    if not lm_head:
        return F.normalize(hidden[:, -1].float(), dim=-1)
    # The official forward computes the LM head over every position (the 2B ties it to the embedding matrix; the
    # 7B's own head has the same shape, so the same cost) and discards the logits.
    logits = hidden @ lm.embed_tokens.weight.T  # [B, L, vocab]
    del logits
    return F.normalize(hidden[:, -1].float(), dim=-1)
