"""SAM 2.1 weights for `transformers.Sam2Model`, from Meta's release format or transformers' own.

VIRTUE checkpoints point at Meta's files: a hydra yaml (read here as plain YAML) and a `.pt` holding
`{'model': state_dict}`. This module translates both into `Sam2Config` kwargs and `Sam2Model` keys with
explicit tables, so that a key nobody planned for is an error rather than a silently random weight
(virtue-spec §6.4 option b, §12).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import pickle
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from virtue.errors import CheckpointError, ConfigError, MissingSamWeightsError, WeightMismatchError

__all__ = [
    "B_PLUS_META_CONFIG",
    "build_sam2_model",
    "load_sam2_meta",
    "load_sam2_transformers",
    "resolve_sam2_weights",
    "sam2_config_from_meta",
    "sam2_config_from_meta_yaml",
    "sam2_state_dict_from_meta",
]

StateDict = dict[str, Tensor]
logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------
# Config: Meta's hydra yaml -> Sam2Config kwargs
# --------------------------------------------------------------------------------------------------

# The part of Meta's `configs/sam2.1/sam2.1_hiera_b+.yaml` that defines the modules VIRTUE runs. The
# real yaml leaves the Hiera trunk's stages / global blocks / background size at Hiera's defaults;
# they are written out here. Used when a Meta `.pt` arrives without its yaml.
B_PLUS_META_CONFIG: dict[str, Any] = {
    "model": {
        "image_encoder": {
            "scalp": 1,
            "trunk": {
                "embed_dim": 112,
                "num_heads": 2,
                "stages": [2, 3, 16, 3],
                "global_att_blocks": [12, 16, 20],
                "window_pos_embed_bkg_spatial_size": [14, 14],
                "window_spec": [8, 4, 14, 7],
            },
            "neck": {
                "position_encoding": {
                    "num_pos_feats": 256,
                    "normalize": True,
                    "scale": None,
                    "temperature": 10000,
                },
                "d_model": 256,
                "backbone_channel_list": [896, 448, 224, 112],
                "fpn_top_down_levels": [2, 3],
                "fpn_interp_model": "nearest",
            },
        },
        "memory_attention": {"d_model": 256},
        "image_size": 1024,
        "use_high_res_features_in_sam": True,
        "iou_prediction_use_sigmoid": True,
        "pred_obj_scores": True,
        "pred_obj_scores_mlp": True,
    }
}

# Constructor defaults of Meta's classes: a key the yaml leaves out takes these values.
_HIERA_DEFAULTS: dict[str, Any] = {
    "embed_dim": 96,
    "num_heads": 1,
    "drop_path_rate": 0.0,
    "q_pool": 3,
    "q_stride": [2, 2],
    "stages": [2, 3, 16, 3],
    "dim_mul": 2.0,
    "head_mul": 2.0,
    "window_pos_embed_bkg_spatial_size": [14, 14],
    "window_spec": [8, 4, 14, 7],
    "global_att_blocks": [12, 16, 20],
    "return_interm_layers": True,
    "weights_path": None,
}
_NECK_DEFAULTS: dict[str, Any] = {
    "position_encoding": {},
    "d_model": None,
    "backbone_channel_list": None,
    "kernel_size": 1,
    "stride": 1,
    "padding": 0,
    "fpn_interp_model": "bilinear",
    "fuse_type": "sum",
    "fpn_top_down_levels": None,
}
_POS_ENC_DEFAULTS: dict[str, Any] = {
    "num_pos_feats": None,
    "normalize": True,
    "scale": None,
    "temperature": 10000,
}
_MODEL_DEFAULTS: dict[str, Any] = {"image_size": 512, "pred_obj_scores": False, "pred_obj_scores_mlp": False}

# (yaml key under `model.`, value transformers' modules hard-wire, why it matters). Each is checked
# after Meta's defaults are applied, so an absent key is judged by Meta's default, not ignored.
_TRUNK_KEY, _NECK_KEY, _POS_KEY = (
    "image_encoder.trunk.",
    "image_encoder.neck.",
    "image_encoder.neck.position_encoding.",
)
_REQUIRED_VALUES: tuple[tuple[str, Any, str], ...] = (
    (_TRUNK_KEY + "q_pool", 3, "Sam2Model's feature sizes s/4, s/8, s/16 assume 3 query-pool stages"),
    (_TRUNK_KEY + "return_interm_layers", True, "the FPN neck needs every stage's output"),
    (_NECK_KEY + "fpn_interp_model", "nearest", "transformers' Sam2VisionNeck always upsamples nearest"),
    (_NECK_KEY + "fuse_type", "sum", "transformers' Sam2VisionNeck always sums the levels"),
    (_POS_KEY + "normalize", True, "transformers' neck sine encoding is normalised"),
    (_POS_KEY + "temperature", 10000, "transformers' neck sine encoding uses 10000"),
    (_POS_KEY + "scale", None, "transformers' neck sine encoding uses scale 2*pi"),
    ("pred_obj_scores", True, "the object-score token is one of the mask decoder's output tokens"),
    ("pred_obj_scores_mlp", True, "transformers' object-score head is a 3-layer MLP"),
)

# Mask-decoder options Meta accepts through `sam_mask_decoder_extra_args`, with their Sam2 names.
_DECODER_EXTRA_ARGS = {
    "dynamic_multimask_via_stability": "dynamic_multimask_via_stability",
    "dynamic_multimask_stability_delta": "dynamic_multimask_stability_delta",
    "dynamic_multimask_stability_thresh": "dynamic_multimask_stability_thresh",
}

# Fixed in Meta's code (`SAM2Base`, `_build_sam_heads`) rather than in the yaml.
_BACKBONE_STRIDE = 16
_SAM_HEADS = {
    "mlp_dim": 2048,
    "num_hidden_layers": 2,
    "num_attention_heads": 8,
    "attention_downsample_rate": 2,
    "num_multimask_outputs": 3,
    "iou_head_depth": 3,
    "iou_head_hidden_dim": 256,
}
_SAM2_FEATURE_LEVELS = 3  # Sam2Model splits the levels into two high-res maps + the image embedding


def sam2_config_from_meta_yaml(path: str | Path) -> dict[str, Any]:
    """`Sam2Config(**d)` kwargs (JSON-serialisable) for a Meta SAM 2.x hydra yaml.

    Raises ConfigError, naming the file and the key, for settings `Sam2Model` cannot express.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the SAM2 yaml: {exc}") from exc
    return sam2_config_from_meta(raw, source=str(path))


