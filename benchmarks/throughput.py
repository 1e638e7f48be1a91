"""Embedding throughput, three paths side by side in one run, on models with random weights built from a preset
(nothing downloaded):

* **ours**: `VirtueModel.encode` as users call it (image features reused across the prompts of a photo, images
  preprocessed ahead of the model by a worker thread, batches planned by size).
* **encode, reuse+prefetch off**: the same `encode` with `reuse_image_features=False, num_workers=0`: this
  package's batching, size ordering and checks, every row computing its own image features, images read in turn.
  It isolates what those two switches buy; it is not the official pipeline.
* **official-like**: what the official implementation does for SCaR queries (`official_pipeline.py`, written from
  the spec: per row the 1344² squash, the ViT and SAM2's image encoder for every row, SAM's input made on the CPU,
  batches of 16 in input order, the LLM with the cache and all hidden states kept and the LM-head logits over the
  vocabulary computed at every position). Its vectors equal `encode`'s (checked in the smoke test).
  `--official-without-head` adds it once more without the LM head ("official-like, LM head skipped"): at a reduced
  width with the full vocabulary (the mid preset) the head's share of the work is far above a real model's.

Sections (`--only NAME` runs one; by default the CPU run does pipeline, scar, mmeb and memory, the GPU run scar,
mmeb and memory):

1. pipeline -- the CPU criterion: torch pinned to `--threads` (default 1) intra-op thread, 1 preprocessing worker,
   `--photos` (default 16) phone-sized JPEGs (the mini-SCaR photos upscaled 6x), one box prompt each. Times,
   alternating over `--repeats` (medians): preprocessing alone, model alone, pipelined (`num_workers=1,
   prefetch=2`) and sequential (`num_workers=0`). Criterion: pipelined <= 1.2 x max(preprocessing, model).
2. scar -- SCaR-like: `--photos` photos (CPU 4, GPU 16) squashed to 1344x1344, k box prompts per photo (`--k`,
   default 1 3) with the official SCaR query text, 10 distinct candidate captions per query; the three paths.
3. mmeb -- MMEB-like: `--queries` (CPU 16, GPU 256) image + instruction queries, a distinct photo each at its own
   size, against `--candidates` (1,000) distinct candidate texts, encoded once by every path.
4. memory -- peak memory of one `encode` of the SCaR-like queries (largest k), each path. CUDA:
   `max_memory_allocated` above what is allocated before the call; CPU: each path in a fresh interpreter, VmHWM
   above VmRSS after the model is built and warmed up.
5. compile (only with `--only compile` or `--compile`) -- `model.compile_towers()` vs eager.

Hygiene: every path is warmed up before any timing; the paths' order rotates with every repeat; the matmul peak
is measured before the first section and after the last (both reported, MFU uses the higher; on CUDA the datasheet
figure is quoted beside it); every figure is printed with the load average at that moment and recorded in
`--json`. Figures: queries/s count the candidates' encoding too; "TFLOP exec" is what a path actually executes
(`virtue.model.flops.forward_flops`: the towers once per row for the per-row paths, once per distinct image for
ours, the LM head for official-like; padding not counted); the LLM's and ViT's MFU are their FLOPs over their
own forward time (hooks).

    python benchmarks/throughput.py                                   # CPU, mid preset: ~6 min on 2 cores
    python benchmarks/throughput.py --preset tiny --repeats 1 --photos 1 --k 1 --queries 2 --candidates 4
    python benchmarks/throughput.py --device cuda --preset 2b --dtype bfloat16          # GPU: 2B dims
    python benchmarks/throughput.py --device cuda --preset 7b --dtype bfloat16 --only memory --batch-size 16

Timings of a shared machine are noisy: compare the ratios of one run, not runs.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    Figures,
    OtherLoad,
    PeakMeter,
    build_model,
    device_label,
    environment,
    load_average,
    print_table,
    rotated,
    timed,
)
from official_pipeline import OFFICIAL_BATCH_SIZE, encode_like_official
from workloads import (
    SCAR_RESIZE,
    distinct_photos,
    image_size,
    mmeb_workload,
    pipeline_items,
    scar_workload,
    source_photos,
    workload_flops,
)

from virtue.inputs import EmbedInput, parse_input
from virtue.model.embedder import VirtueModel
from virtue.model.flops import Flops

MiB = 1024 * 1024
PIPELINE_TARGET = 1.2
# glibc: blocks from 64 KiB up are mmap-ed (unmapped when freed), free heap above 1 MiB is trimmed, so that RSS
# follows the live buffers instead of what malloc keeps from earlier calls.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1024 * 1024)}
OURS, NO_REUSE, OFFICIAL = "ours", "encode, reuse+prefetch off", "official-like"
OFFICIAL_NO_HEAD = "official-like, LM head skipped"  # with --official-without-head
PATHS = (OFFICIAL, NO_REUSE, OURS)  # the order of the first repeat; it rotates


# ---------------------------------------------------------------------------------------------------------------
# Context shared by the sections


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    tmp: Path
    figures: Figures = field(default_factory=Figures)
    flop_rates: list[tuple[str, str, float, float, float]] = field(default_factory=list)  # for the MFU table
    _model: VirtueModel | None = None

    @property
    def model(self) -> VirtueModel:
        if self._model is None:
            start = time.perf_counter()
            self._model = build_model(self.args.preset, self.device, self.dtype)
            print(f"built preset {self.args.preset} ({self.args.dtype}) on {self.device} in "
                  f"{time.perf_counter() - start:.1f} s; {preset_summary(self._model)}", flush=True)
        return self._model

    @property
    def label(self) -> str:
        return device_label(self.device)

    def batch_size(self, default: int) -> int:
        return self.args.batch_size or default

    def add(self, section: str, name: str, value: float, unit: str, baseline: str | None = None) -> None:
        self.figures.add(section, name, value, unit, baseline=baseline, device=self.label)


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
    is left of an encode's time is preprocessing the model waited for."""

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


