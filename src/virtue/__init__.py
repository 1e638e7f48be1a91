"""VIRTUE: visual-interactive text-image universal embedder.

    from virtue import VirtueModel
    model = VirtueModel.from_pretrained("Sony/VIRTUE-2B-SCaR")
    q = model.encode({"image": "photo.jpg", "box": [10, 20, 200, 240], "text": "..."})

`VirtueModel` is imported on first use (PEP 562): importing `virtue` or any light module of it (errors, configs,
prompts; the CLI's argument parsing) does not load torch's model stack or transformers' Qwen2-VL code.
"""

from typing import TYPE_CHECKING, Any

from virtue.config import CompatConfig, ImageProcessingConfig, SamBranchConfig, VirtueConfig
from virtue.errors import (
    CheckpointError,
    ConfigError,
    ImageError,
    InputError,
    MissingSamWeightsError,
    PromptError,
    UnknownLayoutError,
    VirtueError,
    WeightMismatchError,
)
from virtue.inputs import EmbedInput
from virtue.processing.text import mmeb_candidate_text, mmeb_query_text, scar_query_text
from virtue.prompts import Box, Mask, Points, VisualPrompt

if TYPE_CHECKING:
    from virtue.model.embedder import VirtueModel

__version__ = "0.1.0"

_LAZY = {"VirtueModel": "virtue.model.embedder"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups do not come here
        return value
    raise AttributeError(f"module 'virtue' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))

__all__ = [
    "Box",
    "CheckpointError",
    "CompatConfig",
    "ConfigError",
    "EmbedInput",
    "ImageError",
    "ImageProcessingConfig",
    "InputError",
    "Mask",
    "MissingSamWeightsError",
    "Points",
    "PromptError",
    "SamBranchConfig",
    "UnknownLayoutError",
    "VirtueConfig",
    "VirtueError",
    "VirtueModel",
    "VisualPrompt",
    "WeightMismatchError",
    "mmeb_candidate_text",
    "mmeb_query_text",
    "scar_query_text",
]