def sam2_config_from_meta(raw: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """Same as `sam2_config_from_meta_yaml`, for an already parsed yaml (e.g. `B_PLUS_META_CONFIG`)."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: expected a YAML mapping with a 'model' key")
    try:
        return _convert_meta_config(raw, source)
    except ConfigError:
        raise
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # values of the wrong type (a string where Meta expects a list of ints, ...)
        raise ConfigError(f"{source}: malformed SAM2 config: {type(exc).__name__}: {exc}") from exc


def _convert_meta_config(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    model = _section(raw, "model", source, {})
    encoder = _section(model, "image_encoder", source, {})
    trunk = _with_defaults(_section(encoder, "trunk", source, {}), _HIERA_DEFAULTS, _TRUNK_KEY, source)
    neck = _with_defaults(_section(encoder, "neck", source, {}), _NECK_DEFAULTS, _NECK_KEY, source)
    neck["position_encoding"] = _with_defaults(
        neck["position_encoding"] or {}, _POS_ENC_DEFAULTS, _POS_KEY, source
    )
    resolved = {**_MODEL_DEFAULTS, **model, "image_encoder": {**encoder, "trunk": trunk, "neck": neck}}
    _check_required_values(resolved, source)
    vision = _vision_config(resolved, source)
    hidden = vision["fpn_hidden_size"]
    _check_hidden_dims(resolved, hidden, source)
    return {
        "vision_config": vision,
        "prompt_encoder_config": {
            "hidden_size": hidden,
            "image_size": resolved["image_size"],
            "patch_size": _BACKBONE_STRIDE,
            "mask_input_channels": 16,
            "num_point_embeddings": 4,
        },
        "mask_decoder_config": {"hidden_size": hidden, **_SAM_HEADS, **_decoder_extra_args(resolved, source)},
    }


def _section(node: Mapping[str, Any], key: str, source: str, default: Any) -> Any:
    value = node.get(key, default)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: key '{key}' should be a mapping, got {type(value).__name__}")
    return value


def _with_defaults(node: Mapping[str, Any], defaults: Mapping[str, Any], where: str, source: str) -> dict:
    # An unknown key would be a constructor argument transformers has no counterpart for.
    unknown = sorted(k for k in node if k != "_target_" and k not in defaults)
    if unknown:
        raise ConfigError(f"{source}: unsupported key(s) under 'model.{where.rstrip('.')}': {unknown}")
    return {**defaults, **{k: v for k, v in node.items() if k != "_target_"}}


def _lookup(node: Mapping[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_required_values(model: Mapping[str, Any], source: str) -> None:
    for key, required, why in _REQUIRED_VALUES:
        value = _lookup(model, key)
        if value != required:
            raise ConfigError(f"{source}: 'model.{key}' is {value!r}; only {required!r} is supported ({why})")


def _per_stage(first: int, factor: float, stages: int) -> list[int]:
    # Meta's Hiera multiplies and truncates stage by stage: dim = int(dim * dim_mul).
    values = [int(first)]
    for _ in range(stages - 1):
        values.append(int(values[-1] * factor))
    return values


def _vision_config(model: Mapping[str, Any], source: str) -> dict[str, Any]:
    trunk, neck = model["image_encoder"]["trunk"], model["image_encoder"]["neck"]
    stages = list(trunk["stages"])
    if len(trunk["window_spec"]) != len(stages):
        raise ConfigError(f"{source}: 'model.image_encoder.trunk.window_spec' needs one entry per stage")
    dims = _per_stage(trunk["embed_dim"], trunk["dim_mul"], len(stages))
    heads = _per_stage(trunk["num_heads"], trunk["head_mul"], len(stages))
    channels = list(neck["backbone_channel_list"] or [])
    if channels != dims[::-1]:
        raise ConfigError(
            f"{source}: 'model.image_encoder.neck.backbone_channel_list' is {channels}, but the trunk "
            f"produces {dims[::-1]}"
        )
    levels = len(stages) - int(model["image_encoder"].get("scalp", 0))
    if levels != _SAM2_FEATURE_LEVELS:
        raise ConfigError(
            f"{source}: 'model.image_encoder.scalp' leaves {levels} feature levels; Sam2Model needs "
            f"{_SAM2_FEATURE_LEVELS}"
        )
    return {
        "model_type": "sam2_vision_model",
        "backbone_config": _backbone_config(trunk, stages, dims, heads, model["image_size"]),
        "backbone_channel_list": channels,
        "backbone_feature_sizes": _feature_sizes(model["image_size"], levels, source),
        "fpn_hidden_size": _fpn_hidden_size(neck, source),
        "fpn_kernel_size": neck["kernel_size"],
        "fpn_stride": neck["stride"],
        "fpn_padding": neck["padding"],
        # Meta's None means "every level"; transformers' None would mean its default [2, 3].
        "fpn_top_down_levels": list(range(len(channels)))
        if neck["fpn_top_down_levels"] is None
        else list(neck["fpn_top_down_levels"]),
        "num_feature_levels": levels,
    }


def _backbone_config(
    trunk: Mapping[str, Any], stages: list[int], dims: list[int], heads: list[int], image_size: int
) -> dict[str, Any]:
    return {
        # Without model_type, Sam2Config's AutoConfig lookup of the backbone fails with KeyError None.
        "model_type": "sam2_hiera_det_model",
        "hidden_size": dims[0],
        "num_attention_heads": heads[0],
        "image_size": [image_size, image_size],
        "query_stride": list(trunk["q_stride"]),
        "num_query_pool_stages": trunk["q_pool"],
        "blocks_per_stage": stages,
        "embed_dim_per_stage": dims,
        "num_attention_heads_per_stage": heads,
        "window_size_per_stage": list(trunk["window_spec"]),
        "global_attention_blocks": list(trunk["global_att_blocks"]),
        "window_positional_embedding_background_size": list(trunk["window_pos_embed_bkg_spatial_size"]),
    }


def _feature_sizes(image_size: int, levels: int, source: str) -> list[list[int]]:
    if not isinstance(image_size, int) or image_size % _BACKBONE_STRIDE:
        raise ConfigError(f"{source}: 'model.image_size' {image_size!r} is not a multiple of 16")
    # The patch embedding has stride 4 and every kept level halves the resolution.
    return [[image_size // (4 * 2**i)] * 2 for i in range(levels)]


def _fpn_hidden_size(neck: Mapping[str, Any], source: str) -> int:
    d_model = neck["d_model"]
    if not isinstance(d_model, int):
        raise ConfigError(f"{source}: 'model.image_encoder.neck.d_model' must be an integer, got {d_model!r}")
    pos_feats = neck["position_encoding"]["num_pos_feats"]
    if pos_feats not in (None, d_model):
        raise ConfigError(
            f"{source}: 'model.image_encoder.neck.position_encoding.num_pos_feats' is {pos_feats}; "
            f"transformers ties it to d_model ({d_model})"
        )
    return d_model


def _check_hidden_dims(model: Mapping[str, Any], hidden: int, source: str) -> None:
    # Meta sizes the SAM heads by memory_attention.d_model and feeds them the neck output, so the two
    # must agree; transformers uses the neck width for both.
    memory_dim = (model.get("memory_attention") or {}).get("d_model", hidden)
    if memory_dim != hidden:
        raise ConfigError(
            f"{source}: 'model.memory_attention.d_model' ({memory_dim}) differs from "
            f"'model.image_encoder.neck.d_model' ({hidden})"
        )


def _decoder_extra_args(model: Mapping[str, Any], source: str) -> dict[str, Any]:
    extra = model.get("sam_mask_decoder_extra_args") or {}
    unknown = sorted(set(extra) - set(_DECODER_EXTRA_ARGS))
    if unknown:
        raise ConfigError(f"{source}: unsupported 'model.sam_mask_decoder_extra_args' key(s): {unknown}")
    return {_DECODER_EXTRA_ARGS[k]: v for k, v in extra.items()}


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
    return config, _meta_state_dict(Path(pt_path), config)


def _meta_state_dict(pt_path: Path, config: Mapping[str, Any], note: str = "") -> StateDict:
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


# --------------------------------------------------------------------------------------------------
# Finding the weights
# --------------------------------------------------------------------------------------------------

class SamSource(str):
    """Where a model's SAM2 weights came from: the description (it is a `str`) and, for reporting, every file
    read with its size and sha256 (`files`, `as_dict()`). Kept out of the model fingerprint, which hashes the
    weights themselves."""

    files: tuple[dict[str, Any], ...]

    def __new__(cls, description: str, files: tuple[dict[str, Any], ...] = ()) -> SamSource:
        obj = super().__new__(cls, description)
        obj.files = tuple(files)
        return obj

    def as_dict(self) -> dict[str, Any]:
        return {"description": str(self), "files": [dict(f) for f in self.files]}


def file_record(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return {"file": path.name, "path": str(path), "bytes": path.stat().st_size, "sha256": h.hexdigest()}


# (config, state dict, where they came from)
Found = tuple[dict[str, Any], StateDict, SamSource]
_B_PLUS_YAML_NAME = "sam2.1_hiera_b+.yaml"
_HUB_PLACE = "Hugging Face Hub"
# The Hiera size a Meta config names (sam2.1_hiera_{t,s,b+,l}.yaml): the hub fallback holds B+ only.
_SIZE_IN_NAME = re.compile(r"hiera_(t|s|b\+|l)\b", re.IGNORECASE)
_HUB_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]


class _NotHere(Exception):
    """A place that holds no SAM2 weights; the message says why (internal to the search)."""


def resolve_sam2_weights(
    *,
    explicit: str | Path | None,
    checkpoint_dir: Path | None,
    official_sam_cfg: Mapping[str, Any] | None,
    hub_id: str = "facebook/sam2.1-hiera-base-plus",
    allow_hub: bool = True,
) -> Found:
    """(Sam2Config kwargs, Sam2Model state dict, description of where they came from).

    Order: `explicit` (a Meta `.pt` or a transformers-format directory); then `checkpoint_dir` (the
    files named by `official_sam_cfg`, i.e. an official config.json's `virtue_sam`, then a `sam2/`
    subfolder in transformers format); then `hub_id` if `allow_hub`. An explicit path that holds no
    weights is an error at once: silently using other weights instead would hide the mistake. Files
    that exist but do not load raise their own error. Otherwise MissingSamWeightsError lists every
    place tried, in order, with the reason.
    """
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    sam_cfg = dict(official_sam_cfg or {})
    if explicit is not None:
        try:
            config, weights, found = _load_explicit(Path(explicit), checkpoint_dir, sam_cfg)
        except _NotHere as exc:
            raise MissingSamWeightsError(_missing_message([f"explicit path {explicit}: {exc}"])) from None
        return config, weights, SamSource(f"explicit: {found}", found.files)
    tried: list[str] = []
    for place, load in _fallback_places(checkpoint_dir, sam_cfg, hub_id, allow_hub):
        if place.startswith(_HUB_PLACE):
            _check_hub_size(sam_cfg, hub_id, tried)
        try:
            found = load()
        except _NotHere as exc:
            tried.append(f"{place}: {exc}")
            continue
        if place.startswith(_HUB_PLACE) and tried:
            logger.warning("SAM2 weights not found where the checkpoint names them (%s); using %s",
                           "; ".join(tried), found[2])
        return found
    raise MissingSamWeightsError(_missing_message(tried))


def _check_hub_size(sam_cfg: Mapping[str, Any], hub_id: str, tried: list[str]) -> None:
    """The hub fallback holds SAM2.1 Hiera-B+: refuse it when the checkpoint's config names another size,
    rather than run a model on SAM2 weights it was not trained with."""
    named = sam_cfg.get("config_path")
    match = _SIZE_IN_NAME.search(Path(str(named)).name) if named else None
    if match and match.group(1).lower() != "b+":
        tried.append(f"{_HUB_PLACE} {hub_id}: refused, it holds Hiera-B+ but virtue_sam.config_path names Hiera-"
                     f"{match.group(1)} ({named}); give the right weights with sam_checkpoint=")
        raise MissingSamWeightsError(_missing_message(tried))


def _missing_message(tried: list[str]) -> str:
    lines = "\n".join(f"  {i}. {entry}" for i, entry in enumerate(tried, 1))
    return f"no SAM2 weights found; places tried, in order:\n{lines}"


def _load_explicit(path: Path, checkpoint_dir: Path | None, sam_cfg: Mapping[str, Any]) -> Found:
    if path.is_dir():
        return _load_transformers_dir(path)
    if path.is_file():
        search_dirs = [path.parent, *([checkpoint_dir] if checkpoint_dir else [])]
        return _load_meta_with_yaml(path, search_dirs, sam_cfg.get("config_path"))
    raise _NotHere("no such file or directory")


def _load_transformers_dir(directory: Path) -> Found:
    if not (directory / "config.json").is_file():
        raise _NotHere("directory without config.json (not transformers' Sam2 layout)")
    config, weights = load_sam2_transformers(directory)
    files = sorted(directory.glob("*.safetensors"))
    return config, weights, SamSource(f"transformers-format SAM2 folder {directory}", tuple(map(file_record, files)))


def _candidates(relative: str | None, dirs: list[Path]) -> list[Path]:
    # Official configs hold paths relative to the authors' working directory
    # (./sam2_checkpoints/...): try them as given and by file name alone in each directory.
    if not relative:
        return []
    found: list[Path] = []
    for directory in dirs:
        for option in (directory / relative, directory / Path(relative).name):
            if option not in found:
                found.append(option)
    return found


def _load_meta_with_yaml(pt_path: Path, dirs: list[Path], config_path: str | None) -> Found:
    yaml_options = [*_candidates(config_path, dirs), pt_path.with_suffix(".yaml")]
    yaml_path = next((p for p in yaml_options if p.is_file()), None)
    if yaml_path is not None:
        source = SamSource(f"Meta checkpoint {pt_path} with config {yaml_path}", (file_record(pt_path),))
        return (*load_sam2_meta(pt_path, yaml_path), source)
    if config_path and Path(config_path).name != _B_PLUS_YAML_NAME:
        tried = ", ".join(str(p) for p in yaml_options)
        raise _NotHere(f"found {pt_path} but not its yaml '{config_path}' (looked at {tried})")
    # Without a yaml, the b+ architecture is the one VIRTUE was trained with.
    note = " (no yaml found: built-in Hiera-B+ config)"
    config = sam2_config_from_meta(B_PLUS_META_CONFIG, source="built-in Hiera-B+ config")
    source = SamSource(f"Meta checkpoint {pt_path}{note}", (file_record(pt_path),))
    return config, _meta_state_dict(pt_path, config, note=note), source


def _fallback_places(
    checkpoint_dir: Path | None, sam_cfg: Mapping[str, Any], hub_id: str, allow_hub: bool
) -> list[tuple[str, Callable[[], Found]]]:
    places: list[tuple[str, Callable[[], Found]]] = []
    if checkpoint_dir is None:
        places.append(("checkpoint directory", _not_here("none given")))
    else:
        ckpt_dir = checkpoint_dir  # bound for the closures below
        places.append(
            (
                f"Meta checkpoint named by virtue_sam ({sam_cfg.get('checkpoint')!r}) in {ckpt_dir}",
                lambda: _load_official_meta(ckpt_dir, sam_cfg),
            )
        )
        sub = ckpt_dir / "sam2"
        places.append((f"transformers-format folder {sub}", lambda: _load_transformers_dir_if_present(sub)))
    hub_place = f"{_HUB_PLACE} {hub_id}"
    places.append(
        (
            hub_place,
            (lambda: _load_from_hub(hub_id)) if allow_hub else _not_here("disabled (allow_hub=False)"),
        )
    )
    return places


def _not_here(reason: str) -> Callable[[], Found]:
    def load() -> Found:
        raise _NotHere(reason)

    return load


def _load_official_meta(checkpoint_dir: Path, sam_cfg: Mapping[str, Any]) -> Found:
    checkpoint = sam_cfg.get("checkpoint")
    if not checkpoint:
        raise _NotHere("no virtue_sam.checkpoint entry")
    options = _candidates(str(checkpoint), [checkpoint_dir])
    pt_path = next((p for p in options if p.is_file()), None)
    if pt_path is None:
        raise _NotHere("not found at " + ", ".join(str(p) for p in options))
    return _load_meta_with_yaml(pt_path, [checkpoint_dir], sam_cfg.get("config_path"))


def _load_transformers_dir_if_present(directory: Path) -> Found:
    if not directory.is_dir():
        raise _NotHere("does not exist")
    return _load_transformers_dir(directory)


def _load_from_hub(hub_id: str) -> Found:
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:
        raise _NotHere(f"huggingface_hub is not importable: {exc}") from exc
    try:
        local = Path(snapshot_download(hub_id, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:
        # The hub client raises many unrelated types (offline mode, HTTP, auth, disk); all mean
        # "not available here", and the reason goes into the final message.
        raise _NotHere(f"download failed: {type(exc).__name__}: {exc}") from exc
    config, weights, found = _load_transformers_dir(local)
    return config, weights, SamSource(f"Hugging Face Hub {hub_id} (snapshot {local})", found.files)
