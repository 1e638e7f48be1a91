"""SAM 2.1 config: Meta's hydra yaml (read as plain YAML) -> `transformers.Sam2Config` kwargs.

VIRTUE checkpoints point at Meta's files; this module holds the config half of the translation, with
explicit tables of Meta's defaults and of the values transformers hard-wires, so that a setting
`Sam2Model` cannot express is an error rather than a silently different model (virtue-spec §6.4
option b, §12). It depends on neither `sam2_keys` nor `sam2_weights`; both build on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from virtue.errors import ConfigError

__all__ = [
    "B_PLUS_META_CONFIG",
    "sam2_config_from_meta",
    "sam2_config_from_meta_yaml",
]

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
