"""SAM 2.1 weights in either release format -> `transformers.Sam2Model` names, checked.

Meta's `.pt` holds `{'model': state_dict}`; this module renames its keys onto `Sam2Model` with explicit
tables, so that a key nobody planned for is an error rather than a silently random weight (virtue-spec
§6.4 option b, §12). The checks against the `Sam2Model` a config describes, and building that model,
live here too, since every conversion ends in them.

The two format readers (`load_sam2_meta`, `load_sam2_transformers`) are here rather than in
`sam2_weights`: reading a file is inseparable from renaming and checking its keys (they use the key
tables, `_expected_shapes`, `_check_keys_and_shapes`), so keeping them here leaves those private and
leaves `sam2_weights` only the question of where the files are. Imports `sam2_config`; not
`sam2_weights`.
"""

from __future__ import annotations

import copy
import json
import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from virtue.checkpoints.sam2_config import sam2_config_from_meta_yaml
from virtue.errors import CheckpointError, ConfigError, WeightMismatchError

__all__ = [
    "StateDict",
    "build_sam2_model",
    "load_sam2_meta",
    "load_sam2_transformers",
    "meta_state_dict",
    "sam2_state_dict_from_meta",
]

StateDict = dict[str, Tensor]

# --------------------------------------------------------------------------------------------------
# State dict: Meta keys -> Sam2Model keys
# --------------------------------------------------------------------------------------------------

_TRUNK, _BACKBONE = r"^image_encoder\.trunk\.", "vision_encoder.backbone."
_DECODER_LAYER = r"^sam_mask_decoder\.transformer\.layers\.(\d+)\."
_ATTN_NAMES = r"(self_attn|cross_attn_token_to_image|cross_attn_image_to_token)"
_MLP3_NAMES = r"(output_hypernetworks_mlps\.\d+|iou_prediction_head|pred_obj_score_head)"

# One-to-one renames, (regex on the Meta key, replacement); the first match wins.
_META_RENAMES: tuple[tuple[str, str], ...] = (
    # Hiera trunk
    (_TRUNK + r"patch_embed\.proj\.", _BACKBONE + "patch_embed.projection."),
    (_TRUNK + r"(pos_embed|pos_embed_window)$", _BACKBONE + r"\1"),
    (_TRUNK + r"blocks\.(\d+)\.norm([12])\.", _BACKBONE + r"blocks.\1.layer_norm\2."),
    (_TRUNK + r"blocks\.(\d+)\.attn\.(qkv|proj)\.", _BACKBONE + r"blocks.\1.attn.\2."),
    (_TRUNK + r"blocks\.(\d+)\.mlp\.layers\.0\.", _BACKBONE + r"blocks.\1.mlp.proj_in."),
    (_TRUNK + r"blocks\.(\d+)\.mlp\.layers\.1\.", _BACKBONE + r"blocks.\1.mlp.proj_out."),
    (_TRUNK + r"blocks\.(\d+)\.proj\.", _BACKBONE + r"blocks.\1.proj."),
    # FPN neck: Meta wraps each lateral conv in a Sequential named "conv"
    (r"^image_encoder\.neck\.convs\.(\d+)\.conv\.", r"vision_encoder.neck.convs.\1."),
    # prompt encoder
    (r"^sam_prompt_encoder\.(not_a_point_embed|no_mask_embed)\.", r"prompt_encoder.\1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.0\.", "prompt_encoder.mask_embed.conv1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.1\.", "prompt_encoder.mask_embed.layer_norm1."),
    (r"^sam_prompt_encoder\.mask_downscaling\.3\.", "prompt_encoder.mask_embed.conv2."),
    (r"^sam_prompt_encoder\.mask_downscaling\.4\.", "prompt_encoder.mask_embed.layer_norm2."),
    (r"^sam_prompt_encoder\.mask_downscaling\.6\.", "prompt_encoder.mask_embed.conv3."),
    # mask decoder: two-way transformer
    (_DECODER_LAYER + _ATTN_NAMES + r"\.([qkv]_proj)\.", r"mask_decoder.transformer.layers.\1.\2.\3."),
    (_DECODER_LAYER + _ATTN_NAMES + r"\.out_proj\.", r"mask_decoder.transformer.layers.\1.\2.o_proj."),
    (_DECODER_LAYER + r"norm([1-4])\.", r"mask_decoder.transformer.layers.\1.layer_norm\2."),
    (_DECODER_LAYER + r"mlp\.layers\.0\.", r"mask_decoder.transformer.layers.\1.mlp.proj_in."),
    (_DECODER_LAYER + r"mlp\.layers\.1\.", r"mask_decoder.transformer.layers.\1.mlp.proj_out."),
    (
        r"^sam_mask_decoder\.transformer\.final_attn_token_to_image\.([qkv]_proj)\.",
        r"mask_decoder.transformer.final_attn_token_to_image.\1.",
    ),
    (
        r"^sam_mask_decoder\.transformer\.final_attn_token_to_image\.out_proj\.",
        "mask_decoder.transformer.final_attn_token_to_image.o_proj.",
    ),
    (r"^sam_mask_decoder\.transformer\.norm_final_attn\.", "mask_decoder.transformer.layer_norm_final_attn."),
    # mask decoder: tokens, high-res projections, upscaling, heads
    (r"^sam_mask_decoder\.(iou_token|mask_tokens|obj_score_token|conv_s0|conv_s1)\.", r"mask_decoder.\1."),
    (r"^sam_mask_decoder\.output_upscaling\.0\.", "mask_decoder.upscale_conv1."),
    (r"^sam_mask_decoder\.output_upscaling\.1\.", "mask_decoder.upscale_layer_norm."),
    (r"^sam_mask_decoder\.output_upscaling\.3\.", "mask_decoder.upscale_conv2."),
    # Meta's 3-layer MLP is layers.0/1/2; Sam2FeedForward names them proj_in / layers.0 / proj_out.
    (r"^sam_mask_decoder\." + _MLP3_NAMES + r"\.layers\.0\.", r"mask_decoder.\1.proj_in."),
    (r"^sam_mask_decoder\." + _MLP3_NAMES + r"\.layers\.1\.", r"mask_decoder.\1.layers.0."),
    (r"^sam_mask_decoder\." + _MLP3_NAMES + r"\.layers\.2\.", r"mask_decoder.\1.proj_out."),
    # added to the 64x64 features in image mode (directly_add_no_mem_embed)
    (r"^no_mem_embed$", "no_memory_embedding"),
)
_COMPILED_RENAMES = tuple((re.compile(pattern), repl) for pattern, repl in _META_RENAMES)

