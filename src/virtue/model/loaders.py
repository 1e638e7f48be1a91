"""Checkpoint layouts that other packages own, which `VirtueModel.from_pretrained` loads through them.

The model reads the official and the library layouts itself (`virtue.checkpoints`). Any other layout, such as a
training run's `checkpoint-N/` (whose loading rebuilds the base model, applies peft adapters and checks a
fingerprint: the training package's business), is loaded by a `CheckpointLoader` that its package declares as an
entry point of the group `virtue.checkpoint_loaders` in its distribution metadata (`pyproject.toml`):

    [project.entry-points."virtue.checkpoint_loaders"]
    training = "virtue.train.checkpoint_model:TRAINING_CHECKPOINTS"

So the model names no package above it and imports none of them: a loader's module is imported only when a
folder is neither of the two built-in layouts, and only to ask it whether the folder is its own.
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from virtue.errors import CheckpointError

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "virtue.checkpoint_loaders"


@dataclass(frozen=True)
class CheckpointLoader:
    """A checkpoint layout and how to load it.

    Attributes:
        name: the layout's name, for messages ("training").
        detect: whether a local folder is in this layout; cheap (file names only), never raises.
        load: `load(path, **options)` -> `VirtueModel`, with the options of `VirtueModel.from_pretrained` that
            apply to the layout (device, dtype, allow_hub, compat, merge_adapters, float32_modules).
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[..., Any]


def registered_loaders() -> Iterator[CheckpointLoader]:
    """The loaders of every installed package, in entry-point order; one that cannot be imported is skipped with
    a warning (a broken optional package must not stop the built-in layouts from loading)."""
    for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            loader = entry.load()
        except Exception as exc:  # an ImportError, or any error raised while importing that package
            logger.warning("checkpoint loader %r (%s) cannot be imported: %s", entry.name, entry.value, exc)
            continue
        if not isinstance(loader, CheckpointLoader):
            raise CheckpointError(f"entry point {entry.name!r} of {ENTRY_POINT_GROUP} ({entry.value}) is not a "
                                  "virtue.model.loaders.CheckpointLoader")
        yield loader


def loader_for(path: Path) -> CheckpointLoader | None:
    """The registered loader whose layout `path` is in, or None."""
    return next((loader for loader in registered_loaders() if loader.detect(path)), None)
