"""The training loop: plan a global batch from one subset, let DataLoader workers prepare this process's share,
GradCache (or plain) step, sum gradients over processes, clip, step; log, validate, checkpoint, resume, export."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from virtue.errors import ConfigError
from virtue.eval.distributed import join_process_group, local_device
from virtue.model.embedder import VirtueModel
from virtue.model.feature_cache import FeatureCache
from virtue.train.build import absolute_model_section, build_model, dtype_of, frozen_fingerprint, prepare_for_training
from virtue.train.checkpoint_model import merged_for_inference
from virtue.train.config import TrainConfig
from virtue.train.examples import TrainExample
from virtue.train.gradcache import ContrastiveBatch, gradcache_step, plain_step
from virtue.train.loss import all_reduce_gradients, info_nce
from virtue.train.pipeline import (
    ImageCheckResult,
    PreparedBatches,
    StepPlan,
    apply_image_checks,
    find_bad_images,
    make_loader,
)
from virtue.train.sampler import SubsetBatchSampler
from virtue.train.state import Resumable, checkpoint_dirs, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["TrainResult", "build_model", "load_subsets", "train"]


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # per step run in this call
    export_dir: Path | None = None
    model: VirtueModel | None = None
    evals: list[dict] = field(default_factory=list)  # validation records of this call


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _distributed() -> Processes:
    """torchrun's environment -> this process's rank, the world size and its device (cuda:LOCAL_RANK)."""
    device = local_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any CUDA work: NCCL and every .cuda() use this device
    join_process_group(device)
    if dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size(), device)
    return Processes(0, 1, device)


def load_subsets(cfg: TrainConfig) -> dict[str, tuple[list[TrainExample], float]]:
    """name -> (examples, weight) for every configured source (`synthetic` sources are generated). Checks that
    need image files are deferred (see `pipeline.find_bad_images`)."""
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
    loaded = load_sources(files, on_bad_row=cfg.data.on_bad_row, check_images=False) if files else []
    for subset in loaded:
        if subset.name in subsets:
            raise ConfigError(f"data.sources: two subsets are named {subset.name!r}")
        subsets[subset.name] = (subset.examples, subset.weight)
    return subsets


def without_prompts(examples: list[TrainExample]) -> list[TrainExample]:
    """The same examples with the visual prompts removed from every side (texts unchanged); the deferred checks
    of the removed prompts go too, the images must still be readable."""
    strip = lambda x: dataclasses.replace(x, prompt=None)  # noqa: E731
    return [
        dataclasses.replace(e, query=strip(e.query), positive=strip(e.positive),
                            negatives=tuple(strip(n) for n in e.negatives),
                            deferred=tuple(c for c in e.deferred if c.part is None))
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


def _check_eval_prompt(cfg: TrainConfig) -> None:
    masks = any(isinstance(s, dict) and s.get("kind") == "scar" and s.get("masks") for s in cfg.data.sources)
    if cfg.eval.every and cfg.eval.benchmark == "scar" and masks and cfg.eval.scar_prompt != "box_mask":
        logger.warning("training SCaR rows get box + mask prompts (masks: true) but validation uses %r; "
                       "set eval.scar_prompt: box_mask to score what is trained", cfg.eval.scar_prompt)


def _image_checks(subsets: dict, cfg: TrainConfig, procs: Processes, show: bool) -> tuple[dict, dict]:
    """Rank 0 reads the image headers; the other processes receive what it found instead of reading them too."""
    result: list[ImageCheckResult | None] = [None]
    if procs.rank == 0:
        result[0] = find_bad_images(subsets, cfg.data.image_checks, on_bad_row=cfg.data.on_bad_row,
                                    show_progress_bar=show)
    if procs.world > 1:
        dist.broadcast_object_list(result, src=0)
    return apply_image_checks(subsets, result[0])


def _scheduler(optimizer, cfg: TrainConfig):
    warmup, total = cfg.optim.warmup_steps, cfg.optim.max_steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.optim.schedule == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _towers_frozen(model: VirtueModel) -> bool:
    towers = [model.qwen.visual] + ([model.sam] if model.sam is not None else [])
    return not any(p.requires_grad for tower in towers for p in tower.parameters())


def _images_in(batch: ContrastiveBatch) -> int:
    return sum(x.has_image for side in (batch.queries, batch.targets, *batch.negatives) for x in side)


def train(
    cfg: TrainConfig, *, resume: bool = False, show_progress_bar: bool = True, stop_at_step: int | None = None
) -> TrainResult:
    """Run (or continue, with `resume`) the training `cfg` describes. Returns per-step losses.

    stop_at_step: end early at this step (after checkpointing it), as if interrupted; the schedule still
    follows `optim.max_steps`, so a later `resume=True` continues the same run.
    """
    procs = _distributed()
    rank, world = procs.rank, procs.world
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(cfg.output.dir)
    show = show_progress_bar and rank == 0
    _check_eval_prompt(cfg)
    subsets = load_subsets(cfg)
    model = build_model(cfg)
    subsets = _check_prompts(model, subsets, cfg)
    subsets, known_bad = _image_checks(subsets, cfg, procs, show)
    params = prepare_for_training(model, cfg)
    fingerprint = frozen_fingerprint(model) if rank == 0 else None
    model.to(procs.device)
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    scheduler = _scheduler(optimizer, cfg)
    sampler = SubsetBatchSampler(
        sizes={n: len(ex) for n, (ex, _) in subsets.items()},
        weights={n: w for n, (_, w) in subsets.items()},
        global_batch_size=cfg.data.global_batch_size,
        seed=cfg.data.seed,
        shuffle=cfg.data.shuffle,
    )
    live = Resumable(model, optimizer, scheduler, sampler)
    step = 0
    torch.manual_seed(cfg.seed + 1 + rank)  # dropout streams differ per process, reproducibly
    if resume:
        found = checkpoint_dirs(out)
        if not found:
            raise ConfigError(f"--resume: no checkpoint under {out}")
        state = load_checkpoint(found[-1], live, rank=rank)
        step = state["step"]
        if state.get("world_size", world) != world:
            logger.warning("resuming a run of %s processes with %d: the data order is kept, the per-process "
                           "dropout streams are not", state.get("world_size"), world)
        logger.info("resumed from %s at step %d", found[-1], step)
        if rank == 0:
            _truncate_metrics(out / "metrics.jsonl", step)
    config_record = {**cfg.to_dict(), "model": absolute_model_section(cfg.to_dict()["model"])}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(config_record, indent=2, default=str))
    last = cfg.optim.max_steps if stop_at_step is None else min(stop_at_step, cfg.optim.max_steps)
    plan = StepPlan(sampler, rank, world, first_step=step, last_step=last)
    live.sampler = plan  # checkpoints record the data position of the last step taken
    dataset = PreparedBatches(subsets, model.processor, hard_negatives=cfg.loss.use_hard_negatives,
                              on_bad_row=cfg.data.on_bad_row, known_bad=known_bad)
    loader = make_loader(dataset, plan, num_workers=cfg.data.num_workers, prefetch=cfg.data.prefetch,
                         pin_memory=procs.device.type == "cuda")
    writer = _tensorboard(out) if rank == 0 and cfg.output.tensorboard else None
    model.train()
    reuse = cfg.gradcache.reuse_image_features and _towers_frozen(model)
    loss_fn = lambda q, t, **kw: info_nce(q, t, temperature=cfg.loss.temperature, **kw)  # noqa: E731
    result = TrainResult(step)
    bar = tqdm(total=cfg.optim.max_steps, initial=step, desc="train", disable=not show)
    waited = time.perf_counter()
    for prepared in loader:
        start = time.perf_counter()
        data_wait, step = start - waited, prepared.step
        batch = prepared.batch
        # Frozen towers: the ViT and SAM2 image features of the first GradCache pass serve the second one.
        cache = FeatureCache(max(1, _images_in(batch))) if reuse else None
        embed = lambda items, cache=cache: model(items, cache=cache)  # noqa: E731
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
        plan.step_taken(step)
        elapsed = time.perf_counter() - start + data_wait
        result.losses.append(loss.item())
        record = {"step": step, "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                  "samples_per_s": cfg.data.global_batch_size / elapsed, "data_wait_s": round(data_wait, 4),
                  "subset": prepared.subset}
        if prepared.replaced:
            record["replaced_rows"] = [b.row_id for b in prepared.replaced]
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}", sps=f"{record['samples_per_s']:.1f}")
        if rank == 0 and step % cfg.output.log_every == 0:
            _log(out, record, writer)
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == cfg.optim.max_steps):
            evaluation = _validate(model, cfg, step, out, procs)
            if evaluation is not None:
                result.evals.append(evaluation)
                _log(out, evaluation, writer)
        if step % cfg.output.checkpoint_every == 0 or step in (cfg.optim.max_steps, last):
            save_checkpoint(out, step, live, keep=cfg.output.keep_checkpoints, rank=rank, barrier=procs.barrier,
                            config=config_record,
                            extra={"frozen_sha256": fingerprint, "world_size": world, "subset": prepared.subset})
        waited = time.perf_counter()
    bar.close()
    if writer is not None:
        writer.close()
    result.steps, result.model = step, model
    if cfg.output.export and rank == 0 and step == cfg.optim.max_steps:
        model.eval()
        result.export_dir = out / "final"
        merged_for_inference(model, dtype_of(cfg.output.export_dtype or cfg.model.dtype))
        model.save_pretrained(result.export_dir)
    procs.barrier()
    return result


def _validate(model: VirtueModel, cfg: TrainConfig, step: int, out: Path, procs: Processes) -> dict | None:
    """The evaluation harness on the model as it is now (rank 0; the others wait). Returns the metrics record."""
    record = None
    if procs.rank == 0:
        from virtue.eval.runner import EvalConfig, run_eval

        ev = cfg.eval
        eval_cfg = EvalConfig(
            benchmark=ev.benchmark, data_root=ev.data_root, image_root=ev.image_root,
            tasks=tuple(ev.tasks) if ev.tasks else None, limit=ev.limit, batch_size=ev.batch_size,
            cache_dir=None, out_dir=str(out / "eval" / f"step-{step}"), show_progress_bar=False,
            scar_variant=ev.scar_prompt, distributed=False,  # rank 0 alone; the other ranks wait at the barrier
        )
        model.eval()
        try:
            report = run_eval(model, eval_cfg, model_name=f"{out.name} step {step}")
        finally:
            model.train()
        record = {"step": step, "eval": {"aggregates": {k: v for k, v in report.aggregates.items()
                                                        if not k.startswith("n_tasks")},
                                         "hit@1": {t: m["hit@1"] for t, m in report.tasks.items()}}}
    procs.barrier()
    return record


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records of steps after the checkpoint: they are run again and logged again."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in lines))


def _log(out: Path, record: dict, writer) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is None:
        return
    for key in ("loss", "lr", "grad_norm", "samples_per_s", "data_wait_s"):
        if key in record:
            writer.add_scalar(f"train/{key}", record[key], record["step"])
    for group, values in record.get("eval", {}).items():
        for name, value in values.items():
            writer.add_scalar(f"eval/{group}/{name}", value, record["step"])


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))
