"""The official released layout (`Sony/VIRTUE-*-SCaR`, virtue-spec §6.2): a Qwen2VLConfig config.json with a
`virtue_sam` entry, merged Qwen2-VL weights in the pre-4.52 key layout (`pytorch_model.bin`, sharded or
not, or safetensors), `sam2_reducer_and_vlm_layer.pth`, tokenizer/preprocessor files. SAM2.1 weights are
not part of it (see `sam2_weights`)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from virtue.checkpoints.sam2_weights import resolve_sam2_weights
from virtue.config import (
    CLIP_MEAN,
    CLIP_STD,
    CompatConfig,
    ImageProcessingConfig,
    SamBranchConfig,
    VirtueConfig,
    qwen_config,
)
from virtue.errors import CheckpointError, WeightMismatchError

CONNECTOR_FILE = "sam2_reducer_and_vlm_layer.pth"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

# Qwen2-VL key table, official (pre-4.52) and stock (>= 4.52) names -> this library's modules.
QWEN_KEY_RULES = (
    (re.compile(r"^model\.visual\.(.*)"), r"qwen.visual.\1"),
    (re.compile(r"^model\.language_model\.(.*)"), r"qwen.language_model.\1"),
    (re.compile(r"^visual\.(.*)"), r"qwen.visual.\1"),
    (re.compile(r"^model\.(.*)"), r"qwen.language_model.\1"),
)
# The LM head is never used (the embedding is a hidden state); its shape is still checked.
DROPPED_KEYS = ("lm_head.weight",)
CONNECTOR_KEYS = {
    ("sam2_reducer", "weight"): "connector.reducer.weight",
    ("sam2_reducer", "bias"): "connector.reducer.bias",
    ("sam2vlm_layer", "0.weight"): "connector.mlp.0.weight",
    ("sam2vlm_layer", "0.bias"): "connector.mlp.0.bias",
    ("sam2vlm_layer", "2.weight"): "connector.mlp.2.weight",
    ("sam2vlm_layer", "2.bias"): "connector.mlp.2.bias",
}
# compat: the official processor ignores preprocessor_config's pixel limits and uses DataArguments'
# resize_min_pixels / resize_max_pixels (virtue-spec §2.1).
OFFICIAL_MIN_PIXELS = 28 * 28 * 4
OFFICIAL_MAX_PIXELS = 28 * 28 * 1280


def is_official(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("model_type") == "qwen2_vl" and ("virtue_sam" in data or (path / CONNECTOR_FILE).is_file())


def read_official(
    path: Path, *, sam_checkpoint: str | Path | None = None, allow_hub: bool = True
) -> tuple[VirtueConfig, dict[str, torch.Tensor], str]:
    """Returns (config, state dict in this library's names, where the SAM2 weights came from)."""
    raw = json.loads((path / "config.json").read_text())
    sam_cfg = raw.pop("virtue_sam", None) or {}
    if sam_cfg.get("enabled") is False:
        raise CheckpointError(f"{path / 'config.json'}: virtue_sam.enabled is false; not a VIRTUE checkpoint")
    backbone = qwen_config(raw).to_dict()
    sam2_kwargs, sam_state, sam_source = resolve_sam2_weights(
        explicit=sam_checkpoint, checkpoint_dir=path, official_sam_cfg=sam_cfg, allow_hub=allow_hub
    )
    config = VirtueConfig(
        backbone=backbone,
        sam=SamBranchConfig(sam2=sam2_kwargs, points_per_side=int(sam_cfg.get("points_per_side", 3))),
        compat=CompatConfig.official(),
        image_processing=image_processing_config(path),
    )
    state = qwen_state(path, config)
    state.update(_connector_state(path / CONNECTOR_FILE))
    state.update({f"sam.model.{k}": v for k, v in sam_state.items()})
    return config, state, sam_source


def image_processing_config(path: Path) -> ImageProcessingConfig:
    """Qwen2-VL's image settings from a folder's preprocessor_config.json, with the official pixel limits."""
    file = path / "preprocessor_config.json"
    data = json.loads(file.read_text()) if file.is_file() else {}
    return ImageProcessingConfig(
        min_pixels=OFFICIAL_MIN_PIXELS,
        max_pixels=OFFICIAL_MAX_PIXELS,
        patch_size=int(data.get("patch_size", 14)),
        merge_size=int(data.get("merge_size", 2)),
        temporal_patch_size=int(data.get("temporal_patch_size", 2)),
        image_mean=tuple(data.get("image_mean", CLIP_MEAN)),
        image_std=tuple(data.get("image_std", CLIP_STD)),
    )


def _weight_files(path: Path) -> list[Path]:
    for index in INDEX_FILES:
        if (path / index).is_file():
            weight_map = json.loads((path / index).read_text()).get("weight_map", {})
            files = sorted({path / f for f in weight_map.values()})
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path / index}: lists shard(s) that do not exist: {missing}")
            return files
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return [path / name]
    raise CheckpointError(f"{path}: no Qwen2-VL weights ({', '.join(WEIGHT_FILES + INDEX_FILES)})")


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        # mmap: shards are paged in as they are copied into the model, not read whole up front.
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # a pickle that weights_only refuses, or a corrupt file
        raise CheckpointError(f"{file}: cannot load tensors ({exc})") from exc


def qwen_state(path: Path, config: VirtueConfig) -> dict[str, torch.Tensor]:
    """A folder's Qwen2-VL weights (any shard layout, either key naming) in this library's names; the unused LM
    head is shape-checked and dropped."""
    state: dict[str, torch.Tensor] = {}
    text = config.backbone["text_config"]
    head_shape = (int(text["vocab_size"]), int(text["hidden_size"]))
    for file in _weight_files(path):
        for key, tensor in _load_tensors(file).items():
            if key in DROPPED_KEYS:
                if tuple(tensor.shape) != head_shape:
                    raise WeightMismatchError(f"{file}: {key} has shape {tuple(tensor.shape)}, expected {head_shape}")
                continue
            state[_rename(key, file)] = tensor
    return state


def _rename(key: str, file: Path) -> str:
    for pattern, target in QWEN_KEY_RULES:
        if pattern.match(key):
            return pattern.sub(target, key)
    raise WeightMismatchError(f"{file}: unexpected key {key!r} (not a Qwen2-VL weight)")


def _connector_state(file: Path) -> dict[str, torch.Tensor]:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; official VIRTUE checkpoints ship the connector weights there")
    data = _load_tensors(file)
    state = {}
    for (part, key), target in CONNECTOR_KEYS.items():
        try:
            state[target] = data[part][key]
        except (KeyError, TypeError):
            raise WeightMismatchError(f"{file}: missing {part}.{key}") from None
    extra = {f"{p}.{k}" for p in data for k in data[p]} - {f"{p}.{k}" for p, k in CONNECTOR_KEYS}
    if extra:
        raise WeightMismatchError(f"{file}: unexpected keys {sorted(extra)}")
    return state
