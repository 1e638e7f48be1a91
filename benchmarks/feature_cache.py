"""Per-image feature reuse: k prompts on the same images, encoded with and without the cache.

Runs both paths in one process, alternating, and prints time ratios (cached / uncached) and peak
memory above the baseline. The claim: at k = 8 the cached path takes <= 0.4 of the uncached time.

    python benchmarks/feature_cache.py                     # tiny official-layout fixture, CPU
    python benchmarks/feature_cache.py --model DIR --device cuda --dtype bfloat16
    python benchmarks/feature_cache.py --preset tiny --num-images 1 --ks 1 2 --repeats 1   # the smoke test's run

Every figure line ends with the load average at that moment; the paths alternate in every repeat, after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

import torch
from bench_common import FIXTURE, PHOTOS, build_model, load_average, rotated, timed
from PIL import Image

from virtue.model.embedder import VirtueModel

DEFAULT_MODEL = FIXTURE / "checkpoint"
DEFAULT_IMAGES = PHOTOS
QUERY = "Find the caption that best describes the segmented object, considering both local details and global context."


def peak_memory_mib(args: argparse.Namespace, k: int, reuse: bool) -> float:
    """Peak resident memory of one encode call above the loaded model, measured in a fresh process:
    in this one the allocator keeps freed blocks, so whichever path ran first would hide the other."""
    cmd = [sys.executable, __file__, "--child", f"{k}:{int(reuse)}", "--model", args.model, "--images", args.images,
           "--num-images", str(args.num_images), "--batch-size", str(args.batch_size), "--device", args.device,
           "--dtype", args.dtype] + (["--preset", args.preset] if args.preset else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets VmHWM, so model loading does not count as the peak."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(args: argparse.Namespace, model: VirtueModel, images: list[Path]) -> None:
    k, reuse = (int(v) for v in args.child.split(":"))
    inputs = [row for path in images for row in prompts_for(path, k)]
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        base = rss_kib("VmRSS") * 1024
    model.encode(inputs, batch_size=args.batch_size, reuse_image_features=bool(reuse), show_progress_bar=False)
    peak = torch.cuda.max_memory_allocated() if model.device.type == "cuda" else rss_kib("VmHWM") * 1024
    print((peak - base) / 2**20)


def prompts_for(path: Path, k: int) -> list[dict]:
    w, h = Image.open(path).size
    return [
        {"image": path, "text": QUERY, "box": [w * i / (4 * k), h * i / (4 * k), w / 2 + w * i / (2 * k), h - 1]}
        for i in range(k)
    ]


def measure(model: VirtueModel, inputs: list[dict], reuse: bool, batch_size: int) -> float:
    return timed(lambda: model.encode(inputs, batch_size=batch_size, reuse_image_features=reuse,
                                      show_progress_bar=False), model.device)


def load_model(args: argparse.Namespace) -> VirtueModel:
    dtype = getattr(torch, args.dtype)
    if args.preset:
        return build_model(args.preset, torch.device(args.device), dtype)
    return VirtueModel.from_pretrained(args.model, device=args.device, dtype=dtype, allow_hub=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint (default: the official-layout fixture)")
    parser.add_argument("--preset", choices=["tiny", "mid", "2b", "7b"], help="random weights of this architecture "
                        "instead of --model")
    parser.add_argument("--images", default=str(DEFAULT_IMAGES))
    parser.add_argument("--num-images", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    model = load_model(args)
    images = sorted(Path(args.images).glob("*.jpg"))[: args.num_images]
    if args.child:
        return child(args, model, images)
    for reuse in (False, True):  # warm-up of both paths
        measure(model, prompts_for(images[0], 1), reuse, args.batch_size)
    print("time: median of", args.repeats, "alternating runs in this process; memory: peak RSS (CUDA: allocated)"
          " of one encode above the loaded model, each path in a fresh process")
    print(f"model={args.preset or args.model} device={args.device} dtype={args.dtype} "
          f"threads={torch.get_num_threads()} images={len(images)} "
          f"({', '.join('x'.join(map(str, Image.open(p).size)) for p in images)})")
    header = f"{'k':>3} {'rows':>5} {'uncached_s':>11} {'cached_s':>9} {'ratio':>6}"
    print(header + f" {'uncached_MiB':>13} {'cached_MiB':>11}  load average")
    for k in args.ks:
        inputs = [row for path in images for row in prompts_for(path, k)]
        times = {True: [], False: []}
        for r in range(args.repeats):  # alternate, so drift of a noisy machine hits both paths
            for reuse in rotated([False, True], r):
                times[reuse].append(measure(model, inputs, reuse, args.batch_size))
        unc, cac = statistics.median(times[False]), statistics.median(times[True])
        mem_unc, mem_cac = peak_memory_mib(args, k, False), peak_memory_mib(args, k, True)
        print(f"{k:>3} {len(inputs):>5} {unc:>11.3f} {cac:>9.3f} {cac / unc:>6.2f} {mem_unc:>13.1f} "
              f"{mem_cac:>11.1f}  {load_average()}")


if __name__ == "__main__":
    main()
