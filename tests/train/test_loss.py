"""InfoNCE against a hand computation of its formula."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from virtue.train.loss import info_nce


def manual(q, t, negs, tau):
    losses = []
    step = len(t) // len(q)
    for i in range(len(q)):
        logits = [q[i] @ t[j] / tau for j in range(len(t))] + [q[i] @ n / tau for n in negs[i]]
        logits = np.array(logits)
        m = logits.max()
        losses.append(-(logits[i * step] - m - np.log(np.exp(logits - m).sum())))
    return float(np.mean(losses))


def test_hard_negatives_enter_the_softmax_as_the_formula_says():
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(4, 8, generator=g, dtype=torch.float64), dim=-1)
    n = F.normalize(torch.randn(4, 3, 8, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    negs = [[n[i, k].numpy() for k in range(3) if mask[i, k]] for i in range(4)]
    plain = info_nce(q, t, temperature=0.05).item()
    with_negs = info_nce(q, t, temperature=0.05, negatives=n, negatives_mask=mask).item()
    assert abs(plain - manual(q.numpy(), t.numpy(), [[]] * 4, 0.05)) < 1e-9
    assert abs(with_negs - manual(q.numpy(), t.numpy(), negs, 0.05)) < 1e-9
    assert with_negs > plain  # more competitors, never an easier task


def test_more_targets_than_queries_uses_the_official_label_stride():
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(2, 4, generator=g, dtype=torch.float64), dim=-1)
    t = F.normalize(torch.randn(4, 4, generator=g, dtype=torch.float64), dim=-1)
    assert abs(info_nce(q, t, temperature=0.1).item() - manual(q.numpy(), t.numpy(), [[], []], 0.1)) < 1e-9
