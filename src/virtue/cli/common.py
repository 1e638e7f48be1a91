"""Options shared by the commands that load a model, and the prompt flags of `embed` / `similarity`.

Imports nothing heavy: every command's parser is built for `virtue --help`, so torch and the model are imported
only inside the functions that run a command.
"""

from __future__ import annotations

import argparse
from typing import Any

DTYPES = ("bfloat16", "float16", "float32")


def torch_dtype(name: str) -> Any:
    """The torch dtype of a `--dtype` choice."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory or hub id (e.g. Sony/VIRTUE-2B-SCaR)")
    p.add_argument("--sam-checkpoint", help="SAM2.1 weights for official checkpoints (Meta .pt or HF folder)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bfloat16 on GPU, else float32")
    p.add_argument("--no-hub", action="store_true", help="never download from the hub")
    p.add_argument("--batch-size", type=int, default=8)


def load_model(args: argparse.Namespace):
    import torch

    from virtue.model.embedder import VirtueModel

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch_dtype(args.dtype) if args.dtype else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    return VirtueModel.from_pretrained(
        args.model, sam_checkpoint=args.sam_checkpoint, device=device, dtype=dtype, allow_hub=not args.no_hub
    )


def add_prompt_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    p.add_argument(f"--{prefix}image", help="image file")
    p.add_argument(f"--{prefix}text", help="instruction / text")
    p.add_argument(f"--{prefix}box", type=float, nargs=4, metavar=("X1", "Y1", "X2", "Y2"), help="box, pixels")
    p.add_argument(f"--{prefix}point", type=float, nargs=2, action="append", metavar=("X", "Y"),
                   help="positive point in pixels (repeatable)")
    p.add_argument(f"--{prefix}negative-point", type=float, nargs=2, action="append", metavar=("X", "Y"),
                   help="negative point in pixels (repeatable)")
    p.add_argument(f"--{prefix}mask", help="binary mask image (PNG, same size as the image)")


def input_from_args(args: argparse.Namespace, prefix: str = "") -> dict:
    """The encode() dict the prompt flags describe."""
    get = lambda name: getattr(args, (prefix + name).replace("-", "_"))  # noqa: E731
    item: dict = {}
    if get("image"):
        item["image"] = get("image")
    if get("text") is not None:
        item["text"] = get("text")
    if get("box"):
        item["box"] = get("box")
    positives, negatives = get("point") or [], get("negative_point") or []
    if positives or negatives:
        item["points"] = positives + negatives
        item["labels"] = [1] * len(positives) + [0] * len(negatives)
    if get("mask"):
        item["mask"] = get("mask")
    return item
