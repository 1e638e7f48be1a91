"""Detect a checkpoint's layout and read it into (VirtueConfig, state dict, tokenizer)."""

from __future__ import annotations

import json
import re
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
    sam_source: dict | None = None  # where the SAM2 weights came from (file names, sizes, sha256), for reporting


# The library layout keeps, beside its weights, where its SAM2 weights originally came from.
SAM_SOURCE_FILE = "sam2_source.json"


LOCAL_PREFIXES = (".", "/", "~")
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def resolve_dir(name_or_path: str | Path, allow_hub: bool, allow_patterns: list[str] | None = None) -> Path:
    """A local directory as is; otherwise a hub repo id, downloaded (weights, configs, tokenizer; only the files
    matching `allow_patterns` when given).

    A `Path`, or a name starting with '.', '/' or '~', is a local path and never goes to the hub. When a name is
    neither a local folder nor on the hub, the error says both.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path}: expected a checkpoint directory, found a file")
    local = f"no local folder {path.resolve()}"
    if isinstance(name_or_path, Path) or text.startswith(LOCAL_PREFIXES):
        raise CheckpointError(f"{text}: {local} (a path, so the hub is not asked)")
    if not HUB_ID.match(text):
        raise CheckpointError(f"{text}: {local}, and not a hub repo id (expected owner/name)")
    if not allow_hub:
        raise CheckpointError(f"{text}: {local}, and the hub is disabled (allow_hub=False, --no-hub)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns))
    except Exception as exc:  # network, auth or missing-repo errors all end here
        raise CheckpointError(
            f"{text}: {local}, and not downloadable from the hub ({type(exc).__name__}: {exc})"
        ) from exc


def detect_layout(path: Path) -> str | None:
    """"native" (the library layout), "official" (the released layout), or None for any other folder."""
    if is_native(path):
        return "native"
    return "official" if is_official(path) else None


def read_checkpoint(
    name_or_path: str | Path, *, sam_checkpoint: str | Path | None = None, allow_hub: bool = True
) -> Checkpoint:
    path = resolve_dir(name_or_path, allow_hub)
    if is_native(path):
        if sam_checkpoint is not None:
            raise CheckpointError(f"{path}: library-layout checkpoints contain SAM2; sam_checkpoint is not used")
        config, state = read_native(path)
        layout, source = "native", str(path)
        record = path / SAM_SOURCE_FILE
        sam_source = json.loads(record.read_text()) if record.is_file() else None
    elif is_official(path):
        config, state, found = read_official(path, sam_checkpoint=sam_checkpoint, allow_hub=allow_hub)
        layout, source, sam_source = "official", f"{path} (SAM2 from {found})", found.as_dict()
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
    return Checkpoint(config, state, load_tokenizer(path), source, layout, sam_source)


def load_tokenizer(path: Path):
    try:
        with quiet_transformers():  # it re-parses config.json and repeats the rope warnings
            return AutoTokenizer.from_pretrained(str(path))
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load the tokenizer files ({exc})") from exc