# One Meta tensor that fills two Sam2Model entries: the random-Fourier matrix serves both the prompt
# points and the dense image positional encoding.
_META_FAN_OUT: dict[str, tuple[str, ...]] = {
    "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": (
        "prompt_encoder.shared_embedding.positional_embedding",
        "shared_image_embedding.positional_embedding",
    ),
}

# Meta keeps four (1, C) embeddings (labels 0..3); Sam2Model stacks them into one (4, C) table.
_META_POINT_EMBEDDING = re.compile(r"^sam_prompt_encoder\.point_embeddings\.(\d+)\.weight$")
_HF_POINT_EMBED = "prompt_encoder.point_embed.weight"

# Video / memory parts of Meta's SAM2Base that VIRTUE never runs.
_META_DROPPED: tuple[str, ...] = (
    r"^memory_attention\.",
    r"^memory_encoder\.",
    r"^maskmem_tpos_enc$",
    r"^no_mem_pos_enc$",
    r"^no_obj_ptr$",
    r"^no_obj_embed_spatial$",
    r"^obj_ptr_proj\.",
    r"^obj_ptr_tpos_proj\.",
    r"^mask_downsample\.",
)

# Video-only keys that transformers' Sam2Video checkpoints (e.g. facebook/sam2.1-hiera-*) carry.
_HF_VIDEO_DROPPED: tuple[str, ...] = (
    r"^memory_attention\.",
    r"^memory_encoder\.",
    r"^memory_temporal_positional_encoding$",
    r"^no_memory_positional_encoding$",
    r"^no_object_pointer$",
    r"^occlusion_spatial_embedding_parameter$",
    r"^mask_downsample\.",
    r"^object_pointer_proj\.",
    r"^temporal_positional_encoding_projection_layer\.",
)


def _matches_any(key: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(pattern, key) for pattern in patterns)


def _rename(key: str) -> str | None:
    for pattern, repl in _COMPILED_RENAMES:
        if pattern.search(key):
            return pattern.sub(repl, key, count=1)
    return None


