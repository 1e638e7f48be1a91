"""Mixed precision as the official training runs it: frozen weights in bfloat16, trainables in float32."""

from __future__ import annotations

import numpy as np
import torch

from tests.conftest import FIXTURE
from virtue.train.config import TrainConfig
from virtue.train.trainer import train


def config(out, dtype: str, steps: int, lr: float) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "tiny", "tokenizer": str(FIXTURE / "checkpoint"), "dtype": dtype},
        "data": {"sources": [{"kind": "synthetic", "n": 24, "seed": 0}], "global_batch_size": 6, "num_workers": 0},
        "gradcache": {"enabled": True, "query_chunk": 3, "target_chunk": 3},
        "trainable": {"lora": True, "use_dora": True, "connector": True},
        "optim": {"lr": lr, "warmup_steps": 0, "max_steps": steps, "schedule": "constant"},
        "output": {"dir": str(out), "checkpoint_every": 1000, "tensorboard": False, "export": False},
    })


def run(tmp_path, name: str, dtype: str, steps: int, lr: float, stop: int | None = None):
    return train(config(tmp_path / name, dtype, steps, lr), show_progress_bar=False, stop_at_step=stop)


def test_bf16_updates_every_trainable_tensor_and_no_frozen_one(tmp_path):
    before = {n: p.detach().clone() for n, p in run(tmp_path, "init", "bfloat16", 3, 2e-5, stop=0).model
              .named_parameters()}
    model = run(tmp_path, "bf16", "bfloat16", 3, 2e-5).model
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trainable) and any("connector" in n for n in trainable)
    for name, p in trainable.items():
        assert p.dtype == torch.float32, name
        # Updated in bfloat16 parameters, 0 % of the DoRA magnitudes and 4 % of the LoRA-A entries moved; in
        # float32 all do, but an entry whose gradient stays below Adam's eps may move by less than its float32
        # spacing (1 of 256 here), hence 99 %, not 100 %.
        changed = (p.detach() != before[name]).float().mean().item()
        assert changed >= 0.99, f"{name}: only {changed:.1%} of its entries changed after 3 steps at lr 2e-5"
    for name, p in frozen.items():
        expected = torch.float32 if name.startswith("sam.") else torch.bfloat16
        assert p.dtype == expected, f"{name}: {p.dtype}"
        assert torch.equal(p.detach(), before[name]), f"frozen {name} changed"
    assert model.autocast_dtype == torch.bfloat16


def relative_gaps(a: list[float], b: list[float]) -> np.ndarray:
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b) / np.abs(a)


def trainables(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.requires_grad}


def update_agreement(before: dict, after: dict, ref_before: dict, ref_after: dict) -> dict[str, tuple[float, float]]:
    """Per trainable tensor, and for all of them concatenated ("all"): the cosine similarity of the update
    (after - before) with the reference run's update, and the ratio of its norm to the reference's."""
    update = {n: (after[n] - before[n]).flatten() for n in after}
    ref = {n: (ref_after[n] - ref_before[n]).flatten() for n in ref_after}
    assert set(update) == set(ref)
    names = sorted(update)
    update["all"], ref["all"] = torch.cat([update[n] for n in names]), torch.cat([ref[n] for n in names])

    def agreement(u: torch.Tensor, r: torch.Tensor) -> tuple[float, float]:
        assert r.norm() > 0  # the reference moved, so a tensor that did not is visible as cosine 0
        return (u @ r / (u.norm() * r.norm()).clamp_min(1e-300)).item(), (u.norm() / r.norm()).item()

    return {n: agreement(update[n], ref[n]) for n in update}


def test_bf16_losses_track_float32(tmp_path):
    """Tolerance: step 1 (same weights) shows bfloat16's forward rounding alone (~0.1 % of the loss: 8 mantissa
    bits, relative rounding 2^-9 per operation). The cosine logits are multiplied by 1/temperature = 50, so the
    per-step loss of this random tiny model differs by up to a few percent between the precisions (3.2 % worst
    seen over 20 steps). Allowed: 10 % at any step, 3 % on average. Losing updates is far outside: the run
    that does not learn at all (lr 0) is off by > 50 % on average at lr 3e-4, where training moves the loss.

    The losses cannot see updates lost to bfloat16 trainables (an update below half a bfloat16 spacing of the
    weight rounds away), so the parameter updates of the 20 steps (after - before, per trainable tensor and all
    concatenated) are compared with float32 training's too. Measured (CPU, torch 2.13) over the 36 trainable
    tensors: cosine >= 0.9997 at lr 2e-5 and >= 0.9985 at lr 3e-4, norm ratio bf16/fp32 in [0.993, 1.008]
    (concatenated: cosine 0.9998 / 0.9996, ratio 1.001). With the trainables left in bfloat16, 20 of the 36
    tensors fall outside: at lr 2e-5 the 10 DoRA magnitude vectors do not move at all (cosine 0, ratio 0) and the
    10 LoRA-A matrices keep cosines 0.15 - 0.24; at lr 3e-4 cosines 0 - 0.79; concatenated 0.906 / 0.966.
    Allowed: cosine >= 0.99 (7x the worst 1 - cosine seen) and a ratio within 5 % (6x the worst deviation
    seen), per tensor and concatenated."""
    init = {dtype: trainables(run(tmp_path, f"init-{dtype}", dtype, 20, 0.0, stop=0).model)
            for dtype in ("float32", "bfloat16")}
    for lr in (2e-5, 3e-4):
        fp32_run = run(tmp_path, f"f32-{lr}", "float32", 20, lr)
        bf16_run = run(tmp_path, f"bf16-{lr}", "bfloat16", 20, lr)
        fp32, bf16 = fp32_run.losses, bf16_run.losses
        gaps = relative_gaps(fp32, bf16)
        assert gaps.max() < 0.10 and gaps.mean() < 0.03, f"lr {lr}: gaps {np.round(gaps, 4)}"
        agreement = update_agreement(init["bfloat16"], trainables(bf16_run.model),
                                     init["float32"], trainables(fp32_run.model))
        assert len(agreement) > 1
        off = {n: (round(c, 4), round(r, 4)) for n, (c, r) in agreement.items() if c < 0.99 or abs(r - 1) > 0.05}
        assert not off, f"lr {lr}: bf16 updates (cosine, norm ratio) unlike float32's: {off}"
    frozen = run(tmp_path, "lr0", "float32", 20, 0.0).losses
    assert relative_gaps(fp32, frozen).mean() > 0.5  # the tolerance separates training from not training
