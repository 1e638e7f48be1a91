"""Connector: the prompt-conditioned SAM map becomes segmentation tokens in the LLM's width."""

from __future__ import annotations

import torch
from torch import nn


class Connector(nn.Module):
    """Conv2d(dim, dim, k, stride k) then Linear-GELU-Linear to `hidden_size` (virtue-spec §1).

    [N, dim, 64, 64] -> [N, (64/k)^2, hidden_size]; 256 tokens for k = 4.
    """

    def __init__(self, sam_dim: int, hidden_size: int, kernel: int = 4):
        super().__init__()
        self.reducer = nn.Conv2d(sam_dim, sam_dim, kernel_size=kernel, stride=kernel)
        self.mlp = nn.Sequential(nn.Linear(sam_dim, sam_dim), nn.GELU(), nn.Linear(sam_dim, hidden_size))

    def forward(self, fused_map: torch.Tensor) -> torch.Tensor:
        tokens = self.reducer(fused_map).flatten(2).transpose(1, 2)  # [N, T, dim]
        return self.mlp(tokens)  # [N, T, hidden]


def seeded_connector_state(sam_dim: int, hidden_size: int, kernel: int, seed: int) -> dict[str, torch.Tensor]:
    """A fresh connector's weights as the official code creates them (PyTorch's default init), from a generator
    of its own seeded with `seed`, so that the result depends on `seed` alone, not on what else was drawn before.
    Keys as in `VirtueModel` ("connector.reducer.weight", ...), float32 on the CPU."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with torch.device("cpu"):
            connector = Connector(sam_dim, hidden_size, kernel).float()
    return {f"connector.{k}": v.detach() for k, v in connector.state_dict().items()}
