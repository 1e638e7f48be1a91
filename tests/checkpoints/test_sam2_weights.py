"""SAM 2.1 weights: Meta yaml/.pt and transformers' format onto `transformers.Sam2Model`."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

_REPO = Path(__file__).resolve().parents[2]
if importlib.util.find_spec("virtue") is None:  # not installed: use the source tree
    sys.path.insert(0, str(_REPO / "src"))

from virtue.checkpoints.sam2_config import (  # noqa: E402
    B_PLUS_META_CONFIG,
    sam2_config_from_meta,
    sam2_config_from_meta_yaml,
)
from virtue.checkpoints.sam2_keys import (  # noqa: E402
    build_sam2_model,
    load_sam2_meta,
    load_sam2_transformers,
    sam2_state_dict_from_meta,
)
from virtue.checkpoints.sam2_weights import resolve_sam2_weights  # noqa: E402
from virtue.errors import ConfigError, MissingSamWeightsError, WeightMismatchError  # noqa: E402

FIXTURE = Path(os.environ.get("VIRTUE_PARITY_FIXTURE", _REPO.parent / "shared/fixtures/virtue-official-tiny"))
CKPT = FIXTURE / "checkpoint"
TOY_PT, TOY_YAML = CKPT / "sam2.1_hiera_toy.pt", CKPT / "sam2.1_hiera_toy.yaml"

# Meta keys VIRTUE never uses (video / memory); written out here independently of the module's table.
DROPPED_PREFIXES = (
    "memory_attention.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "mask_downsample.",
)
GAUSSIAN = "sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"


def _require_fixture() -> None:
    if not TOY_PT.is_file() or not TOY_YAML.is_file():
        pytest.fail(f"SAM2 toy fixture missing under {CKPT}; set VIRTUE_PARITY_FIXTURE to the fixture folder")


@pytest.fixture(scope="module")
def meta_sd() -> dict[str, torch.Tensor]:
    _require_fixture()
    return torch.load(TOY_PT, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def toy() -> tuple[dict, dict[str, torch.Tensor]]:
    _require_fixture()
    return load_sam2_meta(TOY_PT, TOY_YAML)


@pytest.fixture(scope="module")
def toy_model(toy):
    return build_sam2_model(*toy)


def _write_yaml(path: Path, edit) -> Path:
    raw = yaml.safe_load(TOY_YAML.read_text())
    edit(raw["model"])
    path.write_text(yaml.safe_dump(raw))
    return path


# ---------------------------------------------------------------- config


def test_toy_yaml_maps_onto_sam2_config(toy):
    config, _ = toy
    assert json.loads(json.dumps(config)) == config  # JSON-serialisable as promised
    vision = config["vision_config"]
    backbone = vision["backbone_config"]
    assert backbone["model_type"] == "sam2_hiera_det_model"
    assert backbone["embed_dim_per_stage"] == [16, 32, 64, 128]
    assert backbone["num_attention_heads_per_stage"] == [2, 4, 8, 16]
    assert backbone["blocks_per_stage"] == [1, 1, 2, 1]
    assert backbone["global_attention_blocks"] == [3]
    assert backbone["window_size_per_stage"] == [8, 4, 14, 7]
    assert backbone["window_positional_embedding_background_size"] == [7, 7]
    assert vision["backbone_channel_list"] == [128, 64, 32, 16]
    assert vision["fpn_top_down_levels"] == [2, 3]
    assert vision["num_feature_levels"] == 3  # 4 levels - scalp 1
    assert vision["backbone_feature_sizes"] == [[256, 256], [128, 128], [64, 64]]
    assert config["prompt_encoder_config"]["image_size"] == 1024
    assert config["mask_decoder_config"]["hidden_size"] == 256


def test_b_plus_fallback_equals_meta_b_plus_yaml():
    backbone = sam2_config_from_meta(B_PLUS_META_CONFIG, source="b+")["vision_config"]["backbone_config"]
    assert backbone["embed_dim_per_stage"] == [112, 224, 448, 896]
    assert backbone["num_attention_heads_per_stage"] == [2, 4, 8, 16]
    assert backbone["blocks_per_stage"] == [2, 3, 16, 3]
    assert backbone["global_attention_blocks"] == [12, 16, 20]
    assert backbone["window_positional_embedding_background_size"] == [14, 14]


@pytest.mark.parametrize(
    ("edit", "key"),
    [
        (lambda m: m["image_encoder"]["neck"].pop("fpn_interp_model"), "fpn_interp_model"),  # Meta: bilinear
        (lambda m: m["image_encoder"]["trunk"].update(q_pool=2), "q_pool"),
        (lambda m: m["image_encoder"]["trunk"].update(mystery=1), "mystery"),
        (lambda m: m["image_encoder"].update(scalp=0), "scalp"),
        (
            lambda m: m["image_encoder"]["neck"].update(backbone_channel_list=[64, 32, 16, 8]),
            "backbone_channel_list",
        ),
        (lambda m: m.update(pred_obj_scores=False), "pred_obj_scores"),
    ],
)
def test_yaml_settings_transformers_cannot_express_raise(tmp_path, edit, key):
    _require_fixture()
    path = _write_yaml(tmp_path / "bad.yaml", edit)
    with pytest.raises(ConfigError) as info:
        sam2_config_from_meta_yaml(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_use_high_res_features_false_is_ignored(tmp_path):
    _require_fixture()
    path = _write_yaml(tmp_path / "ok.yaml", lambda m: m.update(use_high_res_features_in_sam=False))
    assert sam2_config_from_meta_yaml(path) == sam2_config_from_meta_yaml(TOY_YAML)


# ---------------------------------------------------------------- state dict


def test_every_key_filled_and_every_meta_key_accounted_for(toy, toy_model, meta_sd):
    _, sd = toy
    assert set(sd) == set(toy_model.state_dict())
    kept = [k for k in meta_sd if not k.startswith(DROPPED_PREFIXES)]
    # one Meta tensor fills two entries (gaussian matrix); four are stacked into one (point_embed)
    assert len(sd) == len(kept) + 1 - 3
    assert all(t.dtype == torch.float32 for t in sd.values())


@pytest.mark.parametrize(
    ("meta_key", "hf_key"),
    [
        (
            "image_encoder.trunk.patch_embed.proj.weight",
            "vision_encoder.backbone.patch_embed.projection.weight",
        ),
        ("image_encoder.trunk.pos_embed_window", "vision_encoder.backbone.pos_embed_window"),
        ("image_encoder.trunk.blocks.1.norm2.bias", "vision_encoder.backbone.blocks.1.layer_norm2.bias"),
        (
            "image_encoder.trunk.blocks.2.mlp.layers.1.weight",
            "vision_encoder.backbone.blocks.2.mlp.proj_out.weight",
        ),
        ("image_encoder.trunk.blocks.4.proj.weight", "vision_encoder.backbone.blocks.4.proj.weight"),
        ("image_encoder.neck.convs.2.conv.weight", "vision_encoder.neck.convs.2.weight"),
        ("sam_prompt_encoder.mask_downscaling.4.weight", "prompt_encoder.mask_embed.layer_norm2.weight"),
        ("sam_prompt_encoder.not_a_point_embed.weight", "prompt_encoder.not_a_point_embed.weight"),
        (
            "sam_mask_decoder.transformer.layers.1.cross_attn_image_to_token.out_proj.weight",
            "mask_decoder.transformer.layers.1.cross_attn_image_to_token.o_proj.weight",
        ),
        (
            "sam_mask_decoder.transformer.layers.0.norm4.bias",
            "mask_decoder.transformer.layers.0.layer_norm4.bias",
        ),
        (
            "sam_mask_decoder.transformer.norm_final_attn.weight",
            "mask_decoder.transformer.layer_norm_final_attn.weight",
        ),
        ("sam_mask_decoder.output_upscaling.1.bias", "mask_decoder.upscale_layer_norm.bias"),
        (
            "sam_mask_decoder.output_hypernetworks_mlps.3.layers.1.weight",
            "mask_decoder.output_hypernetworks_mlps.3.layers.0.weight",
        ),
        (
            "sam_mask_decoder.iou_prediction_head.layers.2.bias",
            "mask_decoder.iou_prediction_head.proj_out.bias",
        ),
        (
            "sam_mask_decoder.pred_obj_score_head.layers.0.weight",
            "mask_decoder.pred_obj_score_head.proj_in.weight",
        ),
        ("sam_mask_decoder.obj_score_token.weight", "mask_decoder.obj_score_token.weight"),
        ("no_mem_embed", "no_memory_embedding"),
        (GAUSSIAN, "prompt_encoder.shared_embedding.positional_embedding"),
        (GAUSSIAN, "shared_image_embedding.positional_embedding"),
    ],
)
def test_values_equal_source(toy, meta_sd, meta_key, hf_key):
    assert torch.equal(toy[1][hf_key], meta_sd[meta_key])


def test_point_embeddings_are_stacked_in_label_order(toy, meta_sd):
    expected = torch.cat([meta_sd[f"sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)])
    assert toy[1]["prompt_encoder.point_embed.weight"].shape == (4, 256)
    assert torch.equal(toy[1]["prompt_encoder.point_embed.weight"], expected)


def _extra(sd):
    sd["sam_mask_decoder.bogus_head.weight"] = torch.zeros(3)


def _missing(sd):
    del sd["sam_mask_decoder.conv_s1.bias"]


def _wrong_shape(sd):
    sd["image_encoder.neck.convs.1.conv.weight"] = torch.zeros(256, 65, 1, 1)


def _point_gap(sd):
    del sd["sam_prompt_encoder.point_embeddings.2.weight"]


@pytest.mark.parametrize(
    ("mutate", "named"),
    [
        (_extra, "sam_mask_decoder.bogus_head.weight"),
        (_missing, "mask_decoder.conv_s1.bias"),
        (_wrong_shape, "vision_encoder.neck.convs.1.weight (expected (256, 64, 1, 1), got (256, 65, 1, 1))"),
        (_point_gap, "point_embeddings"),
    ],
)
def test_meta_weight_mismatch_names_the_key(tmp_path, meta_sd, mutate, named):
    sd = dict(meta_sd)
    mutate(sd)
    pt = tmp_path / "broken.pt"
    torch.save({"model": sd}, pt)
    with pytest.raises(WeightMismatchError) as info:
        load_sam2_meta(pt, TOY_YAML)
    assert named in str(info.value) and str(pt) in str(info.value)


def test_without_config_only_the_mapping_is_checked(meta_sd):
    sd = dict(meta_sd)
    del sd["sam_mask_decoder.conv_s1.bias"]
    assert "mask_decoder.conv_s1.bias" not in sam2_state_dict_from_meta(sd, source="x")


def test_build_rejects_wrong_shape_with_names_and_shapes(toy):
    config, sd = toy
    bad = {**sd, "mask_decoder.iou_token.weight": torch.zeros(2, 256)}
    with pytest.raises(WeightMismatchError, match=r"mask_decoder\.iou_token\.weight \(expected \(1, 256\)"):
        build_sam2_model(config, bad)


def test_built_model_is_frozen_eval_sdpa(toy_model):
    assert not toy_model.training
    assert not any(p.requires_grad for p in toy_model.parameters())
    assert toy_model.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- transformers format


def test_transformers_format_round_trip(tmp_path, toy, toy_model):
    toy_model.save_pretrained(tmp_path)
    config, sd = load_sam2_transformers(tmp_path)
    assert set(sd) == set(toy[1])
    assert all(torch.equal(sd[k], toy[1][k]) for k in sd)
    rebuilt = build_sam2_model(config, sd)
    assert rebuilt.config.vision_config.backbone_config.embed_dim_per_stage == [16, 32, 64, 128]


def _write_transformers_dir(directory: Path, toy, model_type: str, extra: dict) -> Path:
    from safetensors.torch import save_file

    directory.mkdir()
    config = {**toy[0], "model_type": model_type}
    (directory / "config.json").write_text(json.dumps(config))
    save_file({**toy[1], **extra}, str(directory / "model.safetensors"))
    return directory


def test_transformers_video_keys_dropped_unknown_keys_rejected(tmp_path, toy):
    video = {"memory_encoder.projection.weight": torch.zeros(2), "no_object_pointer": torch.zeros(1, 256)}
    _, sd = load_sam2_transformers(_write_transformers_dir(tmp_path / "video", toy, "sam2_video", video))
    assert set(sd) == set(toy[1])
    bad = _write_transformers_dir(tmp_path / "bad", toy, "sam2", {"decoder_extra.weight": torch.zeros(1)})
    with pytest.raises(WeightMismatchError, match=r"decoder_extra\.weight"):
        load_sam2_transformers(bad)


# ---------------------------------------------------------------- resolution order

OFFICIAL_CFG = {"config_path": "sam2.1_hiera_toy.yaml", "checkpoint": "sam2.1_hiera_toy.pt"}


def _marked_meta_copy(directory: Path, stem: str) -> Path:
    """A copy of the toy Meta files whose no_mem_embed is recognisably different."""
    directory.mkdir(parents=True)
    sd = torch.load(TOY_PT, map_location="cpu", weights_only=True)["model"]
    sd["no_mem_embed"] = torch.full_like(sd["no_mem_embed"], 7.0)
    torch.save({"model": sd}, directory / f"{stem}.pt")
    shutil.copy(TOY_YAML, directory / f"{stem}.yaml")
    return directory / f"{stem}.pt"


def test_explicit_beats_checkpoint_dir(tmp_path):
    _require_fixture()
    pt = _marked_meta_copy(tmp_path / "explicit", "custom")
    _, sd, where = resolve_sam2_weights(
        explicit=pt, checkpoint_dir=CKPT, official_sam_cfg=OFFICIAL_CFG, allow_hub=False
    )
    assert torch.all(sd["no_memory_embedding"] == 7.0)
    assert str(pt) in where


def test_explicit_pt_finds_yaml_named_by_official_cfg_in_checkpoint_dir(tmp_path):
    _require_fixture()
    pt = _marked_meta_copy(tmp_path / "explicit", "sam2.1_hiera_toy")
    (pt.parent / "sam2.1_hiera_toy.yaml").unlink()
    config, sd, _ = resolve_sam2_weights(
        explicit=pt, checkpoint_dir=CKPT, official_sam_cfg=OFFICIAL_CFG, allow_hub=False
    )
    assert config == sam2_config_from_meta_yaml(TOY_YAML)
    assert torch.all(sd["no_memory_embedding"] == 7.0)


def test_explicit_pt_without_yaml_uses_b_plus_defaults(tmp_path):
    _require_fixture()
    pt = _marked_meta_copy(tmp_path / "explicit", "lonely")
    (pt.parent / "lonely.yaml").unlink()
    with pytest.raises(WeightMismatchError) as info:  # toy weights do not fit Hiera-B+
        resolve_sam2_weights(explicit=pt, checkpoint_dir=None, official_sam_cfg=None, allow_hub=False)
    assert "Hiera-B+" in str(info.value)


def test_explicit_transformers_dir_and_missing_explicit(tmp_path, toy_model):
    toy_model.save_pretrained(tmp_path / "hf")
    _, _, where = resolve_sam2_weights(
        explicit=tmp_path / "hf", checkpoint_dir=CKPT, official_sam_cfg=OFFICIAL_CFG, allow_hub=False
    )
    assert str(tmp_path / "hf") in where
    with pytest.raises(MissingSamWeightsError, match="no such file"):
        resolve_sam2_weights(
            explicit=tmp_path / "nope.pt", checkpoint_dir=CKPT, official_sam_cfg=OFFICIAL_CFG, allow_hub=False
        )


def test_checkpoint_dir_via_official_cfg_relative_path(toy):
    _require_fixture()
    cfg = {
        "config_path": "./configs/sam2.1_hiera_toy.yaml",
        "checkpoint": "./sam2_checkpoints/sam2.1_hiera_toy.pt",
    }
    config, sd, where = resolve_sam2_weights(
        explicit=None, checkpoint_dir=CKPT, official_sam_cfg=cfg, allow_hub=False
    )
    assert config == toy[0] and set(sd) == set(toy[1])
    assert str(CKPT) in where


def test_checkpoint_dir_sam2_subfolder(tmp_path, toy_model):
    toy_model.save_pretrained(tmp_path / "sam2")
    _, _, where = resolve_sam2_weights(
        explicit=None, checkpoint_dir=tmp_path, official_sam_cfg=OFFICIAL_CFG, allow_hub=False
    )
    assert str(tmp_path / "sam2") in where


def test_nothing_available_lists_places_in_order(tmp_path):
    with pytest.raises(MissingSamWeightsError) as info:
        resolve_sam2_weights(
            explicit=None, checkpoint_dir=tmp_path, official_sam_cfg=OFFICIAL_CFG, allow_hub=False
        )
    message = str(info.value)
    places = [str(tmp_path / "sam2.1_hiera_toy.pt"), str(tmp_path / "sam2"), "allow_hub=False"]
    positions = [message.find(p) for p in places]
    assert -1 not in positions and positions == sorted(positions), message


# ---------------------------------------------------------------- numerics, written from Meta's definitions


def _meta_point_embedding(meta_sd, points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Meta PromptEncoder._embed_points with pad=True, for points [B, N, 2] in the 1024 frame."""
    coords = torch.cat([points + 0.5, torch.zeros(points.shape[0], 1, 2)], dim=1) / 1024
    projected = 2 * math.pi * ((2 * coords - 1) @ meta_sd[GAUSSIAN])
    pe = torch.cat([projected.sin(), projected.cos()], dim=-1)
    labels = torch.cat([labels, -torch.ones(labels.shape[0], 1, dtype=labels.dtype)], dim=1)
    table = torch.cat([meta_sd[f"sam_prompt_encoder.point_embeddings.{i}.weight"] for i in range(4)])
    pe = torch.where((labels == -1)[..., None], meta_sd["sam_prompt_encoder.not_a_point_embed.weight"], pe)
    return pe + torch.where((labels >= 0)[..., None], table[labels.clamp(min=0)], torch.zeros(1))


