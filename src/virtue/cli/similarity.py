"""`virtue similarity`: rank candidate texts (or images) against one query image + prompt + text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from virtue.cli.common import add_model_args, add_prompt_args, input_from_args, load_model
from virtue.images import IMAGE_SUFFIXES


def register(sub) -> None:
    p = sub.add_parser("similarity", help="rank candidates against a query (image + prompt + text)")
    add_model_args(p)
    add_prompt_args(p, prefix="query-")
    p.add_argument("--candidates", nargs="+", default=[], help="candidate texts, or image files")
    p.add_argument("--candidates-file", help="one candidate text per line")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def _candidate(value: str):
    path = Path(value)
    return path if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file() else value


def run(args: argparse.Namespace) -> int:
    query = input_from_args(args, prefix="query-")
    candidates = list(args.candidates)
    if args.candidates_file:
        candidates += [line for line in Path(args.candidates_file).read_text().splitlines() if line.strip()]
    if not query or not candidates:
        raise SystemExit("virtue similarity: give a query (--query-image/--query-text) and --candidates")
    model = load_model(args)
    q = model.encode(query)
    c = model.encode([_candidate(x) for x in candidates], batch_size=args.batch_size)
    scores = model.similarity(q, c)[0]
    ranking = sorted(zip(candidates, scores.tolist(), strict=True), key=lambda t: -t[1])
    if args.json:
        print(json.dumps([{"rank": r + 1, "candidate": c, "score": s} for r, (c, s) in enumerate(ranking)]))
    else:
        width = max(len(c) for c in candidates)
        print(f"{'rank':>4}  {'score':>8}  candidate")
        for r, (cand, score) in enumerate(ranking):
            print(f"{r + 1:>4}  {score:8.4f}  {cand:<{width}}")
    return 0
