"""`virtue convert SRC DST`: official released layout -> library layout (safetensors, SAM2 included)."""

from __future__ import annotations

import argparse


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert an official checkpoint to the library layout")
    p.add_argument("src", help="official checkpoint directory or hub id")
    p.add_argument("dst", help="new output directory")
    p.add_argument("--sam-checkpoint", help="SAM2.1 weights (Meta .pt or transformers folder)")
    p.add_argument("--no-hub", action="store_true", help="never download from the hub")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtue.model.convert import convert_checkpoint

    dst = convert_checkpoint(args.src, args.dst, sam_checkpoint=args.sam_checkpoint, allow_hub=not args.no_hub)
    print(f"wrote {dst}")
    return 0
