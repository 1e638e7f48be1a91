"""VIRTUE: visual-interactive text-image universal embedder.

    from virtue import VirtueModel
    model = VirtueModel.from_pretrained("Sony/VIRTUE-2B-SCaR")
    q = model.encode({"image": "photo.jpg", "box": [10, 20, 200, 240], "text": "..."})
"""

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
from virtue.model.embedder import VirtueModel
from virtue.processing.text import mmeb_candidate_text, mmeb_query_text, scar_query_text
from virtue.prompts import Box, Mask, Points, VisualPrompt

__version__ = "0.1.0"

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
