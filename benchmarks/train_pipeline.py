"""Training data pipeline throughput and training-step memory, measured side by side in one invocation (CPU).

1. Throughput (`--only throughput`): the tiny preset trains with the official recipe (LoRA + connector, frozen
   towers, GradCache on) from a SCaR-format parquet whose images are PNG files on disk
   (`virtue.train.synthetic.write_scar_parquet`, `--image-size` px, default 448: the tiny preset's Qwen ViT then
   reads 448x448 = 1024 patches / 256 LLM tokens, SAM2 reads 256x256; Gaussian grain, `--grain`, makes the PNGs
   photo-sized, ~400 KiB, instead of ~5 KiB flat drawings), with `data.num_workers` 0 and 2 (prefetch 2), and from
   the in-memory `synthetic` source (same scenes as PIL images: no files, no decoding) as a reference.
   Per-step numbers come from each run's `metrics.jsonl` (`samples_per_s`, `data_wait_s`), warm-up steps left out.
   The configurations run alternately (0, 2, synthetic, 0, 2, synthetic, ...) and the tables show medians over
   the repeats, because the machine is noisy; only ratios measured in the same invocation mean much.
2. Memory (`--only memory`): one training step (GradCache off, so the activations of the whole batch are alive at
   once) with and without `model.gradient_checkpointing`, a wider tiny model (hidden 128, 6 layers) and long
   positives, each mode in a fresh interpreter: the peak RSS of the step above the RSS just before it
   (/proc/self/clear_refs + VmHWM, glibc told to return freed memory to the system), the step time, and the bytes
   of the tensors autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`).

    python benchmarks/train_pipeline.py                        # both parts: ~4-5 min on 2 idle cores
    python benchmarks/train_pipeline.py --steps 5 --repeats 1  # a quick check, under a minute
    python benchmarks/train_pipeline.py --only memory --threads 2

Torch runs with `--threads` intra-op threads (default 1, printed at the top): on a 2-core machine shared with other
jobs, multi-threaded ops stall whenever another process holds a core (the "contention probe" line shows it), which
slows steps down tenfold at random. Every run also reports the cores other processes used meanwhile ("other load").

The training step is the real one: the memory child wraps `virtue.train.trainer.plain_step` (the forward and
backward of the whole batch) to measure around it, inside an ordinary `train()` call.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from bench_common import OtherLoad, load_average, print_table, rotated
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO.parent / "shared/fixtures/virtue-official-tiny/checkpoint"
MiB = 1024 * 1024
# glibc: allocations from 64 KiB up are mmap-ed and unmapped when freed, and free heap memory above 1 MiB is given
# back, so that RSS follows the live tensors instead of what malloc keeps around from earlier steps.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}


# ---------------------------------------------------------------------------------------------------------------
# Shared helpers


def environment(threads: int) -> str:
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"python {platform.python_version()}, torch {torch.__version__}, torch threads {threads} "
            f"(set explicitly; interop {torch.get_num_interop_threads()}), CPUs {os.cpu_count()} "
            f"(usable {len(os.sched_getaffinity(0))}), load average {load}")


def contention_probe(threads: int) -> str:
    """Time of a small elementwise op with 1 and `threads` intra-op threads. When other processes keep the cores
    busy, a parallel region waits for a descheduled thread and every op costs milliseconds instead of microseconds;
    training steps then slow down by an order of magnitude and timings mean little."""
    x = torch.randn(2048, 128)
    before = torch.get_num_threads()
    times = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        for _ in range(20):
            x.mul(1.5)
        start = time.perf_counter()
        for _ in range(200):
            x.mul(1.5)
        times[n] = (time.perf_counter() - start) / 200 * 1e3
    torch.set_num_threads(before)
    shown = ", ".join(f"{n} thread(s) {t:.3f} ms" for n, t in times.items())
    slow = times[threads] > 5 * times[1] and times[threads] > 1.0
    return f"contention probe (mul of 2048x128 floats): {shown}" + (
        " -- other processes compete for the cores: threaded ops stall, timings are unreliable" if slow else "")


def train_quietly(cfg_dict: dict) -> None:
    from virtue.train.config import TrainConfig
    from virtue.train.trainer import train

    train(TrainConfig.from_dict(cfg_dict), show_progress_bar=False)


def resolution_note(image_size: int, sam_image_size: int = 256) -> str:
    """What the tiny preset makes of an image_size x image_size picture."""
    from virtue.config import ImageProcessingConfig
    from virtue.processing.qwen import smart_resize

    ip = ImageProcessingConfig()
    h, w = smart_resize(image_size, image_size, ip)
    patches = (h // ip.patch_size) * (w // ip.patch_size)
    return (f"{image_size}x{image_size} PNG -> Qwen ViT input {w}x{h} ({patches} patches of {ip.patch_size} px, "
            f"{patches // ip.merge_size**2} visual tokens in the LLM), SAM2 input {sam_image_size}x{sam_image_size}")


# ---------------------------------------------------------------------------------------------------------------
# 1. Throughput


@dataclass
class Variant:
    label: str
    source: dict
    num_workers: int
    runs: list[dict] = field(default_factory=list)


def throughput_config(out: Path, args: argparse.Namespace, variant: Variant) -> dict:
    return {
        "seed": 0,
        "model": {"preset": "tiny", "tokenizer": str(args.tokenizer)},
        "data": {"sources": [variant.source], "global_batch_size": args.batch, "num_workers": variant.num_workers,
                 "prefetch": args.prefetch},
        "gradcache": {"enabled": True, "query_chunk": args.chunk, "target_chunk": args.chunk},
        "trainable": {"lora": True, "connector": True},
        "optim": {"lr": 1e-4, "warmup_steps": 1, "max_steps": args.warmup + args.steps, "schedule": "constant"},
        "output": {"dir": str(out), "checkpoint_every": 10**9, "tensorboard": False, "export": False},
    }


def run_variant(root: Path, args: argparse.Namespace, variant: Variant, repeat: int) -> dict:
    out = root / f"{re.sub(r'[^a-z0-9]+', '_', variant.label)}-w{variant.num_workers}-r{repeat}"
    shutil.rmtree(out, ignore_errors=True)  # metrics.jsonl is appended to
    start = time.perf_counter()
    with OtherLoad() as other:
        train_quietly(throughput_config(out, args, variant))
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    timed = [r for r in records if r["step"] > args.warmup]
    if len(timed) != args.steps:
        raise RuntimeError(f"{variant.label}: expected {args.steps} timed steps, found {len(timed)}")
    elapsed = [args.batch / r["samples_per_s"] for r in timed]  # the trainer's per-step time, data wait included
    waits = [r["data_wait_s"] for r in timed]
    return {"samples_per_s": args.batch * len(timed) / sum(elapsed), "data_wait_s": statistics.fmean(waits),
            "compute_s": statistics.fmean(e - w for e, w in zip(elapsed, waits, strict=True)), "wall_s": wall,
            "other_cores": other.cores}


def add_grain(images: Sequence[Path], sigma: float, seed: int = 0) -> None:
    """Rewrite the PNGs with Gaussian grain: flat synthetic scenes compress to a few KiB and decode almost for free,
    grainy ones are photo-sized files whose decoding is real work. Boxes and objects stay where they are."""
    rng = np.random.default_rng(seed)
    for path in images:
        pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32)
        pixels += rng.normal(0.0, sigma, pixels.shape).astype(np.float32)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def throughput(args: argparse.Namespace, root: Path) -> None:
    from virtue.train.synthetic import write_scar_parquet

    rows = max(args.rows, args.batch * (args.warmup + args.steps))
    folder = root / "scar"
    shutil.rmtree(folder, ignore_errors=True)  # existing PNGs would be kept and get grain twice
    start = time.perf_counter()
    parquet = write_scar_parquet(folder, n=rows, seed=0, size=args.image_size)
    images = sorted((folder / "images").glob("*.png"))
    if args.grain > 0:
        add_grain(images, args.grain)
    n_images = len(images)
    size_mb = sum(p.stat().st_size for p in images) / MiB
    print(f"\n== 1. Throughput: tiny preset, LoRA + connector (frozen towers), GradCache chunks {args.chunk}, "
          f"global batch {args.batch}, {args.steps} timed steps after {args.warmup} warm-up steps, "
          f"{args.repeats} repeat(s), alternating")
    grain = f"grain sigma {args.grain:g}" if args.grain > 0 else "no grain"
    print(f"SCaR parquet: {pq.read_metadata(parquet).num_rows} rows, {n_images} PNG files ({grain}, "
          f"{size_mb / n_images * 1024:.0f} KiB each on average), written in {time.perf_counter() - start:.1f} s; "
          f"{resolution_note(args.image_size)}")
    print("The files were just written, so reads hit the page cache: this measures decoding and preprocessing, "
          "not disk I/O. The synthetic source holds the same scenes as PIL images (no grain, nothing to decode).")
    scar = {"kind": "scar", "path": str(folder)}
    synthetic = {"kind": "synthetic", "n": rows, "seed": 0, "size": args.image_size}
    variants = [Variant("scar parquet", scar, w) for w in args.workers]
    variants.append(Variant("synthetic (memory)", synthetic, 0))
    for repeat in range(args.repeats):
        for v in rotated(variants, repeat):  # no configuration always runs first
            result = run_variant(root / "runs", args, v, repeat)
            v.runs.append(result)
            print(f"  repeat {repeat + 1}/{args.repeats}  {v.label:<18} num_workers={v.num_workers}  "
                  f"{result['samples_per_s']:6.2f} samples/s  data wait {result['data_wait_s']:.3f} s/step  "
                  f"train() {result['wall_s']:.1f} s  other processes {result['other_cores']:.2f} cores", flush=True)
    base = statistics.median(r["samples_per_s"] for r in variants[0].runs)
    table = []
    for v in variants:
        sps = [r["samples_per_s"] for r in v.runs]
        table.append([v.label, v.num_workers, f"{statistics.median(sps):.2f}",
                      " ".join(f"{s:.1f}" for s in sps),
                      f"{statistics.median(r['data_wait_s'] for r in v.runs):.3f}",
                      f"{statistics.median(r['compute_s'] for r in v.runs):.3f}",
                      f"{statistics.median(sps) / base:.2f}",
                      f"{statistics.median(r['other_cores'] for r in v.runs):.2f}"])
    print(f"\nMedians over {args.repeats} repeat(s) [load average {load_average()}]; ratio = samples/s over scar "
          f"parquet with num_workers={variants[0].num_workers}:")
    print_table(["source", "num_workers", "samples/s", "per repeat", "data wait s/step", "compute s/step",
                 "ratio", "other load"], table)
    print("compute s/step = step time minus data wait (GradCache forward x2, backward, optimiser); with workers on "
          f"{os.cpu_count()} CPUs it includes their competition for the cores. other load = cores used by other "
          "processes during the run (noise).")


# ---------------------------------------------------------------------------------------------------------------
# 2. Memory with and without gradient checkpointing


def write_memory_data(folder: Path, args: argparse.Namespace) -> Path:
    """A JSON lines source: SCaR queries (image file + box + instruction) and long positives (`--captions`
    synthetic captions joined into one text), so that the LLM's activations dominate."""
    from virtue.train.synthetic import write_scar_parquet

    rows = pq.read_table(write_scar_parquet(folder, n=args.mem_batch * 4, seed=1, size=args.mem_image_size))
    path = folder / "long_texts.jsonl"
    with open(path, "w") as f:
        for row in rows.to_pylist():
            x, y, w, h = row["bbox"]
            captions = ([row["pos_text"]] + list(row["neg_text"])) * (1 + args.captions // 10)
            query = {"text": "Find the caption that describes the boxed object, its neighbour and the scene.",
                     "image": row["qry_image_path"], "box": [x, y, x + w, y + h]}
            f.write(json.dumps({"query": query, "positive": ". ".join(captions[: args.captions])}) + "\n")
    return path


def memory_config(out: Path, args: argparse.Namespace, data: Path, checkpointing: bool) -> dict:
    return {
        "seed": 0,
        "model": {"preset": "tiny", "tokenizer": str(args.tokenizer), "gradient_checkpointing": checkpointing,
                  "preset_args": {"hidden_size": args.mem_hidden, "num_layers": args.mem_layers}},
        "data": {"sources": [{"kind": "jsonl", "path": str(data)}], "global_batch_size": args.mem_batch,
                 "num_workers": 0, "shuffle": False},
        "gradcache": {"enabled": False},
        "trainable": {"lora": True, "connector": True},
        "optim": {"lr": 1e-4, "warmup_steps": 1, "max_steps": 1 + args.mem_steps, "schedule": "constant"},
        "output": {"dir": str(out), "checkpoint_every": 10**9, "tensorboard": False, "export": False},
    }


def _status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS
        f.write("5")


class SavedTensorBytes:
    """Counts what autograd saves for backward while active: every pack (numel * element size, repeats included),
    and the distinct storages kept alive, split into model weights/buffers and everything else."""

    def __init__(self, weight_storages: set[int]):
        self.weights = weight_storages
        self.packed = self.count = self.in_backward = 0
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.count += 1
        self.packed += t.numel() * t.element_size()
        # -1 outside a backward pass (private API; only used to tell recomputation apart)
        if getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1:
            self.in_backward += t.numel() * t.element_size()
        try:
            storage = t.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # e.g. tensors without storage
            pass
        return t

    def __enter__(self) -> SavedTensorBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)

    def summary(self) -> dict:
        weights = sum(n for p, n in self.storages.items() if p in self.weights)
        other = sum(n for p, n in self.storages.items() if p not in self.weights)
        return {"saved_count": self.count, "saved_packed_MiB": self.packed / MiB,
                "saved_unique_nonweight_MiB": other / MiB, "saved_unique_weight_MiB": weights / MiB,
                "saved_in_backward_MiB": self.in_backward / MiB}


