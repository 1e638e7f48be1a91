"""`virtue serve`: the HTTP embedding service (POST /embed, POST /search, GET /health, /docs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from virtue.apps.batching import ServeConfig
from virtue.cli.common import add_model_args, load_model
from virtue.errors import ConfigError

# Limit flags -> ServeConfig fields. Their defaults come from ServeConfig, so the two cannot drift.
LIMIT_FLAGS: dict[str, tuple[str, type, str]] = {
    "--max-request-bytes": ("max_request_bytes", int, "largest request body (413 above)"),
    "--max-image-bytes": ("max_image_bytes", int, "largest encoded image or mask (413 above)"),
    "--max-image-pixels": ("max_image_pixels", int, "largest image, width x height (413 above)"),
    "--max-batch-size": ("max_batch_size", int, "most items in one request (413 above)"),
    "--max-text-chars": ("max_text_chars", int, "longest text of one item (413 above)"),
    "--queue-size": ("queue_size", int, "requests that may wait for the model; one more gets 503"),
    "--max-batch-items": ("max_batch_items", int, "items merged from concurrent requests into one encode call"),
    "--max-wait-ms": ("max_wait_ms", float, "how long a request waits for others to share its batch"),
}


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve embeddings (and region search) over HTTP")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", help="region-search index for POST /search (built with the search module)")
    p.add_argument("--name", help="model name reported by /embed and /health (default: --model)")
    defaults = ServeConfig()
    limits = p.add_argument_group("limits and batching")
    for flag, (field, kind, text) in LIMIT_FLAGS.items():
        default = getattr(defaults, field)
        limits.add_argument(flag, dest=field, type=kind, default=default, help=f"{text} (default {default})")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    values = {field: getattr(args, field) for field, _, _ in LIMIT_FLAGS.values()}
    return ServeConfig(model_name=args.name or args.model, encode_batch_size=args.batch_size, **values)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from virtue.apps.server import create_app
    except ImportError as exc:
        raise SystemExit(f"virtue serve: {exc}; install the server extra: pip install 'virtue[serve]'") from None
    # Configuration errors (exit 2) before the slow model load.
    config = config_from_args(args)
    if args.db and not Path(args.db).exists():
        raise ConfigError(f"--db: search index {args.db} does not exist")
    model = load_model(args)
    app = create_app(model, config, search_db=args.db)
    print(f"virtue serve: {config.model_name} on http://{args.host}:{args.port} (docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0

