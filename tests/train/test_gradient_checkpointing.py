"""Gradient checkpointing recomputes the LLM's (and a training ViT's) layers in the backward pass: same
gradients, dropout included."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FIXTURE
from tests.train.helpers import grads, mixed_batch
from virtue.train.build import build_model, prepare_for_training
from virtue.train.config import TrainConfig
from virtue.train.gradcache import plain_step
from virtue.train.loss import info_nce


def prepared(checkpointing: bool, vision: bool):
    cfg = TrainConfig.from_dict({
        "model": {"preset": "tiny", "tokenizer": str(FIXTURE / "checkpoint"),
                  "gradient_checkpointing": checkpointing, "preset_args": {"vision_depth": 2}},
        "data": {"sources": [{"kind": "synthetic", "n": 8}]},
        "trainable": {"lora": True, "lora_dropout": 0.2, "connector": True, "vision": vision},
    })
    model = build_model(cfg)
    params = prepare_for_training(model, cfg)
    with torch.no_grad():  # non-zero adapters, so that their dropout matters from the first step
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train(), params


def count_calls(module: torch.nn.Module) -> list[int]:
    """Counts runs of `module.forward` (module hooks do not fire again when checkpointing recomputes)."""
    calls, forward = [0], module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


@pytest.mark.parametrize("vision", [False, True], ids=["llm", "llm+vit"])
def test_checkpointing_gives_the_same_gradients(fixture_images, vision):
    results = []
    for checkpointing in (False, True):
        model, params = prepared(checkpointing, vision)
        # a module inside a checkpointed layer runs again when the backward pass recomputes the layer
        llm_calls = count_calls(model.qwen.language_model.model.layers[0].mlp)
        vit_calls = count_calls(model.qwen.visual.blocks[0].mlp)
        torch.manual_seed(5)
        batch = mixed_batch(fixture_images, n=4)
        loss = plain_step(lambda x, m=model: m(x), batch, lambda q, t, **kw: info_nce(q, t, temperature=0.05, **kw))
        results.append((loss.item(), grads(params), llm_calls[0], vit_calls[0]))
    (loss_off, grads_off, llm_off, vit_off), (loss_on, grads_on, llm_on, vit_on) = results
    assert llm_on > llm_off  # the layers really ran again in the backward pass
    assert (vit_on > vit_off) == vision
    assert abs(loss_on - loss_off) < 1e-6
    worst = max((a - b).abs().max().item() for a, b in zip(grads_off, grads_on, strict=True))
    assert worst < 1e-6, f"max gradient difference {worst:.2e}"
    assert any(g.abs().sum() > 0 for g in grads_on)
