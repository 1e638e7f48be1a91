"""`virtue index DIR --db PATH`: embed every image under DIR (and regions.jsonl) into a LanceDB index."""

from __future__ import annotations

import argparse
import json

from virtue.cli.common import add_model_args, load_model
from virtue.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("index", help="index a folder of images (and regions of them) for `virtue search`")
    p.add_argument("dir", help="folder of images (searched recursively)")
    p.add_argument("--db", required=True, help="index folder (LanceDB); created if missing")
    add_model_args(p)
    p.add_argument("--regions", help="JSON-lines region sidecar (default: DIR/regions.jsonl if present)")
    p.add_argument("--rebuild", action="store_true", help="drop an index built with another model or settings")
    p.add_argument("--image-resize", default="model", metavar="model|native|WxH",
                   help="squash images first: the model's evaluation setting (default), none, or WxH")
    p.add_argument("--ray", metavar="ADDRESS", help="embed as a Ray Data job on this cluster (host:port, auto)")
    p.add_argument("--ray-workers", type=int, default=2, help="actors, one model each (default 2)")
    p.add_argument("--ray-cpus-per-worker", type=float, default=1.0)
    p.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="> 0 runs the workers on CUDA")
    p.add_argument("--ray-model-dir", help="folder every worker can read; the model is saved there if empty")
    p.add_argument("--json", action="store_true", help="print the counts as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def parse_resize(value: str) -> tuple[int, int] | str:
    if value in ("model", "native"):
        return value
    try:
        width, height = (int(v) for v in value.lower().split("x"))
    except ValueError:
        raise InputError(f"--image-resize: expected model, native or WxH (e.g. 1344x1344), got {value!r}") from None
    return (width, height)


def run(args: argparse.Namespace) -> int:
    from virtue.search import RayOptions, index_directory

    resize = parse_resize(args.image_resize)
    options = RayOptions(concurrency=args.ray_workers, num_cpus=args.ray_cpus_per_worker,
                         num_gpus=args.ray_gpus_per_worker, model_dir=args.ray_model_dir)
    model = load_model(args)
    stats = index_directory(model, args.dir, args.db, regions=args.regions, batch_size=args.batch_size,
                            rebuild=args.rebuild, image_resize=resize, ray_address=args.ray,
                            ray_options=options, show_progress_bar=not args.no_progress)
    print(json.dumps(stats.to_dict()) if args.json else f"{args.dir} -> {args.db}: {stats.summary()}")
    return 0
