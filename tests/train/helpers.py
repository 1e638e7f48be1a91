"""Small building blocks shared by the training tests."""

from __future__ import annotations

import torch

from virtue import VirtueModel
from virtue.inputs import parse_input
from virtue.model.presets import tiny_config
from virtue.train.adapters import TrainableConfig, apply_trainable
from virtue.train.gradcache import ContrastiveBatch


def tiny_trainable(
    tokenizer, dropout: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[VirtueModel, list]:
    """A tiny model with DoRA adapters, connector and ViT trainable; adapters' B made non-zero so that they
    (and their dropout) affect the output from the first step."""
    torch.manual_seed(seed)
    model = VirtueModel(tiny_config(), tokenizer)
    params = apply_trainable(model, TrainableConfig(lora_dropout=dropout, vision=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.to(dtype).train()
    return model, params


def mixed_batch(images: dict, n: int = 6, negatives: int = 2, uneven: bool = False) -> ContrastiveBatch:
    """Rows alternate between `negatives` and one fewer hard negatives; `uneven`: the first half of the rows
    has `negatives`, the second half none (so two processes sharing the batch hold different numbers)."""
    names = sorted(images)
    queries, targets, negs = [], [], []
    for i in range(n):
        path = images[names[i % len(names)]]
        queries.append(parse_input({"image": path, "text": f"Find object {i}.", "box": [2 + i, 3, 20 + i, 18]}, i))
        targets.append(parse_input(f"caption number {i}" if i % 3 else {"image": path, "text": f"cap {i}"}, i))
        count = (negatives if i < n // 2 else 0) if uneven else negatives - (i % 2)
        negs.append([parse_input(f"wrong caption {i}.{k}", i) for k in range(count)])
    return ContrastiveBatch(queries, targets, negs)


def grads(params) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
