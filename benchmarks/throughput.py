"""Embedding throughput: our `VirtueModel.encode` (image features reused across the prompts of a photo, images
preprocessed ahead of the model by a worker thread) against the per-row path of the official pipeline (every row
computes its own image features, images read in turn), side by side in one run, on models with random weights
built from a preset (nothing downloaded).

Sections (`--only NAME` runs one; by default the CPU run does pipeline, scar, mmeb and memory, the GPU run scar,
mmeb and memory):

1. pipeline -- the CPU criterion (issue 9): torch pinned to `--threads` (default 1) intra-op thread, 1
   preprocessing worker, `--photos` (default 16) phone-sized JPEGs (the mini-SCaR photos upscaled 6x, bicubic,
   quality 92, written to a temporary folder), one box prompt and a short instruction each. Times, alternating
   over `--repeats` (medians): preprocessing alone (`VirtueProcessor.preprocess` of every row in one thread, the
   worker's exact work), model alone (`encode` of those preprocessed rows), pipelined (`encode(num_workers=1,
   prefetch=2)` from the files) and sequential (`encode(num_workers=0)`). Criterion: pipelined <= 1.2 x
   max(preprocessing, model). Batches of 2 rows (`--batch-size`): with a single batch nothing could overlap. Forward
   hooks split each encode into time inside `VirtueModel.forward` and the wait for the first batch (its
   preprocessing, which nothing can hide); a run where other processes left no core for the worker says so.
2. scar -- SCaR-like: `--photos` photos (CPU 4, GPU 16) squashed to 1344x1344 as the official evaluation does, k
   box prompts per photo (`--k`, default 1 3) with the official SCaR query text, 10 distinct candidate captions per
   query. "ours" = encode(queries, reuse_image_features=True, num_workers=1) + encode(candidates); "per-row" =
   encode(queries, reuse_image_features=False, num_workers=0) + encode(candidates, num_workers=0).
3. mmeb -- MMEB-like: `--queries` (CPU 16, GPU 256) image + instruction queries, one photo each at its own size
   (the 27 mini-SCaR photos, then mirrored/cropped copies of them, so that no two queries share an image and feature
   reuse plays no part) against `--candidates` (1,000) distinct candidate texts, encoded once by both paths (the
   official code deduplicates candidates too): the paths differ in prefetching only.
4. memory -- peak memory of one `encode` of the SCaR-like queries (largest k) at `--batch-size` (default 8), ours
   vs per-row. CUDA: `torch.cuda.max_memory_allocated` above what is allocated before the call (the weights).
   CPU: each path in a fresh interpreter, VmHWM above VmRSS after the model is built and warmed up
   (/proc/self/clear_refs; glibc told to hand freed memory back, so RSS follows live buffers).
5. compile (only with `--only compile` or `--compile`) -- `model.compile_towers()` (torch.compile of SAM2's image
   encoder and the Qwen ViT) vs eager on the pipeline workload (preprocessed rows, so only the model runs): time of
   the first compiled call (cold: a fresh inductor cache in the temporary folder) and steady-state seconds per
   batch; a failure is reported with its error.

Figures: queries/s and images/s (distinct photos) count the candidates' encoding time too; "TFLOP exec" is what
the path actually executes (`virtue.model.flops.forward_flops`: the image towers once per row for per-row, once
per distinct image for ours; padding not counted), TFLOP/s = that / wall time; MFU = TFLOP/s / peak, the peak
being, on CUDA, the nominal dense figure for the card and dtype (table below; fp32 = non-tensor-core, as TF32 is
off), on the CPU the best of a few measured 2048x2048 matmuls in the model's dtype at the same thread count. The
LLM's, ViT's and SAM2 image encoder's own times come from forward hooks (CUDA events: nothing is synchronised), so
the LLM's MFU is its FLOPs over its own time. Every figure names the device; "other load" is the cores other
processes used meanwhile (/proc/stat minus this process and its children), to recognise disturbed runs.

    python benchmarks/throughput.py                                   # CPU, mid preset: ~3 min on 2 cores
    python benchmarks/throughput.py --repeats 1 --photos 2            # a quick check
    python benchmarks/throughput.py --only compile                    # compile vs eager: ~2 min (1 thread)
    python benchmarks/throughput.py --device cuda --preset 2b --dtype bfloat16          # GPU: 2B dims
    python benchmarks/throughput.py --device cuda --preset 7b --dtype bfloat16 --only memory --batch-size 16

Presets (`--preset`): mid (CPU default: a quarter of 2B's width, see `virtue.model.presets.mid_config`), tiny, 2b
and 7b (the real dimensions). Timings of a shared machine are noisy: compare the ratios of one run, not runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import functools
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_common import OtherLoad, print_table
from PIL import Image

from virtue import VirtueModel, mmeb_query_text, scar_query_text
from virtue.inputs import EmbedInput, parse_input
from virtue.model.flops import Flops, forward_flops
from virtue.processing.qwen import smart_resize

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PHOTOS = SHARED / "data/mini-scar/images"
TOKENIZER = SHARED / "fixtures/virtue-official-tiny/checkpoint"
MiB = 1024 * 1024
SCAR_RESIZE = (1344, 1344)
CANDIDATES_PER_QUERY = 10
PIPELINE_TARGET = 1.2
SCAR_GPU_TARGET = 2.5
# glibc: blocks from 64 KiB up are mmap-ed (unmapped when freed), free heap above 1 MiB is trimmed, so that RSS
# follows the live buffers instead of what malloc keeps from earlier calls.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}
# Nominal dense peaks (TFLOP/s) by device name: (substrings of the upper-cased name, label, bf16/fp16 tensor core,
# fp32 without tensor cores). First match wins.
NOMINAL_PEAKS: tuple[tuple[tuple[str, ...], str, float, float], ...] = (
    (("H200",), "H200", 989.0, 67.0),
    (("H100", "PCIE"), "H100 PCIe", 756.0, 51.0),
    (("H100", "NVL"), "H100 NVL", 835.0, 60.0),
    (("H100",), "H100 SXM", 989.0, 67.0),
    (("A100",), "A100", 312.0, 19.5),
)
PIPELINE_INSTRUCTION = "Describe the object in the box."
MMEB_INSTRUCTIONS = (
    "Represent the given image for classification",
    "Find a caption for the given image",
    "Represent the given image with the following question: What is the main object?",
)
ADJECTIVES = ("red", "small", "wooden", "striped", "old", "shiny", "tall", "broken", "white", "furry")
NOUNS = ("dog", "chair", "bicycle", "umbrella", "cup", "horse", "laptop", "kite", "bench", "clock")
PLACES = ("on the left", "near the window", "in the street", "on a table", "by the door", "in the grass",
          "under a tree", "at the back", "in the foreground", "next to a car")
ACTIONS = ("resting", "standing", "partly hidden", "seen from above", "in the shade")


# ---------------------------------------------------------------------------------------------------------------
# Environment, devices, peaks


def cpu_model_name() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"{cpu_model_name()}, {n} torch thread{'s' if n != 1 else ''}"


def git_state() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "git: unknown"
    return f"git {head}{' (tracked files modified)' if dirty else ''}"


def environment(args: argparse.Namespace, device: torch.device) -> str:
    import transformers

    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"device: {device_label(device)}; python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, torch threads {torch.get_num_threads()} (interop "
            f"{torch.get_num_interop_threads()}), CPUs {os.cpu_count()} (usable {len(os.sched_getaffinity(0))}), "
            f"load average {load}; {git_state()}\npreset {args.preset}, dtype {args.dtype}")


def preset_summary(model: VirtueModel) -> str:
    b = model.config.backbone
    t, v = b["text_config"], b["vision_config"]
    ip = model.config.image_processing
    params = sum(p.numel() for p in model.parameters()) / 1e6
    sam = (f"SAM2 {model.config.sam.image_size}² input, {model.config.sam.num_tokens} segmentation tokens"
           if model.sam is not None else "no SAM branch")
    most = ip.max_pixels // ip.factor**2
    return (f"model: {params:.1f} M parameters; LLM {t['hidden_size']} wide, {t['num_hidden_layers']} layers; ViT "
            f"{v['embed_dim']} wide, {v['depth']} blocks, at most {most} visual tokens per image; {sam}")


@dataclass
class Peak:
    tflops: float | None
    note: str


def nominal_peak(name: str, dtype: torch.dtype) -> Peak:
    """The table's dense peak for a CUDA device name, or an unknown peak."""
    for keys, label, bf16, fp32 in NOMINAL_PEAKS:
        if all(k in name.upper() for k in keys):
            if dtype in (torch.bfloat16, torch.float16):
                return Peak(bf16, f"nominal dense bf16 peak of {label}: {bf16:g} TFLOP/s (for {name})")
            return Peak(fp32, f"nominal fp32 (no tensor cores, TF32 off) peak of {label}: {fp32:g} TFLOP/s "
                              f"(for {name})")
    return Peak(None, f"peak unknown for {name}: MFU not computed")