def memory_child(args: argparse.Namespace) -> None:
    """Runs in a fresh interpreter: train 1 + mem_steps steps; the first counts saved tensors (and warms up), the
    others measure peak RSS and time around `plain_step`. Prints one JSON line."""
    torch.set_num_threads(args.threads)
    import virtue.train.trainer as trainer
    from virtue.train.config import TrainConfig

    checkpointing = bool(int(args.memory_child))
    model_box: dict[str, torch.nn.Module] = {}
    steps: list[dict] = []
    layer_inputs = [0, 0]  # decoder-layer calls with grad, bytes of their hidden-state inputs
    layer_shapes: set[tuple[int, ...]] = set()
    layer_storages: dict[int, int] = {}

    prepare = trainer.prepare_for_training

    def capture_model(model: torch.nn.Module, cfg: TrainConfig) -> list:
        model_box["model"] = model
        return prepare(model, cfg)

    def count_layer_input(module: torch.nn.Module, layer_args: tuple) -> None:
        if torch.is_grad_enabled() and layer_args and isinstance(layer_args[0], torch.Tensor):
            layer_inputs[0] += 1
            layer_inputs[1] += layer_args[0].numel() * layer_args[0].element_size()
            layer_shapes.add(tuple(layer_args[0].shape))
            storage = layer_args[0].untyped_storage()
            layer_storages[storage.data_ptr()] = storage.nbytes()

    plain_step = trainer.plain_step

    def measured_step(embed: Callable, batch: Any, loss_fn: Callable) -> torch.Tensor:
        model = model_box["model"]
        if not steps:  # first step: count what is saved for backward (the hooks cost a little time)
            from transformers.modeling_layers import GradientCheckpointingLayer

            handles = [m.register_forward_pre_hook(count_layer_input)
                       for m in model.qwen.language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
            tensors = list(model.parameters()) + list(model.buffers())
            counter = SavedTensorBytes({t.untyped_storage().data_ptr() for t in tensors})
            start = time.perf_counter()
            with counter:
                loss = plain_step(embed, batch, loss_fn)
            for h in handles:
                h.remove()
            steps.append({"time_s": time.perf_counter() - start, **counter.summary(),
                          "layer_calls": layer_inputs[0], "layer_inputs_MiB": layer_inputs[1] / MiB,
                          "layer_inputs_saved_MiB": sum(n for ptr, n in counter.storages.items()
                                                        if ptr in layer_storages) / MiB,
                          "layer_input_shapes": sorted(layer_shapes)})
            return loss
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        base = _status_kib("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        loss = plain_step(embed, batch, loss_fn)
        elapsed = time.perf_counter() - start
        steps.append({"time_s": elapsed, "peak_MiB": (_status_kib("VmHWM") - base) / 1024,
                      "rss_before_MiB": base / 1024})
        return loss

    trainer.prepare_for_training = capture_model
    trainer.plain_step = measured_step
    train_quietly(memory_config(Path(args.out), args, Path(args.data), checkpointing))
    measured = steps[1:]
    print(json.dumps({"checkpointing": checkpointing, **steps[0],
                      "warmup_time_s": steps[0]["time_s"],
                      "time_s": min(s["time_s"] for s in measured),  # the least disturbed step
                      "peak_MiB": max(s["peak_MiB"] for s in measured),
                      "peak_per_step_MiB": [round(s["peak_MiB"], 1) for s in measured],
                      "rss_before_MiB": measured[-1]["rss_before_MiB"]}))


def memory(args: argparse.Namespace, root: Path) -> None:
    shutil.rmtree(root / "memory-data", ignore_errors=True)
    data = write_memory_data(root / "memory-data", args)
    repeats = min(args.repeats, args.mem_repeats)
    print(f"\n== 2. Memory of one training step: tiny preset hidden {args.mem_hidden}, {args.mem_layers} layers, "
          f"LoRA + connector, GradCache off, global batch {args.mem_batch}, positives of {args.captions} captions, "
          f"{resolution_note(args.mem_image_size)}; each mode in a fresh interpreter, {repeats} repeat(s), "
          "alternating")
    results: dict[bool, list[dict]] = {False: [], True: []}
    env = {**os.environ, **MALLOC_ENV}
    for repeat in range(repeats):
        for checkpointing in rotated([False, True], repeat):
            cmd = [sys.executable, __file__, "--memory-child", str(int(checkpointing)), "--data", str(data),
                   "--out", str(root / f"mem-{int(checkpointing)}-r{repeat}"), "--threads", str(args.threads),
                   "--tokenizer", str(args.tokenizer), "--mem-batch", str(args.mem_batch),
                   "--mem-hidden", str(args.mem_hidden), "--mem-layers", str(args.mem_layers),
                   "--mem-steps", str(args.mem_steps)]
            with OtherLoad() as other:
                done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"memory child failed ({done.returncode}):\n{done.stderr[-4000:]}")
            result = {**json.loads(done.stdout.strip().splitlines()[-1]), "other_cores": other.cores}
            results[checkpointing].append(result)
            print(f"  repeat {repeat + 1}/{repeats}  checkpointing={str(checkpointing):<5}  "
                  f"step peak +{result['peak_MiB']:.1f} MiB (per step {result['peak_per_step_MiB']})  "
                  f"step {result['time_s']:.2f} s (min of {args.mem_steps})  other processes "
                  f"{result['other_cores']:.2f} cores", flush=True)

    def med(checkpointing: bool, key: str) -> float:
        return statistics.median(r[key] for r in results[checkpointing])

    table = []
    for checkpointing in (False, True):
        table.append(["on" if checkpointing else "off", f"{med(checkpointing, 'peak_MiB'):.1f}",
                      f"{med(checkpointing, 'time_s'):.2f}", f"{med(checkpointing, 'saved_packed_MiB'):.1f}",
                      f"{med(checkpointing, 'saved_unique_nonweight_MiB'):.1f}",
                      f"{med(checkpointing, 'saved_unique_weight_MiB'):.1f}",
                      f"{med(checkpointing, 'layer_inputs_MiB'):.1f}", f"{med(checkpointing, 'rss_before_MiB'):.0f}",
                      f"{med(checkpointing, 'other_cores'):.2f}"])
    table.append(["on / off", f"{med(True, 'peak_MiB') / med(False, 'peak_MiB'):.2f}",
                  f"{med(True, 'time_s') / med(False, 'time_s'):.2f}",
                  f"{med(True, 'saved_packed_MiB') / med(False, 'saved_packed_MiB'):.2f}",
                  f"{med(True, 'saved_unique_nonweight_MiB') / med(False, 'saved_unique_nonweight_MiB'):.2f}",
                  "", "", "", ""])
    print(f"\nMedians over {repeats} repeat(s) (MiB, seconds) [load average {load_average()}]:")
    print_table(["checkpointing", "step peak RSS +", "step time", "saved (sum)", "saved activations",
                 "saved weights", "layer inputs", "RSS before", "other load"], table)
    first = results[True][0]
    print("step peak RSS + : VmHWM during the step (forward + backward of the whole batch) minus VmRSS just before it;"
          " the max over the measured steps of a run. step time: the min over them (the least disturbed).")
    print("saved (sum)     : sum of numel * element size over every tensor packed by autograd during the step, "
          "repeats included (weights saved by each matmul count every time).")
    print("saved activations / weights: distinct storages kept alive for backward, minus / only the model's "
          "parameters and buffers.")
    shapes = ", ".join("x".join(map(str, shape)) for shape in first["layer_input_shapes"])
    print(f"layer inputs    : hidden states entering the LLM decoder layers with grad ({first['layer_calls']} calls "
          f"per step; batch x tokens x hidden: {shapes}), for scale.")
    print(f"With checkpointing the outer hook sees {med(True, 'saved_unique_nonweight_MiB'):.1f} MiB of "
          f"activations, {first['layer_inputs_saved_MiB']:.1f} MiB of which are the decoder layers' input storages "
          "(non-reentrant checkpointing saves its inputs through autograd, so the outer hook packs them); the rest is "
          "saved outside the layers (embeddings, connector, final norm, pooling, loss). What the layers save goes to "
          "the checkpoint's own hooks, is dropped after the forward and recomputed in backward: the outer hook never "
          f"sees it (packed during backward: {first['saved_in_backward_MiB']:.1f} MiB). Without checkpointing, "
          f"{results[False][0]['layer_inputs_saved_MiB']:.1f} MiB of the saved storages are layer inputs.")


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=30, help="timed training steps per throughput run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps at the start of every throughput run")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats of every configuration")
    p.add_argument("--only", choices=["throughput", "memory"], default=None)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a 2-core machine shared with other jobs, threaded ops "
                        "stall whenever another process holds a core, see the contention probe; and with "
                        "num_workers=2 the workers then have a core of their own)")
    p.add_argument("--batch", type=int, default=8, help="global batch of the throughput runs")
    p.add_argument("--chunk", type=int, default=4, help="GradCache query/target chunk of the throughput runs")
    p.add_argument("--workers", type=lambda s: [int(v) for v in s.split(",")], default=[0, 2],
                   help="num_workers values for the parquet source, comma separated (the first is the ratio's base)")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--image-size", type=int, default=448, help="side of the square PNGs of the throughput runs")
    p.add_argument("--grain", type=float, default=8.0,
                   help="Gaussian grain (sigma, 0-255 scale) added to the PNGs so they decode like photos; 0: none")
    p.add_argument("--rows", type=int, default=0, help="parquet rows (default: batch x all steps, no row repeats)")
    p.add_argument("--mem-batch", type=int, default=16, help="global batch of the memory step")
    p.add_argument("--mem-hidden", type=int, default=128)
    p.add_argument("--mem-layers", type=int, default=6)
    p.add_argument("--mem-image-size", type=int, default=224)
    p.add_argument("--mem-repeats", type=int, default=3,
                   help="alternating repeats of the memory children (at most --repeats)")
    p.add_argument("--mem-steps", type=int, default=3, help="measured steps per memory child (after one more)")
    p.add_argument("--captions", type=int, default=10, help="synthetic captions joined into each memory positive")
    p.add_argument("--tokenizer", default=str(TOKENIZER), help="folder with the Qwen2 tokenizer files")
    p.add_argument("--out", default=None, help="keep the data and run folders here (default: a temporary folder)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    if args.memory_child is not None:
        return memory_child(args)
    torch.set_num_threads(args.threads)
    print(environment(torch.get_num_threads()))
    print(contention_probe(args.threads))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="train_pipeline-") as tmp:
        root = Path(args.out) if args.out else Path(tmp)
        if args.only in (None, "throughput"):
            throughput(args, root)
        if args.only in (None, "memory"):
            memory(args, root)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; load average now "
          f"{', '.join(f'{v:.2f}' for v in os.getloadavg())}; {contention_probe(args.threads)}")


if __name__ == "__main__":
    main()
