"""`virtue demo`: serve the interactive search page (Gradio) for a model and a gallery folder / caption list."""

from __future__ import annotations

import argparse
from pathlib import Path

from virtue.cli.common import add_model_args, load_model
from virtue.errors import InputError


def register(sub) -> None:
    p = sub.add_parser("demo", help="web page: prompt a region of a photo, search a gallery or captions")
    add_model_args(p)
    p.add_argument("--gallery", help="folder of images to search (embedded once, cached on disk)")
    p.add_argument("--captions", help="text file, one caption per line, to rank (text mode)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--cache-dir", help="gallery embedding cache, a search index per gallery and model "
                   "(default: $XDG_CACHE_HOME/virtue/demo)")
    p.add_argument("--top-k", type=int, default=8, help="results shown by default")
    p.set_defaults(run=run)


def read_captions(path: str | Path) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--captions: file not found: {file}")
    captions = [line.strip() for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not captions:
        raise InputError(f"--captions: {file} holds no caption")
    return captions


def run(args: argparse.Namespace) -> int:
    if not args.gallery and not args.captions:
        raise SystemExit("virtue demo: give --gallery DIR and/or --captions FILE")
    try:
        import gradio  # noqa: F401  (checked first: loading a model only to fail here wastes minutes)
    except ImportError:
        raise SystemExit("virtue demo needs Gradio: pip install 'virtue[demo]' (or pip install gradio)") from None
    if args.gallery:
        try:
            import lancedb  # noqa: F401  (the gallery's embeddings are kept in a search index)
        except ImportError:
            raise SystemExit("virtue demo --gallery needs LanceDB: pip install 'virtue[demo]' (or pip install "
                             "lancedb)") from None
    from virtue.apps.demo import build_demo

    captions = read_captions(args.captions) if args.captions else None
    model = load_model(args)
    demo = build_demo(
        model, args.gallery, captions=captions, cache_dir=args.cache_dir, batch_size=args.batch_size,
        top_k=args.top_k,
    )
    demo.queue().launch(server_name=args.host, server_port=args.port)
    return 0
