"""Train a tiny VIRTUE from scratch on the procedural SCaR-style task (CPU), then measure held-out hit@1
over 10 candidates with box prompts; the same run with the SAM branch disabled (box only in the text);
and the peak memory of a GradCache step vs a plain step at the same global batch.

    python benchmarks/train_synthetic.py                 # both runs + memory, prints a table
    python benchmarks/train_synthetic.py --only sam --steps 100

Hit@1 counts ties against the positive (a constant model scores 0, not 100 %).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import TOKENIZER, load_average

from virtue import VirtueModel
from virtue.train.config import TrainConfig
from virtue.train.synthetic import synthetic_eval_queries
from virtue.train.trainer import train

REPO = Path(__file__).resolve().parents[1]


def run_config(out: Path, args: argparse.Namespace, sam: bool) -> dict:
    return {
        "seed": args.seed,
        "model": {"preset": "tiny", "tokenizer": str(args.tokenizer),
                  "preset_args": {"hidden_size": args.hidden, "num_layers": args.layers, "sam_enabled": sam,
                                  "vision_depth": args.vision_depth, "vision_dim": args.vision_dim}},
        "data": {"sources": [{"kind": "synthetic", "n": args.train_examples, "seed": args.seed,
                              "hard_negatives": args.hard_negatives}],
                 "global_batch_size": args.batch, "drop_visual_prompts": not sam},
        "gradcache": {"enabled": args.gradcache, "query_chunk": args.chunk, "target_chunk": args.chunk},
        "loss": {"temperature": args.temperature, "use_hard_negatives": args.hard_negatives > 0},
        "trainable": {"lora": False, "llm": True, "vision": True, "sam": sam, "connector": sam},
        "optim": {"lr": args.lr, "warmup_steps": args.warmup, "max_steps": args.steps, "schedule": "linear"},
        "output": {"dir": str(out), "checkpoint_every": args.steps, "tensorboard": False, "export": False},
    }


def hit_at_1(model: VirtueModel, queries, sam: bool, batch_size: int = 32) -> float:
    """Share of queries whose positive (candidate 0) scores strictly above every distractor."""
    inputs = [q if sam else {"image": q.image, "text": q.text} for q, _ in queries]
    q = model.encode(inputs, batch_size=batch_size, show_progress_bar=False)
    texts = sorted({c for _, cands in queries for c in cands})
    index = {t: i for i, t in enumerate(texts)}
    c = model.encode(texts, batch_size=256, show_progress_bar=False)
    hits = 0
    for row, (_, cands) in zip(q, queries, strict=True):
        scores = c[[index[t] for t in cands]] @ row
        hits += bool(scores[0] > scores[1:].max())
    return hits / len(queries)


def train_and_eval(args: argparse.Namespace, sam: bool) -> dict:
    cfg = TrainConfig.from_dict(run_config(Path(args.out) / ("sam" if sam else "text-box"), args, sam))
    start = time.perf_counter()
    result = train(cfg, show_progress_bar=not args.no_progress)
    train_s = time.perf_counter() - start
    model = result.model.eval()
    queries = synthetic_eval_queries(args.eval_queries, seed=args.seed)
    return {"sam": sam, "train_s": round(train_s, 1), "steps": result.steps,
            "final_loss": round(float(np.mean(result.losses[-10:])), 4), "hit@1": hit_at_1(model, queries, sam),
            "load_average": load_average()}


def step_memory(args: argparse.Namespace, gradcache: bool) -> float:
    """Peak RSS (MiB) of training steps above the process after setup, in a fresh process per mode."""
    cmd = [sys.executable, __file__, "--memory-child", str(int(gradcache)), "--batch", str(args.batch),
           "--tokenizer", str(args.tokenizer), "--vision-depth", str(args.vision_depth),
           "--vision-dim", str(args.vision_dim),
           "--chunk", str(args.chunk), "--hidden", str(args.hidden), "--layers", str(args.layers),
           "--out", str(Path(args.out) / f"mem-{int(gradcache)}")]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])


def memory_child(args: argparse.Namespace) -> None:
    def rss(field: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    data = run_config(Path(args.out), args, sam=True)
    data["gradcache"]["enabled"] = bool(int(args.memory_child))
    data["optim"].update(max_steps=2, warmup_steps=1)
    data["data"]["sources"][0]["n"] = args.batch * 2
    cfg = TrainConfig.from_dict(data)
    train(TrainConfig.from_dict({**data, "optim": {**data["optim"], "max_steps": 1}}), show_progress_bar=False)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak: setup and the first step do not count
        f.write("5")
    base = rss("VmRSS")
    train(cfg, show_progress_bar=False)
    print((rss("VmHWM") - base) / 1024)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1750)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--chunk", type=int, default=4, help="GradCache chunk (and the memory comparison's)")
    p.add_argument("--gradcache", action="store_true", help="train the accuracy runs with GradCache too "
                   "(same gradients, one extra forward pass: slower on CPU, where memory is not the limit)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vision-depth", type=int, default=2)
    p.add_argument("--vision-dim", type=int, default=64)
    p.add_argument("--train-examples", type=int, default=4000)
    p.add_argument("--hard-negatives", type=int, default=3)
    p.add_argument("--eval-queries", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=["sam", "text-box", "memory"], default=None)
    p.add_argument("--out", default=str(REPO / "outputs/bench-train"))
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="folder with the Qwen2 tokenizer files")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child is not None:
        return memory_child(args)
    torch.set_num_threads(torch.get_num_threads())
    rows = []
    if args.only in (None, "sam"):
        rows.append(train_and_eval(args, sam=True))
    if args.only in (None, "text-box"):
        rows.append(train_and_eval(args, sam=False))
    for row in rows:
        print(json.dumps(row))
    if args.only in (None, "memory"):
        plain, cached = step_memory(args, False), step_memory(args, True)
        print(json.dumps({"global_batch": args.batch, "chunk": args.chunk, "plain_step_MiB": round(plain, 1),
                          "gradcache_step_MiB": round(cached, 1), "ratio": round(cached / plain, 2),
                          "load_average": load_average()}))


if __name__ == "__main__":
    main()
