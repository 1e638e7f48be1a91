"""`virtue eval`: SCaR / MMEB with the paper's protocol, ties counted against the positive."""

from __future__ import annotations

import argparse

from virtue.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on SCaR or MMEB; writes results.json/.md/.png")
    add_model_args(p)
    p.add_argument("--benchmark", choices=["scar", "mmeb"], default="scar")
    p.add_argument("--data-root", required=True, help="folder with the evaluation parquet files")
    p.add_argument("--image-root", help="folder the image paths are relative to (default: --data-root)")
    p.add_argument("--tasks", nargs="+", help="task names or groups (RefCOCOg, SCaR, Classification, IND, ...)")
    p.add_argument("--limit", type=int, help="first N queries per task, for quick runs")
    p.add_argument("--scar-prompt", choices=["box", "box_mask"], default="box",
                   help="SCaR query prompt: box (the paper's), or box_mask (box + segmentation polygon, for models "
                        "trained with masks: true)")
    p.add_argument("--baselines", nargs="*", default=[],
                   help="text_only no_box crop (same model, parts withheld) random consensus (no model)")
    p.add_argument("--image-resize", type=int, nargs=2, metavar=("W", "H"),
                   help="pre-resize images (default: the model's, 1344 1344 for official checkpoints)")
    p.add_argument("--native-size", action="store_true", help="no pre-resize at all")
    p.add_argument("--paper-model", help="paper row to compare with (default: the released checkpoint's)")
    p.add_argument("--cache-dir", default=".virtue-cache", help="embedding cache ('' to disable)")
    p.add_argument("--out", default="outputs/eval", help="output folder")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from virtue.eval.runner import EvalConfig, run_eval

    resize = "native" if args.native_size else (tuple(args.image_resize) if args.image_resize else None)
    cfg = EvalConfig(
        benchmark=args.benchmark, data_root=args.data_root, image_root=args.image_root,
        tasks=tuple(args.tasks) if args.tasks else None, limit=args.limit, batch_size=args.batch_size,
        image_resize=resize, baselines=tuple(args.baselines), scar_variant=args.scar_prompt,
        cache_dir=args.cache_dir or None, out_dir=args.out,
    )
    report = run_eval(load_model(args), cfg, model_name=args.model, paper_model=args.paper_model)
    for task, metrics in report.tasks.items():
        print(f"{task:>16}  hit@1 {100 * metrics['hit@1']:5.1f}  mrr {metrics['mrr']:.3f}  n={int(metrics['n'])}")
    for key, value in report.aggregates.items():
        if not key.startswith("n_tasks"):
            print(f"{key:>16}  hit@1 {100 * value:5.1f}")
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return 0
