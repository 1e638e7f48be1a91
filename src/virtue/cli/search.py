"""`virtue search --db PATH`: the nearest images / regions to a text, or to an image region."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from virtue.cli.common import add_model_args, add_prompt_args, input_from_args, load_model

if TYPE_CHECKING:
    from virtue.search import SearchHit

KINDS = ("image", "region", "all")


def register(sub) -> None:
    p = sub.add_parser("search", help="search an index built by `virtue index`, by text or by an image region")
    p.add_argument("--db", required=True, help="index folder written by `virtue index`")
    add_model_args(p)
    add_prompt_args(p)  # --image --text --box --point --negative-point --mask
    p.add_argument("--query-text", help="instruction that goes with --image (same as --text with --image)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--kind", choices=KINDS, default="all", help="search image rows, region rows, or both")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=run)


def query_from_args(args: argparse.Namespace) -> str | dict[str, Any]:
    """A plain text query, or an encode() dict for an image (+ prompt, + instruction)."""
    item = input_from_args(args)
    if args.query_text is not None:
        if "text" in item:
            raise SystemExit("virtue search: give --text or --query-text, not both")
        item["text"] = args.query_text
    if not item:
        raise SystemExit("virtue search: give --text, or --image (with --box/--point/--mask/--query-text)")
    return item["text"] if set(item) == {"text"} else item


def run(args: argparse.Namespace) -> int:
    from virtue.search import search

    query = query_from_args(args)
    model = load_model(args)
    hits = search(model, args.db, query, top_k=args.top_k, kind=args.kind)
    if args.json:
        print(json.dumps([hit.to_dict() for hit in hits]))
        return 0
    regions = [_region(hit) for hit in hits]
    width = max([len("region"), *map(len, regions)])
    print(f"{'rank':>4}  {'score':>8}  {'kind':<6}  {'region':<{width}}  path")
    for hit, region in zip(hits, regions, strict=True):
        print(f"{hit.rank:>4}  {hit.score:8.4f}  {hit.kind:<6}  {region:<{width}}  {hit.path}")
    return 0


def _region(hit: SearchHit) -> str:
    """Region id and label ("box1 (dog)"); empty for image rows."""
    if hit.region_id is None:
        return ""
    return hit.region_id + (f" ({hit.label})" if hit.label else "")
