"""Detect a checkpoint's layout and read it into (VirtueConfig, state dict, tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from virtue.checkpoints.native import is_native, read_native
from virtue.checkpoints.official import is_official, read_official
from virtue.config import VirtueConfig, quiet_transformers
from virtue.errors import CheckpointError, UnknownLayoutError


@dataclass
class Checkpoint:
    config: VirtueConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer: object
    source: str
    layout: str  # "official" or "native"


def resolve_dir(name_or_path: str | Path, allow_hub: bool, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id, downloaded (weights, configs, tokenizer; only the files
    matching `allow_patterns` when given)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    if not allow_hub or str(name_or_path).count("/") != 1:
        raise CheckpointError(f"{name_or_path}: no such directory" + ("" if allow_hub else " (hub disabled)"))
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=allow_patterns))
    except Exception as exc:  # network, auth or missing-repo errors all end here
        raise CheckpointError(f"{name_or_path}: not a local directory, and the hub download failed: {exc}") from exc


def read_checkpoint(
    name_or_path: str | Path, *, sam_checkpoint: str | Path | None = None, allow_hub: bool = True
) -> Checkpoint:
    path = resolve_dir(name_or_path, allow_hub)
    if is_native(path):
        if sam_checkpoint is not None:
            raise CheckpointError(f"{path}: library-layout checkpoints contain SAM2; sam_checkpoint is not used")
        config, state = read_native(path)
        layout, source = "native", str(path)
    elif is_official(path):
        config, state, sam_source = read_official(path, sam_checkpoint=sam_checkpoint, allow_hub=allow_hub)
        layout, source = "official", f"{path} (SAM2 from {sam_source})"
    else:
        from virtue.checkpoints.base import is_qwen2vl_base

        if is_qwen2vl_base(path):
            raise UnknownLayoutError(
                f"{path}: a plain Qwen2-VL model, not a VIRTUE checkpoint; build a VIRTUE from it with "
                "VirtueModel.from_base(...) or `model: {base: ...}` in a training config"
            )
        raise UnknownLayoutError(
            f"{path}: not a VIRTUE checkpoint: expected config.json with model_type 'virtue' (library layout) "
            "or a Qwen2-VL config.json with 'virtue_sam' and sam2_reducer_and_vlm_layer.pth (official layout)"
        )
    return Checkpoint(config, state, load_tokenizer(path), source, layout)


def load_tokenizer(path: Path):
    try:
        with quiet_transformers():  # it re-parses config.json and repeats the rope warnings
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer files ({exc})") from exc