def sam2_state_dict_from_meta(
    meta_sd: Mapping[str, Tensor], *, source: str, config: Mapping[str, Any] | None = None
) -> StateDict:
    """Rename a Meta SAM 2.x state dict to `Sam2Model` keys (float32).

    Every Meta key must be mapped or listed as a dropped video/memory key. With `config` (a
    `sam2_config_from_meta*` dict), the result is also checked to fill every `Sam2Model` key with the
    right shape; `build_sam2_model` repeats that check in any case.
    """
    out: StateDict = {}
    point_embeddings: dict[int, Tensor] = {}
    unknown: list[str] = []
    for key, tensor in meta_sd.items():
        if _matches_any(key, _META_DROPPED):
            continue
        if (match := _META_POINT_EMBEDDING.match(key)) is not None:
            point_embeddings[int(match[1])] = tensor
            continue
        targets = _META_FAN_OUT.get(key) or ((new,) if (new := _rename(key)) is not None else ())
        if not targets:
            unknown.append(key)
        for target in targets:
            _put(out, target, tensor, key, source)
    if unknown:
        raise WeightMismatchError(f"{source}: Meta SAM2 key(s) neither mapped nor known as unused: {unknown}")
    if point_embeddings:
        stacked = _stack_point_embeddings(point_embeddings, source)
        _put(out, _HF_POINT_EMBED, stacked, "sam_prompt_encoder.point_embeddings.*", source)
    if config is not None:
        _check_keys_and_shapes(out, _expected_shapes(config), source)
    return out


def _put(out: StateDict, target: str, tensor: Tensor, meta_key: str, source: str) -> None:
    if target in out:
        raise WeightMismatchError(f"{source}: two Meta keys map onto '{target}' (the second is '{meta_key}')")
    # clone: fanned-out copies must not alias, and the result must not alias the caller's dict
    out[target] = _to_float32(tensor).clone()


def _stack_point_embeddings(parts: Mapping[int, Tensor], source: str) -> Tensor:
    name = "sam_prompt_encoder.point_embeddings.N.weight"
    indices = sorted(parts)
    if indices != list(range(len(indices))):
        raise WeightMismatchError(f"{source}: '{name}' indices {indices} are not 0..{len(indices) - 1}")
    shapes = {tuple(parts[i].shape) for i in indices}
    if any(len(shape) != 2 or shape[0] != 1 for shape in shapes) or len(shapes) != 1:
        raise WeightMismatchError(f"{source}: '{name}' should all be (1, C), got {sorted(shapes)}")
    return torch.cat([parts[i] for i in indices], dim=0)


def _to_float32(tensor: Tensor) -> Tensor:
    return tensor.float() if tensor.is_floating_point() else tensor


# --------------------------------------------------------------------------------------------------
# Checks against the Sam2Model a config describes, and model construction
# --------------------------------------------------------------------------------------------------


def _make_config(config_dict: Mapping[str, Any]) -> Any:
    from huggingface_hub.errors import StrictDataclassError
    from transformers import Sam2Config

    try:
        # deepcopy: Sam2Config keeps references to the nested dicts it is given
        return Sam2Config(**copy.deepcopy(dict(config_dict)), attn_implementation="sdpa")
    except (TypeError, ValueError, KeyError, StrictDataclassError) as exc:
        raise ConfigError(f"invalid Sam2Config kwargs: {type(exc).__name__}: {exc}") from exc


def _skeleton_model(config_dict: Mapping[str, Any]) -> Any:
    from transformers import Sam2Model

    # On the meta device: shapes and names without allocating or initialising any weight.
    with torch.device("meta"):
        return Sam2Model(_make_config(config_dict))


def _expected_shapes(config_dict: Mapping[str, Any]) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in _skeleton_model(config_dict).state_dict().items()}


def _listing(names: list[str], limit: int = 40) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


def _check_keys_and_shapes(sd: Mapping[str, Tensor], expected: Mapping[str, torch.Size], source: str) -> None:
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = [
        f"{name} (expected {tuple(expected[name])}, got {tuple(sd[name].shape)})"
        for name in sorted(set(sd) & set(expected))
        if sd[name].shape != expected[name]
    ]
    problems = [
        f"{label}: {_listing(names)}"
        for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if names
    ]
    if problems:
        raise WeightMismatchError(f"{source}: SAM2 weights do not fit Sam2Model; " + "; ".join(problems))


