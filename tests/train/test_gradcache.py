"""GradCache gives the full-batch gradients, and replays dropout exactly."""

from __future__ import annotations

import torch

from tests.train.helpers import grads, mixed_batch, tiny_trainable
from virtue.train.gradcache import gradcache_step, plain_step
from virtue.train.loss import info_nce


def loss_fn(q, t, **kw):
    return info_nce(q, t, temperature=0.05, **kw)


def test_gradcache_equals_full_batch(tokenizer, fixture_images):
    # float64, so that what is compared is the algorithm rather than float32 summation order
    model, params = tiny_trainable(tokenizer, dtype=torch.float64)
    batch = mixed_batch(fixture_images)
    plain_loss = plain_step(lambda x: model(x), batch, loss_fn)
    reference = grads(params)
    model.zero_grad(set_to_none=True)
    cached_loss = gradcache_step(lambda x: model(x), batch, loss_fn, query_chunk=2, target_chunk=3)
    assert abs(plain_loss.item() - cached_loss.item()) < 1e-6
    worst = max((a - b).abs().max().item() for a, b in zip(reference, grads(params), strict=True))
    assert worst <= 1e-5, f"max gradient difference {worst:.2e}"
    assert sum(g.abs().sum().item() > 0 for g in reference) > len(reference) // 2


def test_dropout_is_replayed(tokenizer, fixture_images):
    model, _ = tiny_trainable(tokenizer, dropout=0.5)
    batch = mixed_batch(fixture_images, n=4, negatives=0)
    seen = []

    def embed(items):
        out = model(items)
        seen.append((torch.is_grad_enabled(), out.detach().clone()))
        return out

    gradcache_step(embed, batch, loss_fn, query_chunk=2, target_chunk=2)
    first = [e for g, e in seen if not g]
    replay = [e for g, e in seen if g]
    assert len(first) == len(replay) == 4
    for a, b in zip(first, replay, strict=True):
        assert torch.equal(a, b)
    fresh = model(batch.queries[:2]).detach()
    assert not torch.allclose(fresh, first[0]), "dropout must be active for this test to mean anything"