# ---------------------------------------------------------------------------------------------------------------
# The three paths


def query_call(name: str, model: VirtueModel, batch_size: int, official_batch_size: int) -> Callable[..., Any]:
    """`call(inputs, resize)` embedding queries the way path `name` does."""
    if name in (OFFICIAL, OFFICIAL_NO_HEAD):
        head = name == OFFICIAL
        return lambda inputs, resize: encode_like_official(model, inputs, batch_size=official_batch_size,
                                                           image_resize=resize, lm_head=head)
    options = path_options(name == OURS)
    return lambda inputs, resize: model.encode(inputs, batch_size=batch_size, image_resize=resize,
                                               show_progress_bar=False, **options)


def path_options(ours: bool) -> dict[str, Any]:
    if ours:
        return {"reuse_image_features": True, "num_workers": 1, "prefetch": 2}
    return {"reuse_image_features": False, "num_workers": 0}


def path_flops(name: str, model: VirtueModel, queries: Sequence[dict], candidates: Sequence[str],
               resize: tuple[int, int] | None) -> Flops:
    return workload_flops(model, queries, candidates, resize, per_row=name != OURS, lm_head=name == OFFICIAL)


def compared_paths(args: argparse.Namespace) -> tuple[str, ...]:
    return (OFFICIAL_NO_HEAD, *PATHS) if args.official_without_head else PATHS


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


def run_path(ctx: Context, timer: TowerTimer, name: str, queries: list[dict], candidates: list[str],
             resize: tuple[int, int] | None, result: PathResult) -> None:
    call = query_call(name, ctx.model, ctx.batch_size(8), ctx.args.official_batch_size)
    timer.reset()
    with OtherLoad() as other:
        q = timed(lambda: call(queries, resize), ctx.device)
        c = timed(lambda: call(candidates, None), ctx.device)
    result.query_s.append(q)
    result.cand_s.append(c)
    result.other.append(other.cores)
    result.towers.append(timer.seconds())