def peak_flops(device: torch.device, dtype: torch.dtype) -> Peak:
    if device.type == "cuda":
        return nominal_peak(torch.cuda.get_device_name(device), dtype)
    return measured_cpu_peak(dtype, torch.get_num_threads())


@functools.lru_cache(maxsize=4)
def measured_cpu_peak(dtype: torch.dtype, threads: int, n: int = 2048, runs: int = 4) -> Peak:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    tflops = 2 * n**3 / best / 1e12
    return Peak(tflops, f"measured CPU peak: best of {runs} {str(dtype).removeprefix('torch.')} {n}x{n} matmuls "
                        f"at {threads} thread(s): {tflops * 1e3:.1f} GFLOP/s")


# ---------------------------------------------------------------------------------------------------------------
# Timing helpers


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


class TowerTimer:
    """Forward time of the LLM, the Qwen ViT and SAM2's image encoder, from forward hooks: CUDA events on a GPU
    (read after the run, nothing synchronised in between), the wall clock on the CPU."""

    def __init__(self, model: VirtueModel):
        self.modules: dict[str, torch.nn.Module] = {"llm": model.qwen.language_model, "vit": model.qwen.visual}
        if model.sam is not None:
            self.modules["sam_image"] = model.sam.model.vision_encoder
        self.cuda = model.device.type == "cuda"
        self._open: dict[str, Any] = {}
        self._spans: dict[str, list[tuple[Any, Any]]] = {name: [] for name in self.modules}
        self._handles: list[Any] = []

    def __enter__(self) -> TowerTimer:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(functools.partial(self._start, name)))
            self._handles.append(module.register_forward_hook(functools.partial(self._stop, name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def _start(self, name: str, module: torch.nn.Module, inputs: Any) -> None:
        self._open[name] = self._now()

    def _stop(self, name: str, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self._spans[name].append((self._open.pop(name), self._now()))

    def reset(self) -> None:
        for spans in self._spans.values():
            spans.clear()

    def seconds(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
            return {n: sum(a.elapsed_time(b) for a, b in s) / 1e3 for n, s in self._spans.items()}
        return {n: sum(b - a for a, b in s) for n, s in self._spans.items()}


class ForwardClock:
    """Wall time inside `VirtueModel.forward` (one call per batch) and before the first call of an `encode`: what
    is left of an encode's time is preprocessing the model waited for (and, on CUDA, copies and synchronisation;
    there the forward's own time is mostly kernel launches)."""

    def __init__(self, model: VirtueModel):
        self.model = model
        self.inside = 0.0
        self.first: float | None = None
        self._origin = self._entered = 0.0
        self._handles: list[Any] = []

    def __enter__(self) -> ForwardClock:
        self._handles = [self.model.register_forward_pre_hook(self._pre), self.model.register_forward_hook(self._post)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def start(self) -> None:
        self.inside, self.first, self._origin = 0.0, None, time.perf_counter()

    def _pre(self, module: torch.nn.Module, inputs: Any) -> None:
        self._entered = time.perf_counter()
        if self.first is None:
            self.first = self._entered - self._origin

    def _post(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        self.inside += time.perf_counter() - self._entered


def rotated(seq: Sequence[Any], r: int) -> list[Any]:
    """The r-th rotation: alternating repeats start with a different configuration each time."""
    r %= len(seq)
    return list(seq[r:]) + list(seq[:r])


def fmt_flops(x: float) -> str:
    return f"{x:.3g}"


def fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


# ---------------------------------------------------------------------------------------------------------------
# Model and workloads


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> VirtueModel:
    """Random weights, built directly on `device` in `dtype` (a 7B model is never materialised in float32)."""
    from transformers import AutoTokenizer

    from virtue.config import quiet_transformers
    from virtue.model.presets import PRESETS

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(str(TOKENIZER))
        config = PRESETS[preset]()
        torch.manual_seed(seed)
        before = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with device:
                model = VirtueModel(config, tokenizer)
        finally:
            torch.set_default_dtype(before)
    return model.to(device=device, dtype=dtype).eval()


def source_photos() -> list[Path]:
    photos = sorted(PHOTOS.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no photos found in {PHOTOS}")
    return photos


def distinct_photos(n: int, tmp: Path, scale: int = 1) -> list[Path]:
    """n photos with distinct content: the mini-SCaR photos themselves (scale 1), else derived JPEGs in `tmp`
    (upscaled `scale` x bicubic, quality 92; mirrored copies once the photos run out)."""
    src = source_photos()
    out = []
    for i in range(n):
        path, variant = src[i % len(src)], i // len(src)
        if scale == 1 and variant == 0:
            out.append(path)
            continue
        with Image.open(path) as opened:
            img = opened.convert("RGB")
        if variant % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if variant > 1:
            img = img.crop((variant, variant, img.width, img.height))
        if scale != 1:
            img = img.resize((img.width * scale, img.height * scale), Image.Resampling.BICUBIC)
        dest = tmp / f"{path.stem}-x{scale}-v{variant}.jpg"
        img.save(dest, quality=92)
        out.append(dest)
    return out


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def box_in(size: tuple[int, int], j: int, k: int) -> list[int]:
    """The j-th of k distinct boxes inside a w x h photo (XYXY pixels)."""
    w, h = size
    x0, y0 = int(w * (0.05 + 0.4 * j / k)), int(h * (0.08 + 0.3 * j / k))
    return [x0, y0, min(w - 1, x0 + int(w * (0.3 + 0.1 * j / k))), min(h - 1, y0 + int(h * 0.45))]


def caption(i: int) -> str:
    """The i-th of 5,000 distinct short captions."""
    i, a = divmod(i, len(ADJECTIVES))
    i, n = divmod(i, len(NOUNS))
    i, p = divmod(i, len(PLACES))
    act = ACTIONS[i % len(ACTIONS)]
    return f"A {ADJECTIVES[a]} {NOUNS[n]} {act} {PLACES[p]}."


def scar_workload(photos: Sequence[Path], k: int) -> tuple[list[dict], list[str]]:
    queries, candidates = [], []
    for path in photos:
        size = image_size(path)
        for j in range(k):
            box = box_in(size, j, k)
            queries.append({"image": path, "text": scar_query_text(box), "box": box})
    for q in range(len(queries)):
        candidates += [caption(q * CANDIDATES_PER_QUERY + c) for c in range(CANDIDATES_PER_QUERY)]
    return queries, candidates


def mmeb_workload(photos: Sequence[Path], num_queries: int, num_candidates: int) -> tuple[list[dict], list[str]]:
    queries = [{"image": photos[i % len(photos)], "text": mmeb_query_text(MMEB_INSTRUCTIONS[i % 3])}
                for i in range(num_queries)]
    return queries, [caption(i) for i in range(num_candidates)]


def pipeline_items(photos: Sequence[Path]) -> list[EmbedInput]:
    rows = []
    for i, path in enumerate(photos):
        rows.append(parse_input({"image": path, "text": PIPELINE_INSTRUCTION, "box": box_in(image_size(path), 0, 1)},
                                i))
    return rows


def workload_flops(model: VirtueModel, queries: Sequence[dict], candidates: Sequence[str],
                   resize: tuple[int, int] | None, per_row: bool) -> Flops:
    """FLOPs executed: the image towers once per query row (per-row) or once per distinct image (ours)."""
    proc, ip = model.processor, model.config.image_processing
    grids: dict[Any, tuple[int, int, int]] = {}
    images, image_rows = [], []
    for i, q in enumerate(queries):
        item = parse_input(q, i)
        size = image_size(Path(item.image))
        h, w = smart_resize((resize or size)[1], (resize or size)[0], ip)
        grid = (1, h // ip.patch_size, w // ip.patch_size)
        visual = grid[1] * grid[2] // ip.merge_size**2
        text = len(proc.image_row_ids(proc.text(item, f"input {i}"), visual))
        sparse = 0
        if model.sam is not None:  # the prompt's points + SAM's padding point (a box: 3)
            sparse = len(proc.sam_prompt(item, size, model.sam.mask_input_size).labels) + 1
        image_rows.append((text, sparse))
        if per_row:
            images.append(grid)
        else:
            grids.setdefault(item.image_identity(), grid)
    images += list(grids.values())
    text_rows = [len(proc.token_ids(proc.text(parse_input(c, i), f"input {i}"))) for i, c in enumerate(candidates)]
    return forward_flops(model.config, images=images, image_rows=image_rows, text_rows=text_rows)


# ---------------------------------------------------------------------------------------------------------------
# Context shared by the sections


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    tmp: Path
    _model: VirtueModel | None = None
    _peak: Peak | None = None

    @property
    def model(self) -> VirtueModel:
        if self._model is None:
            start = time.perf_counter()
            self._model = build_model(self.args.preset, self.device, self.dtype)
            print(f"built preset {self.args.preset} ({self.args.dtype}) on {self.device} in "
                  f"{time.perf_counter() - start:.1f} s; {preset_summary(self._model)}", flush=True)
        return self._model

    @property
    def peak(self) -> Peak:
        if self._peak is None:
            self._peak = peak_flops(self.device, self.dtype)
        return self._peak

    @property
    def label(self) -> str:
        return device_label(self.device)

    def batch_size(self, default: int) -> int:
        return self.args.batch_size or default


def path_options(ours: bool) -> dict[str, Any]:
    if ours:
        return {"reuse_image_features": True, "num_workers": 1, "prefetch": 2}
    return {"reuse_image_features": False, "num_workers": 0}


# ---------------------------------------------------------------------------------------------------------------
# 1. pipeline


def section_pipeline(ctx: Context) -> None:
    args, model = ctx.args, ctx.model
    n = args.photos or 16
    bs = ctx.batch_size(2)
    start = time.perf_counter()
    photos = distinct_photos(n, ctx.tmp, scale=6)
    sizes = sorted({f"{w}x{h}" for w, h in map(image_size, photos)})
    kib = statistics.median(p.stat().st_size for p in photos) / 1024
    print(f"\n== pipeline [{ctx.label}]: {n} phone-sized JPEGs (mini-SCaR upscaled 6x, quality 92, median {kib:.0f} "
          f"KiB; {', '.join(sizes[:4])}{' ...' if len(sizes) > 4 else ''}; written in "
          f"{time.perf_counter() - start:.1f} s), one box + instruction each, batch size {bs}, torch threads "
          f"{torch.get_num_threads()}{'' if torch.get_num_threads() == 1 else ' (the criterion is defined at 1)'}, "
          f"{args.repeats} alternating repeat(s), medians")
    items = pipeline_items(photos)
    proc = model.processor

    def preprocess() -> list[EmbedInput]:
        return [proc.preprocess(item, f"input {i}", None) for i, item in enumerate(items)]

    prepared = preprocess()  # warm-up (and the page cache) + the rows "model alone" encodes
    common = {"batch_size": bs, "show_progress_bar": False}
    model.encode(prepared[:bs], num_workers=0, **common)
    model.encode(items[:bs], num_workers=1, prefetch=2, **common)
    configs: dict[str, Callable[[], Any]] = {
        "preprocessing alone": preprocess,
        "model alone": lambda: model.encode(prepared, num_workers=0, **common),
        "pipelined (1 worker, prefetch 2)": lambda: model.encode(items, num_workers=1, prefetch=2, **common),
        "sequential (0 workers)": lambda: model.encode(items, num_workers=0, **common),
    }
    times: dict[str, list[float]] = {name: [] for name in configs}
    loads: dict[str, list[float]] = {name: [] for name in configs}
    inside: dict[str, list[float]] = {name: [] for name in configs}
    first: dict[str, list[float]] = {name: [] for name in configs}
    with ForwardClock(model) as clock:
        for r in range(args.repeats):
            for name in rotated(list(configs), r):
                clock.start()
                with OtherLoad() as other:
                    times[name].append(timed(configs[name], ctx.device))
                loads[name].append(other.cores)
                inside[name].append(clock.inside)
                first[name].append(clock.first or 0.0)
            print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k.split(' (')[0]} {v[-1]:.2f} s"
                                                                  for k, v in times.items()), flush=True)
    med = {name: statistics.median(v) for name, v in times.items()}
    prep, alone = med["preprocessing alone"], med["model alone"]
    bound = max(prep, alone)
    rows = []
    for name, t in med.items():
        encodes = name != "preprocessing alone"
        rows.append([name, f"{t:.3f}", f"{n / t:.2f}", f"{t / bound:.2f}",
                     f"{statistics.median(inside[name]):.3f}" if encodes else "",
                     f"{statistics.median(first[name]):.3f}" if encodes else "",
                     f"{statistics.median(loads[name]):.2f}"])
    rows.append(["preprocessing + model (no overlap)", f"{prep + alone:.3f}", f"{n / (prep + alone):.2f}",
                 f"{(prep + alone) / bound:.2f}", "", "", ""])
    print(f"\nMedians [{ctx.label}]:")
    print_table(["configuration", "seconds", "photos/s", "/ max(prep, model)", "in forward s", "1st batch wait s",
                 "other load (cores)"], rows)
    print("in forward: time inside VirtueModel.forward (all batches); 1st batch wait: from the encode call to the "
          "first forward (the first batch's preprocessing, which nothing can overlap)")
    piped, seq = med["pipelined (1 worker, prefetch 2)"], med["sequential (0 workers)"]
    verdict = "PASS" if piped / bound <= PIPELINE_TARGET else "FAIL"
    # The overlap needs a core for the model's thread(s) and one for the worker.
    free = len(os.sched_getaffinity(0)) - statistics.median(loads["pipelined (1 worker, prefetch 2)"])
    if free < torch.get_num_threads() + 1 - 0.25:
        verdict += (f" -- but other processes left only {free:.1f} free core(s) for the model's "
                    f"{torch.get_num_threads()} thread(s) + 1 worker, so nothing could overlap: rerun on a quieter "
                    "machine to judge the criterion")
    print(f"pipelined / max(preprocessing, model) = {piped:.3f} / {bound:.3f} = {piped / bound:.2f} "
          f"(target <= {PIPELINE_TARGET}): {verdict} [{ctx.label}]")
    print(f"sequential / max(preprocessing, model) = {seq / bound:.2f}; pipelined / sequential = {piped / seq:.2f} "
          f"[{ctx.label}]")


# ---------------------------------------------------------------------------------------------------------------
# 2-3. scar and mmeb: ours vs per-row


@dataclass
class PathResult:
    query_s: list[float] = field(default_factory=list)
    cand_s: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)
    towers: list[dict[str, float]] = field(default_factory=list)

    def med(self, attr: str) -> float:
        return statistics.median(getattr(self, attr))

    @property
    def total(self) -> float:
        return statistics.median(q + c for q, c in zip(self.query_s, self.cand_s, strict=True))

    def tower(self, name: str) -> float:
        return statistics.median(t.get(name, 0.0) for t in self.towers)


def run_path(ctx: Context, timer: TowerTimer, queries: list[dict], candidates: list[str],
             resize: tuple[int, int] | None, ours: bool, result: PathResult) -> None:
    model, bs = ctx.model, ctx.batch_size(8)
    opts = path_options(ours)
    timer.reset()
    with OtherLoad() as other:
        q = timed(lambda: model.encode(queries, batch_size=bs, image_resize=resize, show_progress_bar=False,
                                       **opts), ctx.device)
        c = timed(lambda: model.encode(candidates, batch_size=bs, show_progress_bar=False,
                                       num_workers=opts["num_workers"]), ctx.device)
    result.query_s.append(q)
    result.cand_s.append(c)
    result.other.append(other.cores)
    result.towers.append(timer.seconds())


def compare_paths(ctx: Context, title: str, queries: list[dict], candidates: list[str],
                  resize: tuple[int, int] | None) -> dict[str, PathResult]:
    """Ours vs per-row, alternating; prints the table and returns the raw results."""
    model, args = ctx.model, ctx.args
    photos = {parse_input(q, i).image_identity() for i, q in enumerate(queries)}
    flops = {"ours": workload_flops(model, queries, candidates, resize, per_row=False),
             "per-row": workload_flops(model, queries, candidates, resize, per_row=True)}
    results = {"ours": PathResult(), "per-row": PathResult()}
    with TowerTimer(model) as timer:
        # warm-up: one photo's rows and a few candidates through both paths
        first = [q for q in queries if q["image"] == queries[0]["image"]]
        for ours in (True, False):
            run_path(ctx, timer, first, candidates[:8], resize, ours, PathResult())
        for r in range(args.repeats):
            for name in rotated(["per-row", "ours"], r):
                run_path(ctx, timer, queries, candidates, resize, name == "ours", results[name])
            print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{name} {res.query_s[-1]:.2f} + {res.cand_s[-1]:.2f} s" for name, res in results.items()),
                flush=True)
    peak = ctx.peak.tflops
    rows = []
    for name, res in results.items():
        f, total = flops[name], results[name].total
        achieved = f.total / total / 1e12
        llm_s = res.tower("llm")
        llm_rate = f.llm / llm_s / 1e12 if llm_s > 0 else None
        rows.append([
            name, len(queries), len(candidates), f"{res.med('query_s'):.3f}", f"{res.med('cand_s'):.3f}",
            f"{len(queries) / total:.3g}", f"{len(photos) / total:.3g}", fmt_flops(f.total / 1e12),
            fmt_flops(achieved), fmt_pct(achieved / peak if peak else None),
            f"{llm_s:.3f}", "n/a" if llm_rate is None else fmt_flops(llm_rate),
            fmt_pct(llm_rate / peak if peak and llm_rate else None),
            f"{res.tower('vit'):.3f}", f"{res.tower('sam_image'):.3f}", f"{res.med('other'):.2f}",
        ])
    print(f"\n{title} -- medians over {args.repeats} repeat(s) [{ctx.label}]; {ctx.peak.note}")
    print_table(["path", "queries", "cands", "query s", "cand s", "queries/s", "images/s", "TFLOP exec", "TFLOP/s",
                 "MFU", "LLM s", "LLM TFLOP/s", "LLM MFU", "ViT s", "SAM img s", "other load"], rows)
    print("FLOPs executed (GFLOP): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v / 1e9:.4g}" for k, v in zip(
            ("vit", "sam_image", "sam_prompt", "connector", "llm"), f.as_tuple(), strict=True))
        for name, f in flops.items()))
    print("queries/s, images/s (distinct photos per second) and TFLOP/s: over query + candidate encoding; LLM / ViT "
          "/ SAM img s: the towers' own forward time (hooks); MFU: against the peak above")
    ours, per_row = results["ours"], results["per-row"]
    print(f"ours / per-row [{ctx.label}]: queries/s x{per_row.total / ours.total:.2f} (candidates included), "
          f"query encoding alone x{per_row.med('query_s') / ours.med('query_s'):.2f}")
    return results


def section_scar(ctx: Context) -> None:
    args = ctx.args
    p = args.photos or (16 if ctx.device.type == "cuda" else 4)
    photos = distinct_photos(p, ctx.tmp)
    print(f"\n== scar [{ctx.label}]: {p} photos squashed to {SCAR_RESIZE[0]}x{SCAR_RESIZE[1]}, k box prompts each "
          f"(official SCaR query text), {CANDIDATES_PER_QUERY} candidate captions per query, batch size "
          f"{ctx.batch_size(8)}; ours = reuse + 1 worker + prefetch 2, per-row = no reuse, no worker")
    for k in args.k:
        queries, candidates = scar_workload(photos, k)
        results = compare_paths(ctx, f"SCaR-like, k = {k}", queries, candidates, SCAR_RESIZE)
        speedup = results["per-row"].total / results["ours"].total
        if ctx.device.type == "cuda" and k == 3:
            verdict = "PASS" if speedup >= SCAR_GPU_TARGET else "FAIL"
            print(f"GPU target at k = 3: ours/per-row queries/s >= {SCAR_GPU_TARGET}: {speedup:.2f} {verdict} "
                  f"[{ctx.label}]")


def section_mmeb(ctx: Context) -> None:
    args = ctx.args
    n = args.queries or (256 if ctx.device.type == "cuda" else 16)
    photos = distinct_photos(n, ctx.tmp)
    queries, candidates = mmeb_workload(photos, n, args.candidates)
    derived = max(0, n - len(source_photos()))
    print(f"\n== mmeb [{ctx.label}]: {n} image + instruction queries, a distinct photo each at its own size "
          f"({n - derived} mini-SCaR photos{f', {derived} mirrored/cropped copies' if derived else ''}), against "
          f"{len(candidates)} distinct candidate texts encoded once, batch size {ctx.batch_size(8)}")
    compare_paths(ctx, "MMEB-like", queries, candidates, None)


# ---------------------------------------------------------------------------------------------------------------
# 4. memory


def status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh interpreter: build the model, warm up, then the peak RSS of one encode above the RSS before it.
    Prints one JSON line."""
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    model = build_model(args.preset, device, getattr(torch, args.dtype))
    photos = [Path(p) for p in args.child_photos.split(os.pathsep)]
    queries, _ = scar_workload(photos, max(args.k))
    ours = args.memory_child == "ours"
    opts = path_options(ours)
    model.encode(queries[:1], batch_size=args.batch_size, image_resize=SCAR_RESIZE, show_progress_bar=False, **opts)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS
        f.write("5")
    start = time.perf_counter()
    model.encode(queries, batch_size=args.batch_size, image_resize=SCAR_RESIZE, show_progress_bar=False, **opts)
    elapsed = time.perf_counter() - start
    print(json.dumps({"peak_MiB": (status_kib("VmHWM") - base) / 1024, "base_MiB": base / 1024,
                      "time_s": elapsed}))


def section_memory(ctx: Context) -> None:
    args = ctx.args
    p = args.photos or (16 if ctx.device.type == "cuda" else 4)
    k, bs = max(args.k), ctx.batch_size(8)
    photos = distinct_photos(p, ctx.tmp)
    queries, _ = scar_workload(photos, k)
    where = "CUDA max_memory_allocated above the allocation before the call" if ctx.device.type == "cuda" else \
        "peak RSS (VmHWM) above VmRSS after model build + warm-up, each path in a fresh interpreter"
    print(f"\n== memory [{ctx.label}]: one encode of the SCaR-like queries ({p} photos at "
          f"{SCAR_RESIZE[0]}x{SCAR_RESIZE[1]}, k = {k}: {len(queries)} rows), batch size {bs}; {where}")
    rows = []
    if ctx.device.type == "cuda":
        model = ctx.model
        model.encode(queries[:1], batch_size=bs, image_resize=SCAR_RESIZE, show_progress_bar=False)  # warm-up
        for name in ("per-row", "ours"):
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(ctx.device)
            base = torch.cuda.memory_allocated(ctx.device)
            t = timed(lambda name=name: model.encode(queries, batch_size=bs, image_resize=SCAR_RESIZE,
                                                     show_progress_bar=False, **path_options(name == "ours")),
                      ctx.device)
            peak = torch.cuda.max_memory_allocated(ctx.device)
            rows.append([name, f"{(peak - base) / MiB:.0f}", f"{peak / MiB:.0f}", f"{base / MiB:.0f}", f"{t:.2f}"])
        print_table(["path", "peak above weights MiB", "peak total MiB", "before call MiB", "seconds"], rows)
        return
    env = {**os.environ, **MALLOC_ENV}
    for name in ("per-row", "ours"):
        cmd = [sys.executable, __file__, "--memory-child", name, "--child-photos", os.pathsep.join(map(str, photos)),
               "--preset", args.preset, "--dtype", args.dtype, "--threads", str(torch.get_num_threads()),
               "--batch-size", str(bs), "--k", str(k)]
        with OtherLoad() as other:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"memory child ({name}) failed with {done.returncode}:\n{done.stderr[-4000:]}")
        res = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append([name, f"{res['peak_MiB']:.0f}", f"{res['base_MiB']:.0f}", f"{res['time_s']:.2f}",
                     f"{other.cores:.2f}"])
    print_table(["path", "peak RSS above base MiB", "base RSS MiB", "seconds", "other load"], rows)


# ---------------------------------------------------------------------------------------------------------------
# 5. compile


def section_compile(ctx: Context) -> None:
    args, eager = ctx.args, ctx.model
    n, bs = args.photos or 8, ctx.batch_size(2)
    photos = distinct_photos(n, ctx.tmp, scale=4)
    prepared = [eager.processor.preprocess(item, f"input {i}", None) for i, item in enumerate(pipeline_items(photos))]
    batches = -(-n // bs)
    print(f"\n== compile [{ctx.label}]: model.compile_towers() (SAM2 image encoder + Qwen ViT, dynamic shapes) vs "
          f"eager on the pipeline workload ({n} preprocessed phone photos, batch size {bs}: {batches} batch(es), "
          f"model only), {args.repeats} alternating repeat(s)")

    def run(model: VirtueModel) -> float:
        return timed(lambda: model.encode(prepared, batch_size=bs, num_workers=0, show_progress_bar=False),
                     ctx.device)

    run(eager)  # warm-up
    # Cold compilation: a fresh inductor cache (the default one in /tmp would make a second run look cheap).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(ctx.tmp / "inductor-cache")
    torch._dynamo.reset()
    compiled = copy.deepcopy(eager)
    compiled.compile_towers()
    try:
        first = run(compiled)
        second = run(compiled)
    except Exception as exc:  # report, whatever inductor raises
        lines = traceback.format_exception_only(type(exc), exc)
        print(f"compilation FAILED on this machine [{ctx.label}]: {''.join(lines).strip()[:3000]}")
        torch._dynamo.reset()
        return
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    models = {"eager": eager, "compiled": compiled}
    for r in range(args.repeats):
        for name in rotated(list(times), r):
            times[name].append(run(models[name]))
    med = {name: statistics.median(v) for name, v in times.items()}
    print(f"first compiled call {first:.1f} s (cold compilation, fresh inductor cache, included: "
          f"{first - med['compiled']:.1f} s more than the compiled steady state), second call {second:.2f} s "
          f"[{ctx.label}]")
    print_table(["towers", "s per call", "s per batch", "vs eager"],
                [[name, f"{t:.3f}", f"{t / batches:.3f}", f"{t / med['eager']:.2f}"] for name, t in med.items()])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------


SECTIONS: dict[str, Callable[[Context], None]] = {
    "pipeline": section_pipeline, "scar": section_scar, "mmeb": section_mmeb, "memory": section_memory,
    "compile": section_compile,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=list(SECTIONS), default=None, help="run one section")
    p.add_argument("--compile", action="store_true", help="also run the compile section")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--preset", choices=["mid", "tiny", "2b", "7b"], default="mid")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: 1 on the CPU, "
                   "torch's default on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="alternating repeats of every timed configuration")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per forward (default: 2 for pipeline and compile, 8 otherwise)")
    p.add_argument("--photos", type=int, default=None,
                   help="photos of pipeline (default 16), compile (8) and of scar/memory (CPU 4, GPU 16)")
    p.add_argument("--queries", type=int, default=None, help="MMEB-like queries (CPU 16, GPU 256)")
    p.add_argument("--candidates", type=int, default=1000, help="MMEB-like shared candidates")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3], help="box prompts per photo (scar; memory uses "
                   "the largest)")
    p.add_argument("--memory-child", choices=["ours", "per-row"], help=argparse.SUPPRESS)
    p.add_argument("--child-photos", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.candidates > 5000:
        p.error("--candidates: at most 5000 distinct captions")
    return args


def run_sections(names: Sequence[str], ctx: Context) -> Iterator[str]:
    for name in names:
        start = time.perf_counter()
        SECTIONS[name](ctx)
        yield f"{name} {time.perf_counter() - start:.0f} s"


def main() -> None:
    args = parse_args()
    if args.memory_child:
        return memory_child(args)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.only:
        names = [args.only]
    else:
        names = ["scar", "mmeb", "memory"] if device.type == "cuda" else ["pipeline", "scar", "mmeb", "memory"]
        if args.compile:
            names.append("compile")
    print(environment(args, device), flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="virtue-throughput-") as tmp:
        ctx = Context(args, device, getattr(torch, args.dtype), Path(tmp))
        if names != ["memory"] or device.type == "cuda":  # the CPU memory section builds its own, in children
            ctx.model  # noqa: B018 (built, and described, before the first section)
        spent = list(run_sections(names, ctx))
    print(f"\ntotal {time.perf_counter() - start:.0f} s ({', '.join(spent)}) [{device_label(device)}]; load average "
          f"now {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
