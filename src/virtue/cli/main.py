"""`virtue` entry point: a table of subcommands; `main(argv)` returns an exit code.

Every command module imports only argparse-level code at import time (heavy imports live inside its `run`), so
`virtue --help`, `virtue <command> --help` and `virtue --version` start without torch or transformers.
"""

from __future__ import annotations

import argparse
import logging
import sys

from virtue import __version__
from virtue.cli import convert, data, demo, embed, evaluate, export, index, search, serve, similarity, train
from virtue.errors import VirtueError

COMMANDS = (embed, similarity, convert, train, export, evaluate, index, search, serve, demo, data)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="virtue", description="VIRTUE visual-interactive embeddings")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--version", action="version", version=f"virtue {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.run(args)
    except VirtueError as exc:
        print(f"virtue {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
