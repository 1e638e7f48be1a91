"""`virtue eval`: SCaR / MMEB with the paper's protocol, ties counted against the positive.

Several processes: `torchrun --nproc_per_node N -m virtue.cli.main eval ...` splits every task's unique inputs
over the ranks (each on cuda:LOCAL_RANK when CUDA is used); rank 0 prints and writes the results.
"""

from __future__ import annotations

import argparse
import os

from virtue.cli.common import add_model_args, load_model


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate on SCaR or MMEB; writes results.json/.md/.png")
    add_model_args(p)
    p.add_argument("--benchmark", choices=["scar", "mmeb"], default="scar")
    p.add_argument("--data-root", required=True,
                   help="folder with the evaluation parquet files (MMEB: one <Task>.parquet each, or the "
                        "TIGER-Lab/MMEB-eval hub snapshot with <Task>/test-*.parquet)")
    p.add_argument("--image-root", help="folder the image paths are relative to (default: --data-root; MMEB: "
                                        "<data-root>/eval_images when it exists, where images.zip is extracted)")
    p.add_argument("--tasks", nargs="+", help="task names or groups (RefCOCOg, SCaR, Classification, IND, ...)")
    p.add_argument("--limit", type=int, help="first N queries per task, for quick runs")
    p.add_argument("--scar-prompt", choices=["box", "box_mask"], default="box",
                   help="SCaR query prompt: box (the paper's), or box_mask (box + segmentation polygon, for models "
                        "trained with masks: true)")
    p.add_argument("--strict-boxes", action="store_true",
                   help="a SCaR box crossing its image's border is an error (default: scored as given, as the "
                        "official code does, and listed in results.json)")
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
    main_rank = _rank_device(args)
    cfg = EvalConfig(
        benchmark=args.benchmark, data_root=args.data_root, image_root=args.image_root,
        tasks=tuple(args.tasks) if args.tasks else None, limit=args.limit, batch_size=args.batch_size,
        image_resize=resize, baselines=tuple(args.baselines), scar_variant=args.scar_prompt,
        strict_boxes=args.strict_boxes, cache_dir=args.cache_dir or None, out_dir=args.out,
        show_progress_bar=main_rank,
    )
    report = run_eval(load_model(args), cfg, model_name=args.model, paper_model=args.paper_model)
    if not main_rank:
        return 0
    for task, metrics in report.tasks.items():
        print(f"{task:>16}  hit@1 {100 * metrics['hit@1']:5.1f}  mrr {metrics['mrr']:.3f}  n={int(metrics['n'])}")
    for key, value in report.aggregates.items():
        if not key.startswith("n_tasks"):
            print(f"{key:>16}  hit@1 {100 * value:5.1f}")
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return 0


def _rank_device(args: argparse.Namespace) -> bool:
    """Under torchrun, put each rank's model on its own GPU (cuda:LOCAL_RANK) unless a device index was given;
    return whether this is rank 0 (the one that prints)."""
    from virtue.eval.distributed import local_device, world_size

    if world_size() > 1 and args.device in (None, "cuda"):
        device = local_device()
        if device.type == "cuda":
            args.device = str(device)
    return int(os.environ.get("RANK", "0")) == 0
