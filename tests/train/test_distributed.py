"""One process with global batch N equals two torchrun (gloo) processes with N/2 each: loss and gradients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.train.helpers import grads, mixed_batch, tiny_trainable
from virtue.train.gradcache import gradcache_step
from virtue.train.loss import info_nce

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tokenizer, fixture_images, tmp_path):
    n = 6
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(WORKER), str(out), str(n)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ddp = load_file(str(out))

    model, params = tiny_trainable(tokenizer, dtype=torch.float64)
    loss = gradcache_step(lambda x: model(x), mixed_batch(fixture_images, n=n),
                          lambda q, t, **kw: info_nce(q, t, temperature=0.05, **kw), query_chunk=2, target_chunk=2)
    assert abs(loss.item() - ddp["loss"].item()) < 1e-9
    single = grads(params)
    worst = max((single[i] - ddp[f"grad.{i}"]).abs().max().item() for i in range(len(single)))
    assert worst <= 1e-9, f"max gradient difference {worst:.2e}"
