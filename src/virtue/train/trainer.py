"""The training loop: sample a global batch from one subset, take this process's share, GradCache (or
plain) step, sum gradients over processes, clip, step; log, checkpoint, resume, export."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from virtue.config import quiet_transformers
from virtue.errors import ConfigError
from virtue.model.embedder import VirtueModel
from virtue.train.adapters import apply_trainable, merge_adapters
from virtue.train.config import TrainConfig
from virtue.train.examples import TrainExample
from virtue.train.gradcache import ContrastiveBatch, gradcache_step, plain_step
from virtue.train.loss import all_reduce_gradients, info_nce
from virtue.train.state import Resumable, checkpoint_dirs, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per step run in this call
    export_dir: Path | None = None
    model: VirtueModel | None = None


def build_model(cfg: TrainConfig) -> VirtueModel:
    dtype = getattr(torch, cfg.model.dtype)
    if cfg.model.path is not None:
        return VirtueModel.from_pretrained(cfg.model.path, sam_checkpoint=cfg.model.sam_checkpoint, dtype=dtype)
    from transformers import AutoTokenizer

    from virtue.model import presets

    build = getattr(presets, f"{cfg.model.preset}_config", None)
    if build is None:
        raise ConfigError(f"model.preset: unknown preset {cfg.model.preset!r}; available: tiny")
    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.tokenizer)
    torch.manual_seed(cfg.seed)  # the random initialisation is part of the run
    return VirtueModel(build(**cfg.model.preset_args), tokenizer).to(dtype)


def load_subsets(cfg: TrainConfig) -> dict[str, tuple[list[TrainExample], float]]:
    """name -> (examples, weight) for every configured source (`synthetic` sources are generated)."""
    from virtue.train.data import load_sources

    subsets: dict[str, tuple[list[TrainExample], float]] = {}
    files = []
    for source in cfg.data.sources:
        if isinstance(source, dict) and source.get("kind") == "synthetic":
            from virtue.train.synthetic import synthetic_train_examples

            args = {k: v for k, v in source.items() if k not in ("kind", "weight", "name")}
            name = source.get("name", "synthetic")
            subsets[name] = (synthetic_train_examples(subset=name, **args), float(source.get("weight", 1.0)))
        else:
            files.append(source)
    for subset in load_sources(files, on_bad_row=cfg.data.on_bad_row) if files else []:
        if subset.name in subsets:
            raise ConfigError(f"data.sources: two subsets are named {subset.name!r}")
        subsets[subset.name] = (subset.examples, subset.weight)
    return subsets


def without_prompts(examples: list[TrainExample]) -> list[TrainExample]:
    """The same examples with the visual prompts removed from every side (texts unchanged)."""
    strip = lambda x: dataclasses.replace(x, prompt=None)  # noqa: E731
    return [
        dataclasses.replace(e, query=strip(e.query), positive=strip(e.positive),
                            negatives=tuple(strip(n) for n in e.negatives))
        for e in examples
    ]


def _check_prompts(model: VirtueModel, subsets: dict, cfg: TrainConfig) -> dict:
    if cfg.data.drop_visual_prompts:
        logger.info("data.drop_visual_prompts: visual prompts removed; boxes remain only where texts name them")
        return {name: (without_prompts(ex), w) for name, (ex, w) in subsets.items()}
    if model.sam is None and any(e.query.prompt is not None for ex, _ in subsets.values() for e in ex):
        raise ConfigError("the model has no SAM branch but the data has visual prompts; "
                          "set data.drop_visual_prompts=true to train on the texts alone")
    return subsets


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _scheduler(optimizer, cfg: TrainConfig):
    warmup, total = cfg.optim.warmup_steps, cfg.optim.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _batch(examples: list[TrainExample], hard_negatives: bool) -> ContrastiveBatch:
    return ContrastiveBatch(
        queries=[e.query for e in examples],
        targets=[e.positive for e in examples],
        negatives=[list(e.negatives) if hard_negatives else [] for e in examples],
    )


def train(
    cfg: TrainConfig, *, resume: bool = False, show_progress_bar: bool = True, stop_at_step: int | None = None
) -> TrainResult:
    """Run (or continue, with `resume`) the training `cfg` describes. Returns per-step losses.

    stop_at_step: end early at this step (after checkpointing it), as if interrupted; the schedule still
    follows `optim.max_steps`, so a later `resume=True` continues the same run.
    """
    from virtue.train.sampler import SubsetBatchSampler, shard

    rank, world = _distributed()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.output.dir)
    subsets = load_subsets(cfg)
    model = build_model(cfg)
    subsets = _check_prompts(model, subsets, cfg)
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    model.to(device)
    params = apply_trainable(model, cfg.trainable)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    sampler = SubsetBatchSampler(
        sizes={n: len(ex) for n, (ex, _) in subsets.items()},
        weights={n: w for n, (_, w) in subsets.items()},
        global_batch_size=cfg.data.global_batch_size,
        seed=cfg.data.seed,
    )
    live = Resumable(model, optimizer, scheduler, sampler)
    step = 0
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout streams differ per process, reproducibly
    if resume:
        found = checkpoint_dirs(out)
        if not found:
            raise ConfigError(f"--resume: no checkpoint under {out}")
        step = load_checkpoint(found[-1], live)["step"]
        logger.info("resumed from %s at step %d", found[-1], step)
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", step)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
    writer = _tensorboard(out) if rank == 0 and cfg.output.tensorboard else None
    model.train()
    embed = lambda items: model(items)  # noqa: E731
    loss_fn = lambda q, t, **kw: info_nce(q, t, temperature=cfg.loss.temperature, **kw)  # noqa: E731
    losses: list[float] = []
    batches = iter(sampler)
    bar = tqdm(total=cfg.optim.max_steps, initial=step, desc="train", disable=not show_progress_bar or rank != 0)
    last = cfg.optim.max_steps if stop_at_step is None else min(stop_at_step, cfg.optim.max_steps)
    while step < last:
        start = time.perf_counter()
        global_batch = next(batches)
        local = shard(global_batch, rank, world)
        batch = _batch([subsets[name][0][i] for name, i in local], cfg.loss.use_hard_negatives)
        optimizer.zero_grad(set_to_none=True)
        if cfg.gradcache.enabled:
            loss = gradcache_step(embed, batch, loss_fn, query_chunk=cfg.gradcache.query_chunk,
                                  target_chunk=cfg.gradcache.target_chunk)
        else:
            loss = plain_step(embed, batch, loss_fn)
        all_reduce_gradients(params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.max_grad_norm)
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        step += 1
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        record = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                  "samples_per_s": cfg.data.global_batch_size / elapsed, "subset": global_batch[0][0]}
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}")
        if rank == 0 and step % cfg.output.log_every == 0:
            _log(out, record, writer)
        if step % cfg.output.checkpoint_every == 0 or step in (cfg.optim.max_steps, last):
            if rank == 0:
                save_checkpoint(out, step, live, keep=cfg.output.keep_checkpoints)
            if world > 1:
                dist.barrier()
    bar.close()
    if writer is not None:
        writer.close()
    export = None
    if cfg.output.export and rank == 0 and step == cfg.optim.max_steps:
        model.eval()
        export = out / "final"
        merge_adapters(model).save_pretrained(export)
    return TrainResult(step, losses, export, model)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after the checkpoint: they are run again and logged again."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _log(out: Path, record: dict, writer) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for key in ("loss", "lr", "grad_norm", "samples_per_s"):
            writer.add_scalar(f"train/{key}", record[key], record["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
