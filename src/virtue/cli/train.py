"""`virtue train --config FILE.yaml [section.key=value ...] [--resume]`."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("train", help="contrastive fine-tuning (GradCache, DoRA/LoRA), resumable")
    p.add_argument("--config", required=True, help="training YAML (see configs/)")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=1e-4 data.global_batch_size=32")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to JSONL)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtue.train.config import TrainConfig
    from virtue.train.trainer import train

    cfg = TrainConfig.load(args.config, args.overrides)
    result = train(cfg, resume=args.resume, show_progress_bar=not args.no_progress)
    if result.export_dir is not None:
        print(f"trained {result.steps} steps; model exported to {result.export_dir}")
    return 0