def compare_paths(ctx: Context, section: str, title: str, queries: list[dict], candidates: list[str],
                  resize: tuple[int, int] | None) -> dict[str, PathResult]:
    """The three paths, warmed up, then alternating; prints the table, records the figures."""
    model, args = ctx.model, ctx.args
    photos = {parse_input(q, i).image_identity() for i, q in enumerate(queries)}
    paths = compared_paths(args)
    flops = {name: path_flops(name, model, queries, candidates, resize) for name in paths}
    results = {name: PathResult() for name in paths}
    with TowerTimer(model) as timer:
        first = [q for q in queries if q["image"] == queries[0]["image"]]
        for name in paths:  # warm-up of every path: one photo's rows and a few candidates
            run_path(ctx, timer, name, first, candidates[:8], resize, PathResult())
        for r in range(args.repeats):
            for name in rotated(list(paths), r):
                run_path(ctx, timer, name, queries, candidates, resize, results[name])
            print(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
                f"{name} {res.query_s[-1]:.2f} + {res.cand_s[-1]:.2f} s" for name, res in results.items()),
                flush=True)
    rows = []
    for name, res in results.items():
        f, total = flops[name], res.total
        llm_s, vit_s = res.tower("llm"), res.tower("vit")
        ctx.flop_rates.append((title, name, f.total / total / 1e12, f.llm / llm_s / 1e12 if llm_s else 0.0,
                               f.vision / vit_s / 1e12 if vit_s else 0.0))
        rows.append([name, len(queries), len(candidates), f"{res.med('query_s'):.3f}", f"{res.med('cand_s'):.3f}",
                     f"{len(queries) / total:.3g}", f"{len(photos) / total:.3g}", f"{f.total / 1e12:.3g}",
                     f"{f.total / total / 1e12:.3g}", f"{llm_s:.3f}", f"{vit_s:.3f}", f"{res.tower('sam_image'):.3f}",
                     f"{res.med('other'):.2f}"])
        ctx.add(section, f"{title}: {name} queries/s", len(queries) / total, "queries/s")
    load = load_average()
    print(f"\n{title} -- medians over {args.repeats} repeat(s) [{ctx.label}; load average {load}]")
    print_table(["path", "queries", "cands", "query s", "cand s", "queries/s", "images/s", "TFLOP exec", "TFLOP/s",
                 "LLM s", "ViT s", "SAM img s", "other load"], rows)
    print("FLOPs executed (GFLOP): " + "; ".join(
        f"{name}: " + ", ".join(f"{k} {v / 1e9:.4g}" for k, v in zip(
            ("vit", "sam_image", "sam_prompt", "connector", "llm", "lm_head"), f.as_tuple(), strict=True))
        for name, f in flops.items()))
    ours = results[OURS]
    for baseline in (name for name in paths if name != OURS):
        base = results[baseline]
        ratio, query_ratio = base.total / ours.total, base.med("query_s") / ours.med("query_s")
        ctx.add(section, f"{title}: ours vs {baseline}, queries/s", ratio, "x", baseline=baseline)
        ctx.add(section, f"{title}: ours vs {baseline}, query encoding alone", query_ratio, "x", baseline=baseline)
        print(f"ours vs {baseline} [{ctx.label}; load average {load}]: queries/s x{ratio:.2f} (candidates "
              f"included), query encoding alone x{query_ratio:.2f}")
    return results


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
    configs: dict[str, Callable[[], Any]] = {
        "preprocessing alone": preprocess,
        "model alone": lambda: model.encode(prepared, num_workers=0, **common),
        "pipelined (1 worker, prefetch 2)": lambda: model.encode(items, num_workers=1, prefetch=2, **common),
        "sequential (0 workers)": lambda: model.encode(items, num_workers=0, **common),
    }
    for call in configs.values():  # warm-up of every configuration
        call()
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
    print(f"\nMedians [{ctx.label}; load average {load_average()}]:")
    print_table(["configuration", "seconds", "photos/s", "/ max(prep, model)", "in forward s", "1st batch wait s",
                 "other load (cores)"], rows)
    piped, seq = med["pipelined (1 worker, prefetch 2)"], med["sequential (0 workers)"]
    verdict = "PASS" if piped / bound <= PIPELINE_TARGET else "FAIL"
    free = len(os.sched_getaffinity(0)) - statistics.median(loads["pipelined (1 worker, prefetch 2)"])
    if free < torch.get_num_threads() + 1 - 0.25:
        verdict += (f" -- but other processes left only {free:.1f} free core(s) for the model's "
                    f"{torch.get_num_threads()} thread(s) + 1 worker, so nothing could overlap: rerun on a quieter "
                    "machine to judge the criterion")
    baseline = "max(preprocessing alone, model alone)"
    ctx.add("pipeline", "pipelined / max(preprocessing, model)", piped / bound, "x", baseline=baseline)
    ctx.add("pipeline", "sequential / max(preprocessing, model)", seq / bound, "x", baseline=baseline)
    print(f"pipelined / max(preprocessing, model) = {piped:.3f} / {bound:.3f} = {piped / bound:.2f} "
          f"(target <= {PIPELINE_TARGET}): {verdict} [{ctx.label}]")
    print(f"sequential / max(preprocessing, model) = {seq / bound:.2f}; pipelined / sequential = {piped / seq:.2f} "
          f"[{ctx.label}]")