def build_sam2_model(
    config_dict: Mapping[str, Any], state_dict: Mapping[str, Tensor], *, source: str = "SAM2 state dict"
) -> Any:
    """`transformers.Sam2Model` (SDPA attention, eval mode, frozen) holding exactly `state_dict`."""
    model = _skeleton_model(config_dict)
    _check_keys_and_shapes(state_dict, {k: v.shape for k, v in model.state_dict().items()}, source)
    weights = {name: _to_float32(tensor) for name, tensor in state_dict.items()}
    # assign=True swaps the meta placeholders for these tensors; strict=True re-checks the key sets.
    model.load_state_dict(weights, strict=True, assign=True)
    leftover = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise WeightMismatchError(f"{source}: Sam2Model tensors left uninitialised: {_listing(leftover)}")
    model.eval()
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------------


def _load_meta_pt(pt_path: Path) -> Mapping[str, Tensor]:
    try:
        payload = torch.load(pt_path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{pt_path}: cannot load with torch.load(weights_only=True): {exc}") from exc
    model = payload.get("model") if isinstance(payload, Mapping) else None
    if not isinstance(model, Mapping) or not all(isinstance(v, Tensor) for v in model.values()):
        raise CheckpointError(f"{pt_path}: expected Meta's format {{'model': state_dict}} with tensor values")
    return model


def load_sam2_meta(pt_path: str | Path, yaml_path: str | Path) -> tuple[dict[str, Any], StateDict]:
    """(Sam2Config kwargs, Sam2Model-keyed float32 state dict) from Meta's `.pt` and hydra yaml."""
    config = sam2_config_from_meta_yaml(yaml_path)
    return config, meta_state_dict(Path(pt_path), config)


def meta_state_dict(pt_path: Path, config: Mapping[str, Any], note: str = "") -> StateDict:
    """`Sam2Model`-keyed state dict from a Meta `.pt`, checked against `config`; `note` goes into messages."""
    return sam2_state_dict_from_meta(_load_meta_pt(pt_path), source=f"{pt_path}{note}", config=config)


_TRANSFORMERS_MODEL_TYPES = ("sam2", "sam2_video")  # the facebook/sam2.1-* hub repos say "sam2_video"
_SUB_CONFIGS = ("vision_config", "prompt_encoder_config", "mask_decoder_config")


def load_sam2_transformers(directory: str | Path) -> tuple[dict[str, Any], StateDict]:
    """(Sam2Config kwargs, float32 state dict) from transformers' Sam2 layout (config.json + safetensors)."""
    directory = Path(directory)
    config = _transformers_config(directory / "config.json")
    expected = _expected_shapes(config)
    weights: StateDict = {}
    for name, tensor in _read_safetensors(directory).items():
        # Video-only keys are expected extras; anything else unknown is reported below.
        if name in expected or not _matches_any(name, _HF_VIDEO_DROPPED):
            weights[name] = _to_float32(tensor)
    _check_keys_and_shapes(weights, expected, str(directory))
    return config, weights


def _transformers_config(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the Sam2 config: {exc}") from exc
    if raw.get("model_type") not in _TRANSFORMERS_MODEL_TYPES:
        raise ConfigError(
            f"{path}: 'model_type' is {raw.get('model_type')!r}, expected one of {_TRANSFORMERS_MODEL_TYPES}"
        )
    missing = [key for key in _SUB_CONFIGS if not isinstance(raw.get(key), dict)]
    if missing:
        raise ConfigError(f"{path}: missing sub-config(s) {missing}")
    config = {key: dict(raw[key]) for key in _SUB_CONFIGS}
    # A sam2_video file names its own prompt/decoder config classes; Sam2Config picks its own.
    for key in ("prompt_encoder_config", "mask_decoder_config"):
        config[key].pop("model_type", None)
    return config


def _read_safetensors(directory: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    single, index = directory / "model.safetensors", directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            shard_names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as exc:
            raise CheckpointError(f"{index}: unreadable safetensors index: {exc}") from exc
        files = [directory / name for name in shard_names]
    else:
        raise CheckpointError(f"{directory}: no model.safetensors (or model.safetensors.index.json)")
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            tensors.update(load_file(file, device="cpu"))
        except (OSError, SafetensorError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors: {exc}") from exc
    return tensors
