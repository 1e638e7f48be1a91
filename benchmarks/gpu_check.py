"""GPU numerics and throughput (run on a CUDA machine; prints measured numbers).

1. Official-fixture parity on CUDA in float32 (max |delta| per case vs the official CPU embeddings)
   and in bfloat16 (the official eval's precision), with SDPA attention.
2. Throughput of the tiny model: box prompts on several images, float32 vs bfloat16, cache on/off,
   measured side by side in this process.

    VIRTUE_PARITY_FIXTURE=... python benchmarks/gpu_check.py --images DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.checkpoints.test_parity import CASES, case_inputs, expected  # noqa: E402
from tests.conftest import FIXTURE  # noqa: E402
from virtue import VirtueModel  # noqa: E402


def parity(model: VirtueModel) -> dict[str, float]:
    out = {}
    for case in CASES:
        items, resize = case_inputs(case)
        got = model.encode(items, batch_size=case["batch_size"], image_resize=resize, convert_to_numpy=False)
        out[case["name"]] = (got - expected(case)).abs().max().item()
    return out


def throughput(model: VirtueModel, images: list[Path], k: int, reuse: bool, repeats: int = 3) -> float:
    from PIL import Image

    rows = []
    for path in images:
        w, h = Image.open(path).size
        rows += [{"image": path, "text": "Find the object.", "box": [i, i, w / 2 + i, h - 1]} for i in range(k)]
    model.encode(rows[:8], batch_size=8)
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.encode(rows, batch_size=16, reuse_image_features=reuse, show_progress_bar=False)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return len(rows) / best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", required=True)
    args = parser.parse_args()
    import PIL
    import transformers

    print(f"torch {torch.__version__} transformers {transformers.__version__} pillow {PIL.__version__} "
          f"gpu {torch.cuda.get_device_name()} tf32(matmul={torch.backends.cuda.matmul.allow_tf32}, "
          f"cudnn={torch.backends.cudnn.allow_tf32})")
    ckpt = FIXTURE / "checkpoint"
    models = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        models[name] = VirtueModel.from_pretrained(ckpt, device="cuda", dtype=dtype, allow_hub=False)
        res = parity(models[name])
        worst = max(res, key=res.get)
        print(f"parity {name}: max |delta| {res[worst]:.2e} (case {worst}); per case: "
              + " ".join(f"{k}={v:.1e}" for k, v in res.items()))
    torch.backends.cudnn.allow_tf32 = False
    res = parity(models["float32"])
    print(f"parity float32 with cudnn TF32 off: max |delta| {max(res.values()):.2e}")
    torch.backends.cudnn.allow_tf32 = True
    images = sorted(Path(args.images).glob("*.jpg"))[:8]
    for name, model in models.items():
        for k in (1, 8):
            on, off = throughput(model, images, k, True), throughput(model, images, k, False)
            print(f"throughput {name} k={k}: cached {on:.1f} rows/s, uncached {off:.1f} rows/s, ratio {on / off:.2f}")


if __name__ == "__main__":
    main()
