"""Several processes (torchrun, gloo) train the same model as one process with the same global batch: one
GradCache step's loss and gradients, and `train()` end to end — stopped, resumed, with shares that differ in
modality and in their number of hard negatives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tests.conftest import FIXTURE, MINI_SCAR
from tests.train.helpers import grads, mixed_batch, tiny_trainable
from virtue.train.config import TrainConfig
from virtue.train.gradcache import gradcache_step
from virtue.train.loss import info_nce
from virtue.train.trainer import train

HERE = Path(__file__).parent
STEP_WORKER, TRAIN_WORKER = HERE / "ddp_worker.py", HERE / "train_worker.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: Path, *args: str, timeout: int = 300) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", str(script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("uneven", [False, True], ids=["alternating-negatives", "one-rank-without-negatives"])
def test_two_processes_equal_one(tokenizer, fixture_images, tmp_path, uneven):
    n = 6
    out = tmp_path / "ddp.safetensors"
    torchrun(STEP_WORKER, str(out), str(n), "uneven" if uneven else "even")
    ddp = load_file(str(out))

    model, params = tiny_trainable(tokenizer, dtype=torch.float64)
    loss = gradcache_step(lambda x: model(x), mixed_batch(fixture_images, n=n, uneven=uneven),
                          lambda q, t, **kw: info_nce(q, t, temperature=0.05, **kw), query_chunk=2, target_chunk=2)
    assert abs(loss.item() - ddp["loss"].item()) < 1e-9
    single = grads(params)
    worst = max((single[i] - ddp[f"grad.{i}"]).abs().max().item() for i in range(len(single)))
    assert worst <= 1e-9, f"max gradient difference {worst:.2e}"


def run_config(out: Path, **data) -> dict:
    return {
        "model": {"preset": "tiny", "tokenizer": str(FIXTURE / "checkpoint")},
        "data": {"global_batch_size": 6, "num_workers": 0, **data},
        "gradcache": {"query_chunk": 3, "target_chunk": 3},  # each process's 3 rows = one of the single run's chunks
        "loss": {"temperature": 0.05, "use_hard_negatives": True},
        "trainable": {"lora": True, "lora_dropout": 0.0, "connector": True},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 6},
        "output": {"dir": str(out), "checkpoint_every": 3, "tensorboard": False, "export": False},
    }


def launch(tmp_path: Path, data: dict, name: str, stop: int = 0, resume: bool = False, out: Path | None = None):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(data))
    losses = tmp_path / f"{name}.json"
    torchrun(TRAIN_WORKER, str(cfg), str(losses), str(stop), "resume" if resume else "fresh", timeout=240)
    return json.loads(losses.read_text())


def test_train_under_torchrun_stopped_and_resumed_equals_one_process(tmp_path):
    source = {"sources": [{"kind": "synthetic", "n": 24, "seed": 0, "hard_negatives": 2}]}
    single = train(TrainConfig.from_dict(run_config(tmp_path / "one", **source)), show_progress_bar=False).losses
    two = run_config(tmp_path / "two", **source)
    first = launch(tmp_path, two, "first", stop=3)
    rest = launch(tmp_path, two, "rest", resume=True)
    assert first["steps"] == 3 and rest["steps"] == 6
    np.testing.assert_allclose(first["losses"] + rest["losses"], single, rtol=0, atol=1e-6)
    assert len(set(np.round(single, 3))) > 1
    for rank in (0, 1):  # every process saved its own generator states
        assert (tmp_path / "two" / "checkpoint-6" / f"rng-rank{rank}.safetensors").is_file()


def dropout_draws(tmp_path: Path, name: str) -> list[list[str]]:
    """Per rank, the generator-state digest before each dropout draw of a `launch` (see train_worker.py)."""
    return [json.loads((tmp_path / f"{name}.json.rank{rank}.json").read_text())["dropout_draws"] for rank in (0, 1)]


def test_each_process_resumes_its_own_dropout_stream(tmp_path):
    """Dropout on: the two processes draw different masks; a resumed run continues each one's own stream.

    The losses alone cannot tell the two streams apart (ranks sharing one seed still lose the same on resuming),
    so the workers also record the generator state before every dropout draw of each process."""
    source = {"sources": [{"kind": "synthetic", "n": 24, "seed": 0}]}
    data = run_config(tmp_path / "straight", **source)
    data["trainable"]["lora_dropout"] = 0.3
    straight = launch(tmp_path, data, "straight")
    data["output"]["dir"] = str(tmp_path / "stopped")
    first = launch(tmp_path, data, "first", stop=3)
    rest = launch(tmp_path, data, "rest", resume=True)
    np.testing.assert_allclose(first["losses"] + rest["losses"], straight["losses"], rtol=0, atol=1e-6)

    whole, before, after = (dropout_draws(tmp_path, name) for name in ("straight", "first", "rest"))
    assert all(len(draws) > 0 for draws in whole)
    # Different streams: not one generator state is shared between the ranks (a common seed makes the first equal).
    shared = set(whole[0]) & set(whole[1])
    assert len(shared) == 0, f"the two processes drew {len(shared)} dropout masks from the same generator states"
    for rank in (0, 1):  # each process's stream, stopped and resumed, is the uninterrupted one draw for draw
        assert len(before[rank]) > 0 and len(after[rank]) > 0
        assert before[rank] + after[rank] == whole[rank], f"rank {rank} did not resume its own dropout stream"


def test_shares_of_different_modality_finish(tmp_path):
    """Rows in file order (data.shuffle: false): process 0 gets only text rows, process 1 only image rows, so
    the connector has no gradient on process 0. Every process still reduces the same tensors."""
    image = tmp_path / "img.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    rows = [{"query": f"text query {i}", "positive": f"text target {i}"} for i in range(3)]
    rows += [{"query": {"image": "img.png", "text": f"region {i}", "box": [2 + i, 2, 30, 30]},
              "positive": f"image target {i}"} for i in range(3)]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = {"sources": [{"kind": "jsonl", "path": str(tmp_path / "mixed.jsonl")}], "shuffle": False}
    data = run_config(tmp_path / "two", **source)
    data["loss"]["use_hard_negatives"] = False
    data["optim"]["max_steps"] = 2
    scar = tmp_path / "scar"  # validation on rank 0 while the other process waits (must not hang either)
    scar.mkdir()
    (scar / "SCaR_eval_RefCOCOg.parquet").symlink_to(MINI_SCAR / "mini_scar.parquet")
    data["eval"] = {"every": 2, "benchmark": "scar", "data_root": str(scar), "image_root": str(MINI_SCAR), "limit": 2}
    two = launch(tmp_path, data, "mixed")
    assert any("eval" in json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines())
    data["output"]["dir"] = str(tmp_path / "one")
    single = train(TrainConfig.from_dict(data), show_progress_bar=False).losses
    np.testing.assert_allclose(two["losses"], single, rtol=0, atol=1e-6)
