"""Exception hierarchy. Every message names the input (index, field, file) and what was expected."""

from __future__ import annotations


class VirtueError(Exception):
    """Base class of every error raised by `virtue`."""


class InputError(VirtueError, ValueError):
    """Bad input to `encode`, the CLI or an app."""


class ImageError(InputError):
    """An image that cannot be read, is empty, or has an unusable shape."""


class PromptError(InputError):
    """A visual prompt that is out of bounds, degenerate, of the wrong shape, or given without an image."""


class ConfigError(VirtueError, ValueError):
    """An invalid configuration value or an unknown key."""


class CheckpointError(VirtueError):
    """A checkpoint that cannot be loaded; names the file and the key."""


class UnknownLayoutError(CheckpointError):
    """A directory that is neither the official released layout nor the library layout."""


class MissingSamWeightsError(CheckpointError):
    """No SAM2 weights were found; the message lists every place that was searched, in order."""


class WeightMismatchError(CheckpointError):
    """Missing or unexpected keys, or tensors of the wrong shape."""


class DataError(VirtueError):
    """A malformed data row or file; names the dataset, the row id and the column."""
