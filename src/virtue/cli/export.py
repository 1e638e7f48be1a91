"""`virtue export CHECKPOINT DST`: a training run's `checkpoint-N/` (or any loadable model) -> the library layout,
adapters merged, in the dtype asked for."""

from __future__ import annotations

import argparse
from pathlib import Path

from virtue.cli.common import torch_dtype


def register(sub) -> None:
    p = sub.add_parser("export", help="export a training checkpoint (checkpoint-N) as a standalone model")
    p.add_argument("checkpoint", help="e.g. outputs/run/checkpoint-500")
    p.add_argument("dst", help="new output directory (library layout)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="dtype of the exported weights (default float32: every update kept)")
    p.add_argument("--no-hub", action="store_true", help="never download from the hub (base weights)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtue.checkpoints.native import check_new_destination
    from virtue.model.embedder import VirtueModel

    dst = Path(args.dst)
    check_new_destination(dst)
    dtype = torch_dtype(args.dtype)
    model = VirtueModel.from_pretrained(args.checkpoint, dtype=dtype, allow_hub=not args.no_hub)
    model.save_pretrained(dst, dtype=dtype)
    print(f"wrote {dst}")
    return 0
