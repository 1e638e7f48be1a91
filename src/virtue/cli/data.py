"""`virtue data get DATASET DEST` and `virtue data check DATASET DEST`: the published datasets (SCaR-Eval, SCaR-Train,
MMEB-train, MMEB-eval) downloaded in the hub's layout, which `virtue train` and `virtue eval` read as it is, and their
images checked before a long run. The logic is `virtue.apps.data_fetch` and `virtue.apps.data_check`, imported when
the command runs (`virtue data --help` loads neither pyarrow nor tqdm); `check` exits with status 2 when an image is
missing or unreadable."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from virtue.data.layouts import KINDS


def register(sub) -> None:
    p = sub.add_parser("data", help="download the published datasets (SCaR, MMEB) and check their images")
    actions = p.add_subparsers(dest="action", required=True)

    g = actions.add_parser("get", help="download a dataset from the hub in its own layout (resumable)")
    g.add_argument("dataset", choices=KINDS)
    g.add_argument("dest", help="folder to download into (the hub's layout; read by virtue train / eval as it is)")
    g.add_argument("--subsets", nargs="+",
                   help="only these subsets (SCaR: RefCOCOg, RefCOCO_plus, ...; MMEB-train: subset folders, default "
                        "the recipe's 20; MMEB-eval: tasks or groups as eval --tasks)")
    g.add_argument("--no-images", action="store_true", help="skip the image archives (MMEB); say which they are")
    g.add_argument("--no-unpack", action="store_true", help="download the archives, print the unzip commands")
    g.add_argument("--revision", help="a branch, tag or commit of the dataset repository")
    g.add_argument("--repo-id", help="another repository with the same layout (a mirror or fork)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars while unpacking")
    g.set_defaults(run=run_get)

    c = actions.add_parser("check", help="list every image the rows name that is missing or unreadable")
    c.add_argument("dataset", choices=KINDS)
    c.add_argument("dest", help="the dataset's folder, as given to virtue train / eval")
    c.add_argument("--image-root", help="as virtue eval --image-root / a source's image_root (default: the reader's)")
    c.add_argument("--subsets", nargs="+", help="only these subsets or tasks (default: every one found)")
    c.add_argument("--decode", action="store_true", help="decode every image fully (default: read headers)")
    c.add_argument("--hard-negatives", type=int, default=0,
                   help="training sets: also check the first N negatives' images (as hard_negatives: N)")
    c.add_argument("--limit", type=int, help="the first N rows of each subset")
    c.add_argument("--workers", type=int, default=8, help="threads reading images")
    c.add_argument("--max-listed", type=int, help="list at most N problems per subset (default: all)")
    c.add_argument("--report", help="also write the full report as JSON to this file")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(run=run_check)


def run_get(args: argparse.Namespace) -> int:
    from virtue.apps.data_fetch import fetch

    fetch(args.dataset, args.dest, subsets=args.subsets, images=not args.no_images,
          unpack_archives=not args.no_unpack, revision=args.revision, repo_id=args.repo_id,
          progress=not args.no_progress)
    return 0


def run_check(args: argparse.Namespace) -> int:
    from virtue.apps.data_check import check

    report = check(args.dataset, args.dest, image_root=args.image_root, subsets=args.subsets, decode=args.decode,
                   hard_negatives=args.hard_negatives, limit=args.limit, workers=args.workers,
                   progress=not args.no_progress)
    root = report.image_root if report.image_root is not None else "the reader's default"
    how = "images decoded fully" if report.decode else "image headers read"
    print(f"{report.kind} in {report.dest} (image root: {root}; {how})")
    shown = args.max_listed
    for s in report.subsets:
        counts = [f"{s.count(k)} {k}" for k in ("missing", "unreadable") if s.count(k)]
        counts += [f"{s.count('bad path')} bad path(s)"] if s.count("bad path") else []
        status = ", ".join(counts) if counts else "all readable"
        print(f"{s.name}: {s.rows:,} rows, {s.references:,} image references, {s.images:,} images: {status}")
        for folder, n in s.missing_folders.items():
            print(f"  folder not found: {folder} ({n:,} images)")
        for problem in s.problems[:shown]:
            print(f"  {problem}")
        if shown is not None and len(s.problems) > shown:
            print(f"  ... and {len(s.problems) - shown} more")
        for bad in s.dropped_rows[:shown]:
            print(f"  dropped by the reader: {bad}")
    total = {k: sum(s.count(k) for s in report.subsets) for k in ("missing", "unreadable", "bad path")}
    print(f"{len(report.subsets)} subset(s), {sum(s.rows for s in report.subsets):,} rows, "
          f"{sum(s.images for s in report.subsets):,} images: {total['missing']} missing, {total['unreadable']} "
          f"unreadable, {total['bad path']} bad path(s)")
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=1))
        print(f"wrote {args.report}")
    return 0 if report.ok else 2
