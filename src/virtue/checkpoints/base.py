"""The official training starting point (virtue-spec §3, §4.3): a Qwen2-VL-Instruct model (2B or 7B), the frozen
SAM2.1 weights, and a connector freshly initialised as the official code does (PyTorch's default init of
`Conv2d(256, 256, 4, 4)` and `Linear-GELU-Linear`), seeded. This module reads the first two; the model makes the
third (`VirtueModel.from_base`).

A base folder is a plain transformers Qwen2-VL repository: `config.json` with `model_type: qwen2_vl` and no
`virtue_sam` entry, weights as safetensors or `.bin` (sharded or not) in either key layout — the hub's
`Qwen/Qwen2-VL-*-Instruct` files and transformers 4.x saves use `model.layers.*` / `visual.*`, transformers 5.x
saves `model.language_model.*` / `model.visual.*` — and the tokenizer files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from virtue.checkpoints.official import image_processing_config, qwen_state
from virtue.checkpoints.sam2_weights import resolve_sam2_weights
from virtue.config import CompatConfig, SamBranchConfig, VirtueConfig, qwen_config
from virtue.errors import CheckpointError

# Where the official code looks for SAM2.1 (its configs' values); a base folder rarely holds them, so the
# search usually ends at the explicit `sam_checkpoint` or the hub's facebook/sam2.1-hiera-base-plus.
OFFICIAL_SAM = {
    "config_path": "sam2.1_hiera_b+.yaml",
    "checkpoint": "sam2.1_hiera_base_plus.pt",
    "points_per_side": 3,
}
BASE_HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


def is_qwen2vl_base(path: Path) -> bool:
    """A transformers Qwen2-VL folder that is not a VIRTUE checkpoint."""
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return data.get("model_type") == "qwen2_vl" and "virtue_sam" not in data


def read_base(
    path: Path,
    *,
    sam_checkpoint: str | Path | None = None,
    allow_hub: bool = True,
    compat: CompatConfig | None = None,
    points_per_side: int = OFFICIAL_SAM["points_per_side"],
) -> tuple[VirtueConfig, dict[str, torch.Tensor], str]:
    """(config, state dict of the Qwen2-VL and SAM2 weights, where SAM2 came from). The connector is not in it:
    a fresh one is made by the model (`virtue.model.connector.seeded_connector_state`)."""
    if not is_qwen2vl_base(path):
        raise CheckpointError(
            f"{path}: not a Qwen2-VL base model (expected config.json with model_type 'qwen2_vl' and no "
            "'virtue_sam' entry)"
        )
    raw = json.loads((path / "config.json").read_text())
    backbone = qwen_config(raw).to_dict()
    sam_cfg = {**OFFICIAL_SAM, "points_per_side": points_per_side}
    sam2_kwargs, sam_state, sam_source = resolve_sam2_weights(
        explicit=sam_checkpoint, checkpoint_dir=path, official_sam_cfg=sam_cfg, allow_hub=allow_hub
    )
    config = VirtueConfig(
        backbone=backbone,
        sam=SamBranchConfig(sam2=sam2_kwargs, points_per_side=points_per_side),
        compat=compat or CompatConfig.clean(),
        image_processing=image_processing_config(path),
    )
    state = qwen_state(path, config)
    state.update({f"sam.model.{k}": v for k, v in sam_state.items()})
    return config, state, sam_source
