"""Where the Qwen2-VL vision tower's time goes at real width, and what batching same-size images buys.

The ViT of Qwen2-VL-2B/7B (1280 wide, 16 heads, 32 blocks) is built with random weights at full width and a
reduced depth (`--depth`, default 1 on the CPU; the time per block is what matters). For each workload:

* a per-operator breakdown of one forward (torch.profiler, self CPU time): attention kernels, the linear
  layers, the patch-embedding convolution, the rest (rotary embedding, norms, activations, copies);
* transformers' attention (one call per image, in a Python loop, in every block) vs one batched call for
  images of one size (`virtue.model.vision_attention`, here forced at every size; the library keeps it only for
  images up to `MAX_BATCHED_PATCHES`, where it measured faster), timed alternately in one process, with the
  largest difference between their outputs.

    python benchmarks/vision_tower.py                  # CPU, 1 thread, ~3 minutes
    python benchmarks/vision_tower.py --device cuda --depth 32 --dtype bfloat16 --threads 0
    python benchmarks/vision_tower.py --workloads thumbnails --repeats 1      # one workload (the smoke test's)

Both paths run once before timing (which also checks they agree), then alternate, the order rotating per repeat.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections import defaultdict

import torch
from bench_common import device_label, load_average, rotated, timed

WORKLOADS = {  # name -> grids (t, h, w) in patches of 14 px
    "8 photos at 448²": [(1, 32, 32)] * 8,
    "2 photos at 980² (the official 1344² squash)": [(1, 70, 70)] * 2,
    "64 thumbnails at 56²": [(1, 4, 4)] * 64,
    "mixed: 4 at 448² + 4 at 224²": [(1, 32, 32)] * 4 + [(1, 16, 16)] * 4,
}
SHORT = {"photos": "8 photos at 448²", "squash": "2 photos at 980² (the official 1344² squash)",
         "thumbnails": "64 thumbnails at 56²", "mixed": "mixed: 4 at 448² + 4 at 224²"}
SHORT_OF = {name: short for short, name in SHORT.items()}
CATEGORIES = {
    "attention": ("scaled_dot_product", "flash_attention", "_efficient_attention", "bmm", "softmax"),
    "linear": ("addmm", "aten::mm", "aten::linear", "matmul"),
    "patch conv": ("convolution", "conv3d", "mkldnn_convolution"),
}


def build(depth: int, device: torch.device, dtype: torch.dtype):
    from transformers.models.qwen2_vl.modeling_qwen2_vl import VisionAttention

    from virtue.model import vision_attention
    from virtue.model.backbone import build_qwen
    from virtue.model.presets import real_config

    cfg = real_config("2b", num_layers=1, vision_depth=depth)
    batched = build_qwen(cfg.backbone).visual.to(device, dtype).eval()
    if not isinstance(batched.blocks[0].attn, vision_attention.BatchedVisionAttention):
        raise SystemExit("the installed transformers' VisionAttention is not the one the batched path replaces")
    looped = copy.deepcopy(batched)
    for block in looped.blocks:  # back to transformers' own per-image loop
        block.attn.__class__ = VisionAttention
    vision_attention.MAX_BATCHED_PATCHES = 1 << 30  # measure batching at every size, not only where it is kept
    return looped, batched


def inputs(grids, device, dtype):
    grid = torch.tensor(grids, device=device)
    patches = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    pixels = torch.randn(patches, 1176, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    return pixels, grid


def breakdown(visual, pixels, grid) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if pixels.is_cuda else [])
    with torch.inference_mode(), profile(activities=activities) as prof:
        visual(pixels, grid_thw=grid)
    totals: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        us = event.self_device_time_total if pixels.is_cuda else event.self_cpu_time_total
        category = next((c for c, keys in CATEGORIES.items() if any(k in event.key for k in keys)), "other")
        totals[category] += us / 1e6
    return dict(totals)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--depth", type=int, default=1, help="ViT blocks (full width); 32 is the real depth")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workloads", nargs="+", choices=sorted(SHORT), default=sorted(SHORT),
                   help="which workloads (default: all)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {device_label(device)}, {args.dtype}, threads {torch.get_num_threads()}, "
          f"ViT 1280 wide x {args.depth} block(s) (Qwen2-VL-2B/7B width; the real tower has 32)\n")
    looped, batched = build(args.depth, device, dtype)
    rows = []
    for name, grids in WORKLOADS.items():
        if SHORT_OF[name] not in args.workloads:
            continue
        pixels, grid = inputs(grids, device, dtype)
        with torch.inference_mode():
            a = looped(pixels, grid_thw=grid).pooler_output  # also a warm-up of both paths
            b = batched(pixels, grid_thw=grid).pooler_output
        diff = (a.float() - b.float()).abs().max().item()
        times: dict[str, list[float]] = {"loop": [], "batched": []}
        for r in range(args.repeats):
            for label, visual in rotated([("loop", looped), ("batched", batched)], r):
                with torch.inference_mode():
                    times[label].append(timed(lambda v=visual, x=pixels, g=grid: v(x, grid_thw=g), device))
        parts = breakdown(looped, pixels, grid)
        total = sum(parts.values()) or 1.0
        loop, batch = statistics.median(times["loop"]), statistics.median(times["batched"])
        rows.append((name, loop, batch, diff))
        print(f"{name}: {int((grid[:, 1] * grid[:, 2]).sum())} patches in {len(grids)} image(s)")
        print("  time by kind (transformers' loop): " + ", ".join(
            f"{k} {v / total:.0%}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])))
    print(f"\nmedians of {args.repeats} alternating runs on {device_label(device)}; load average {load_average()}:")
    print(f"{'workload':48} {'loop s':>9} {'batched s':>10} {'batched/loop':>13} {'max |diff|':>11}")
    for name, loop, batch, diff in rows:
        print(f"{name:48} {loop:9.3f} {batch:10.3f} {batch / loop:13.2f} {diff:11.1e}")
    print("(mixed sizes: the batched path falls back to the loop, so its ratio measures noise)")


if __name__ == "__main__":
    main()
