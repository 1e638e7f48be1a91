"""The library layout: one directory with config.json (a `VirtueConfig`), model.safetensors and the
tokenizer files. Safetensors only. Saving also writes the sentence-transformers files (`st_files`: modules.json,
config_sentence_transformers.json, sentence_bert_config.json, 1_Normalize/config.json), so that the same folder loads
with `SentenceTransformer(path, trust_remote_code=True)`; see `virtue.integrations.sentence_transformers`."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from virtue.checkpoints.st_files import write_sentence_transformers_files
from virtue.config import VirtueConfig
from virtue.errors import CheckpointError, WeightMismatchError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def is_native(path: Path) -> bool:
    cfg = path / CONFIG_FILE
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "virtue"
    except (OSError, json.JSONDecodeError):
        return False


def read_native(path: Path) -> tuple[VirtueConfig, dict[str, torch.Tensor]]:
    config = VirtueConfig.load(path / CONFIG_FILE)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing; the library layout stores its weights there")
    try:
        state = load_file(weights)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise CheckpointError(f"{weights}: cannot read safetensors file ({exc})") from exc
    return config, state


def check_new_destination(dst: Path) -> None:
    """Refuse to write a model into `dst` if it exists and is not an empty directory."""
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: exists and is not empty; choose a new directory")


def save_native(
    path: str | Path,
    config: VirtueConfig,
    state_dict: dict[str, torch.Tensor],
    tokenizer,
    *,
    sentence_transformers: bool = True,
) -> None:
    """Write the library layout to `path`.

    sentence_transformers: also write the sentence-transformers files (`st_files`), so that every saved or
        converted model is an ST model too (needs no sentence-transformers installed). False when
        `SentenceTransformer.save` writes its own.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(path / WEIGHTS_FILE), metadata={"format": "pt", "library": "virtue"})
    config.save(path / CONFIG_FILE)
    tokenizer.save_pretrained(str(path))
    if sentence_transformers:
        write_sentence_transformers_files(path)


def check_state_dict(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    """Every key present, none extra, every shape equal; else one error listing all problems."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    shapes = [
        f"{k}: expected {tuple(expected[k].shape)}, got {tuple(given[k].shape)}"
        for k in sorted(set(expected) & set(given))
        if expected[k].shape != given[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_head(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_head(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches ({len(shapes)}): {_head(shapes)}")
    if problems:
        raise WeightMismatchError(f"{source}: " + "; ".join(problems))


def _head(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n})" if len(items) > n else "")