# ---------------------------------------------------------------------------------------------------------------
# 2-3. scar and mmeb


def section_scar(ctx: Context) -> None:
    args = ctx.args
    p = args.photos or (16 if ctx.device.type == "cuda" else 4)
    photos = distinct_photos(p, ctx.tmp)
    print(f"\n== scar [{ctx.label}]: {p} photos squashed to {SCAR_RESIZE[0]}x{SCAR_RESIZE[1]}, k box prompts each "
          f"(official SCaR query text), 10 candidate captions per query; batch size {ctx.batch_size(8)} "
          f"(official-like: {args.official_batch_size}); {OURS} = reuse + 1 worker + prefetch 2")
    for k in args.k:
        queries, candidates = scar_workload(photos, k)
        compare_paths(ctx, "scar", f"SCaR-like, k = {k}", queries, candidates, SCAR_RESIZE)


def section_mmeb(ctx: Context) -> None:
    args = ctx.args
    n = args.queries or (256 if ctx.device.type == "cuda" else 16)
    photos = distinct_photos(n, ctx.tmp)
    queries, candidates = mmeb_workload(photos, n, args.candidates)
    derived = max(0, n - len(source_photos()))
    print(f"\n== mmeb [{ctx.label}]: {n} image + instruction queries, a distinct photo each at its own size "
          f"({n - derived} mini-SCaR photos{f', {derived} mirrored/cropped copies' if derived else ''}), against "
          f"{len(candidates)} distinct candidate texts encoded once, batch size {ctx.batch_size(8)}")
    compare_paths(ctx, "mmeb", "MMEB-like", queries, candidates, None)


# ---------------------------------------------------------------------------------------------------------------
# 4. memory