def test_prompt_point_embedding_matches_meta_formula(toy_model, meta_sd):
    points = torch.tensor(
        [[[256.0, 512.0], [108.0, 22.0], [132.0, 152.0]], [[0.0, 0.0], [1023.0, 7.5], [512, 409.6]]]
    )
    labels = torch.tensor([[1, 2, 3], [0, 1, 1]])
    with torch.no_grad():
        got = toy_model.prompt_encoder._embed_points(points[:, None], labels[:, None], pad=True)[:, 0]
    expected = _meta_point_embedding(meta_sd, points, labels)
    assert got.shape == (2, 4, 256)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_dense_positional_encoding_matches_meta_get_dense_pe(toy_model, meta_sd):
    grid = (torch.arange(64, dtype=torch.float32) + 0.5) / 64
    xy = torch.stack(torch.meshgrid(grid, grid, indexing="xy"), dim=-1)  # [..., 0] = x varies along columns
    projected = 2 * math.pi * ((2 * xy - 1) @ meta_sd[GAUSSIAN])
    expected = torch.cat([projected.sin(), projected.cos()], dim=-1).permute(2, 0, 1)[None]
    with torch.no_grad():
        got = toy_model.get_image_wide_positional_embeddings()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_vision_encoder_fpn_matches_meta_neck(toy_model, meta_sd):
    pixels = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fpn = toy_model.vision_encoder(pixels).fpn_hidden_states
        stages = toy_model.vision_encoder.backbone(pixels).intermediate_hidden_states
    assert [tuple(f.shape) for f in fpn] == [(1, 256, 256, 256), (1, 256, 128, 128), (1, 256, 64, 64)]

    # Meta FpnNeck: convs[j] is the lateral conv of stage 3 - j; top-down (nearest x2) sum only into
    # levels in fpn_top_down_levels = [2, 3]; scalp 1 drops the coarsest level (stage 3).
    def lateral(stage: int) -> torch.Tensor:
        prefix = f"image_encoder.neck.convs.{3 - stage}.conv."
        x = stages[stage].permute(0, 3, 1, 2)
        return F.conv2d(x, meta_sd[prefix + "weight"], meta_sd[prefix + "bias"])

    with torch.no_grad():
        level3 = lateral(3)
        level2 = lateral(2) + F.interpolate(level3, scale_factor=2.0, mode="nearest")
        expected = [lateral(0), lateral(1), level2]
    for got, want in zip(fpn, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
