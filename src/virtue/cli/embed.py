"""`virtue embed`: embed one image (+ prompt) and/or text; print JSON or write .npy / .json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from virtue.cli.common import add_model_args, add_prompt_args, input_from_args, load_model


def register(sub) -> None:
    p = sub.add_parser("embed", help="embed an image (+ box/point/mask) and/or text")
    add_model_args(p)
    add_prompt_args(p)
    p.add_argument("--texts-file", help="also embed every line of this file as a text")
    p.add_argument("--output", "-o", help="write the vectors to .npy or .json instead of printing")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    inputs = []
    item = input_from_args(args)
    if item:
        inputs.append(item)
    if args.texts_file:
        inputs += [line for line in Path(args.texts_file).read_text().splitlines() if line.strip()]
    if not inputs:
        raise SystemExit("virtue embed: give --image and/or --text, or --texts-file")
    model = load_model(args)
    vectors = model.encode(inputs, batch_size=args.batch_size)
    if args.output and args.output.endswith(".npy"):
        import numpy as np

        np.save(args.output, vectors)
    else:
        text = json.dumps({"dim": int(vectors.shape[1]), "embeddings": vectors.round(7).tolist()})
        if args.output:
            Path(args.output).write_text(text + "\n")
        else:
            print(text)
    return 0