def status_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(name + ":"))


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh interpreter: build the model, warm up, then the peak RSS of one encode above the RSS before it.
    Prints one JSON line."""
    torch.set_num_threads(args.threads)
    model = build_model(args.preset, torch.device("cpu"), getattr(torch, args.dtype))
    photos = [Path(p) for p in args.child_photos.split(os.pathsep)]
    queries, _ = scar_workload(photos, max(args.k))
    call = query_call(args.memory_child, model, args.batch_size, args.official_batch_size)
    call(queries[:1], SCAR_RESIZE)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # "5": VmHWM := VmRSS
        f.write("5")
    start = time.perf_counter()
    call(queries, SCAR_RESIZE)
    elapsed = time.perf_counter() - start
    print(json.dumps({"peak_MiB": (status_kib("VmHWM") - base) / 1024, "base_MiB": base / 1024,
                      "time_s": elapsed}))


def section_memory(ctx: Context) -> None:
    args = ctx.args
    p = args.photos or (16 if ctx.device.type == "cuda" else 4)
    k, bs = max(args.k), ctx.batch_size(8)
    photos = distinct_photos(p, ctx.tmp)
    queries, _ = scar_workload(photos, k)
    cuda = ctx.device.type == "cuda"
    where = ("CUDA max_memory_allocated above the allocation before the call" if cuda else
             "peak RSS (VmHWM) above VmRSS after model build + warm-up, each path in a fresh interpreter")
    print(f"\n== memory [{ctx.label}]: one encode of the SCaR-like queries ({p} photos at "
          f"{SCAR_RESIZE[0]}x{SCAR_RESIZE[1]}, k = {k}: {len(queries)} rows), batch size {bs} (official-like: "
          f"{args.official_batch_size}); {where}")
    rows = []
    for name in compared_paths(args):
        if cuda:
            peak, base, seconds, other = cuda_peak(ctx, name, queries)
        else:
            peak, base, seconds, other = rss_peak(ctx, name, photos, k, bs)
        ctx.add("memory", f"{name}: peak above the model", peak, "MiB")
        rows.append([name, f"{peak:.0f}", f"{base:.0f}", f"{seconds:.2f}", f"{other:.2f}"])
    print(f"[load average {load_average()}]")
    print_table(["path", "peak above model MiB", "model (base) MiB", "seconds", "other load"], rows)


def cuda_peak(ctx: Context, name: str, queries: list[dict]) -> tuple[float, float, float, float]:
    call = query_call(name, ctx.model, ctx.batch_size(8), ctx.args.official_batch_size)
    call(queries[:1], SCAR_RESIZE)  # warm-up
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    base = torch.cuda.memory_allocated(ctx.device)
    seconds = timed(lambda: call(queries, SCAR_RESIZE), ctx.device)
    return (torch.cuda.max_memory_allocated(ctx.device) - base) / MiB, base / MiB, seconds, 0.0


def rss_peak(ctx: Context, name: str, photos: list[Path], k: int, bs: int) -> tuple[float, float, float, float]:
    args = ctx.args
    cmd = [sys.executable, __file__, "--memory-child", name, "--child-photos", os.pathsep.join(map(str, photos)),
           "--preset", args.preset, "--dtype", args.dtype, "--threads", str(torch.get_num_threads()),
           "--batch-size", str(bs), "--official-batch-size", str(args.official_batch_size), "--k", str(k)]
    with OtherLoad() as other:
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MALLOC_ENV})
    if done.returncode != 0:
        raise RuntimeError(f"memory child ({name}) failed with {done.returncode}:\n{done.stderr[-4000:]}")
    res = json.loads(done.stdout.strip().splitlines()[-1])
    return res["peak_MiB"], res["base_MiB"], res["time_s"], other.cores


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
    ctx.add("compile", "compiled / eager, seconds per batch", med["compiled"] / med["eager"], "x", baseline="eager")
    print(f"first compiled call {first:.1f} s (cold compilation included), second call {second:.2f} s "
          f"[{ctx.label}; load average {load_average()}]")
    print_table(["towers", "s per call", "s per batch", "vs eager"],
                [[name, f"{t:.3f}", f"{t / batches:.3f}", f"{t / med['eager']:.2f}"] for name, t in med.items()])
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------------------


SECTIONS: dict[str, Callable[[Context], None]] = {
    "pipeline": section_pipeline, "scar": section_scar, "mmeb": section_mmeb, "memory": section_memory,
    "compile": section_compile,
}


def print_mfu(ctx: Context, peak: PeakMeter) -> None:
    """MFU of every compared path against the higher of the two measured peaks (and the datasheet's on CUDA)."""
    if not ctx.flop_rates:
        return
    best, sheet = peak.best, peak.datasheet
    rows = []
    for title, name, total, llm, vit in ctx.flop_rates:
        row = [title, name, f"{total:.3g}"]
        for rate in (total, llm, vit):
            row.append("n/a" if not best or not rate else f"{100 * rate / best:.1f}%")
        if sheet:
            row.append(f"{100 * llm / sheet:.1f}%" if llm else "n/a")
        rows.append(row)
        if best:
            for part, rate in (("model", total), ("LLM", llm), ("ViT", vit)):
                if rate:
                    ctx.add("mfu", f"{title}: {name} {part} MFU", 100 * rate / best, "% of measured peak",
                            baseline="measured matmul peak")
    print(f"\nMFU [{ctx.label}; load average {load_average()}]: {peak.note()}")
    header = ["workload", "path", "TFLOP/s", "MFU", "LLM MFU", "ViT MFU"] + (["LLM MFU (datasheet)"] if sheet else [])
    print_table(header, rows)


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
                   help="rows per forward of encode (default: 2 for pipeline and compile, 8 otherwise)")
    p.add_argument("--official-batch-size", type=int, default=OFFICIAL_BATCH_SIZE,
                   help="rows per batch of the official-like path (the official eval's 16)")
    p.add_argument("--photos", type=int, default=None,
                   help="photos of pipeline (default 16), compile (8) and of scar/memory (CPU 4, GPU 16)")
    p.add_argument("--queries", type=int, default=None, help="MMEB-like queries (CPU 16, GPU 256)")
    p.add_argument("--candidates", type=int, default=1000, help="MMEB-like shared candidates")
    p.add_argument("--k", type=int, nargs="+", default=[1, 3], help="box prompts per photo (scar; memory uses "
                   "the largest)")
    p.add_argument("--official-without-head", action="store_true",
                   help="also run the official-like path without its LM head (see the module docstring)")
    p.add_argument("--json", help="also write every figure (with its load average and baseline) to this file")
    p.add_argument("--memory-child", choices=[*PATHS, OFFICIAL_NO_HEAD], help=argparse.SUPPRESS)
    p.add_argument("--child-photos", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads is None and args.device == "cpu":
        args.threads = 1
    if args.candidates > 5000:
        p.error("--candidates: at most 5000 distinct captions")
    return args


def run(args: argparse.Namespace) -> Figures:
    """Every asked section, between the two peak measurements; returns the figures."""
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
    dtype = getattr(torch, args.dtype)
    print(environment(device) + f"\npreset {args.preset}, dtype {args.dtype}", flush=True)
    start = time.perf_counter()
    peak = PeakMeter(device, dtype)
    with tempfile.TemporaryDirectory(prefix="virtue-throughput-") as tmp:
        ctx = Context(args, device, dtype, Path(tmp))
        if names != ["memory"] or device.type == "cuda":  # the CPU memory section builds its own, in children
            ctx.model  # noqa: B018 (built, and described, before the first timing)
        peak.measure_before()
        spent = []
        for name in names:
            began = time.perf_counter()
            SECTIONS[name](ctx)
            spent.append(f"{name} {time.perf_counter() - began:.0f} s")
        peak.measure_after()
    print_mfu(ctx, peak)
    ctx.figures.notes.update({"environment": environment(device), "peak": peak.note(), "preset": args.preset,
                              "dtype": args.dtype})
    print(f"\ntotal {time.perf_counter() - start:.0f} s ({', '.join(spent)}) [{device_label(device)}]; load average "
          f"now {load_average()}")
    return ctx.figures


def main() -> None:
    args = parse_args()
    if args.memory_child:
        return memory_child(args)
    figures = run(args)
    if args.json:
        figures.dump(args.json)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
