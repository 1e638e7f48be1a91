"""Architecture presets built in code: a tiny random VIRTUE for tests, benchmarks and from-scratch
experiments (nothing downloaded), shaped like the real one but small at every level."""

from __future__ import annotations

from virtue.config import CompatConfig, ImageProcessingConfig, SamBranchConfig, VirtueConfig, quiet_transformers


def tiny_config(
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    sam_image_size: int = 256,
    sam_dim: int = 32,
    points_per_side: int = 3,
    sam_enabled: bool = True,
    vision_depth: int = 1,
    vision_dim: int = 32,
    compat: CompatConfig | None = None,
) -> VirtueConfig:
    """A few-million-parameter VIRTUE (most of it the 151,936-token embedding) for the Qwen2 tokenizer.

    The SAM2 branch keeps SAM2's structure (Hiera with 4 stages, FPN, prompt encoder, two-way transformer)
    at `sam_image_size` input and `sam_dim` channels; 256 px gives a 16x16 map and 16 segmentation tokens.
    """
    from transformers import Qwen2VLConfig

    head_dim = hidden_size // 4
    quarter = head_dim // 2  # rotary frequencies, split over M-RoPE's three axes
    section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    with quiet_transformers():
        backbone = Qwen2VLConfig(
            text_config=dict(
                hidden_size=hidden_size,
                intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=151936,
                rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 1e6},
            ),
            vision_config=dict(depth=vision_depth, embed_dim=vision_dim, num_heads=2, hidden_size=hidden_size,
                               mlp_ratio=2),
            image_token_id=151655,
        ).to_dict()
    s = sam_image_size
    sam2 = dict(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam2_hiera_det_model",
                hidden_size=8,
                num_attention_heads=1,
                blocks_per_stage=[1, 1, 2, 1],
                embed_dim_per_stage=[8, 16, 32, 64],
                num_attention_heads_per_stage=[1, 1, 2, 2],
                global_attention_blocks=[3],
                image_size=[s, s],
            ),
            backbone_channel_list=[64, 32, 16, 8],
            fpn_hidden_size=sam_dim,
            backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
        ),
        prompt_encoder_config=dict(hidden_size=sam_dim, image_size=s, mask_input_channels=8),
        mask_decoder_config=dict(hidden_size=sam_dim, mlp_dim=2 * sam_dim, num_attention_heads=2,
                                 iou_head_hidden_dim=sam_dim),
    )
    return VirtueConfig(
        backbone=backbone,
        sam=SamBranchConfig(sam2=sam2, points_per_side=points_per_side, enabled=sam_enabled),
        compat=compat or CompatConfig.clean(),
    )


# ------------------------------------------------------------------------------------------------------------------
# Real sizes (random weights, nothing downloaded): what speed and memory are measured on.

# Qwen2-VL-{2B,7B}-Instruct's config.json (hub), written out; virtue-spec §1.
QWEN2_VL = {
    "2b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, num_heads=16, mlp_ratio=4, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, in_channels=3, hidden_act="quick_gelu")


def real_config(
    size: str = "2b",
    *,
    num_layers: int | None = None,
    vision_depth: int | None = None,
    intermediate_size: int | None = None,
    sam_enabled: bool = True,
    compat: CompatConfig | None = None,
) -> VirtueConfig:
    """VIRTUE-2B or -7B with the real dimensions: Qwen2-VL-{2B,7B} (LLM + ViT) and SAM2.1 Hiera-B+ at 1024².

    num_layers / vision_depth / intermediate_size shrink the LLM's depth, the ViT's depth or the FFN while keeping
    every width (e.g. a 1-layer model of 2B's width for memory tests).
    """
    if size not in QWEN2_VL:
        raise ValueError(f"size: expected one of {sorted(QWEN2_VL)}, got {size!r}")
    text = dict(QWEN2_VL[size], max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    if num_layers is not None:
        text["num_hidden_layers"] = num_layers
    if intermediate_size is not None:
        text["intermediate_size"] = intermediate_size
    vision = dict(QWEN2_VL_VISION, hidden_size=text["hidden_size"])
    if vision_depth is not None:
        vision["depth"] = vision_depth
    return _config(text, vision, sam2_hiera_b_plus(), sam_enabled, compat)


def mid_config(*, sam_enabled: bool = True, compat: CompatConfig | None = None) -> VirtueConfig:
    """A quarter of VIRTUE-2B's width at every level, shallower: big enough that model time and preprocessing
    time are of the same order on a CPU (the pipeline benchmark), small enough to run there.

    LLM 384 wide (3 heads of 128, as 2B's head size), 2 layers; ViT 320 wide, 2 blocks, at most 256 visual
    tokens per image (200,704 pixels); SAM2 Hiera at half B+'s width, 5 blocks, 512² input (32x32 map, 64
    segmentation tokens).
    """
    text = dict(hidden_size=384, intermediate_size=2240, num_hidden_layers=2, num_attention_heads=3,
                num_key_value_heads=1, vocab_size=151936, tie_word_embeddings=True, rms_norm_eps=1e-6,
                max_position_embeddings=32768, hidden_act="silu",
                rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1e6})
    vision = dict(QWEN2_VL_VISION, depth=2, embed_dim=320, num_heads=4, hidden_size=384)
    s = 512
    sam2 = dict(
        vision_config=dict(
            backbone_config=dict(
                model_type="sam2_hiera_det_model", hidden_size=56, num_attention_heads=1,
                blocks_per_stage=[1, 1, 2, 1], embed_dim_per_stage=[56, 112, 224, 448],
                num_attention_heads_per_stage=[1, 2, 4, 8], global_attention_blocks=[3],
                window_size_per_stage=[8, 4, 14, 7], window_positional_embedding_background_size=[7, 7],
                image_size=[s, s],
            ),
            backbone_channel_list=[448, 224, 112, 56],
            fpn_hidden_size=128,
            backbone_feature_sizes=[[s // 4, s // 4], [s // 8, s // 8], [s // 16, s // 16]],
        ),
        prompt_encoder_config=dict(hidden_size=128, image_size=s, mask_input_channels=16),
        mask_decoder_config=dict(hidden_size=128, mlp_dim=1024, num_attention_heads=8, iou_head_hidden_dim=128),
    )
    config = _config(text, vision, sam2, sam_enabled, compat)
    return config.replace(image_processing=ImageProcessingConfig(max_pixels=28 * 28 * 256))


def sam2_hiera_b_plus() -> dict:
    """`Sam2Config` kwargs of SAM2.1 Hiera-B+, the SAM2 all VIRTUE checkpoints use (from Meta's yaml, built in)."""
    from virtue.checkpoints.sam2_config import B_PLUS_META_CONFIG, sam2_config_from_meta

    return sam2_config_from_meta(B_PLUS_META_CONFIG, source="built-in SAM2.1 Hiera-B+ config")


def _config(text: dict, vision: dict, sam2: dict, sam_enabled: bool, compat: CompatConfig | None) -> VirtueConfig:
    from transformers import Qwen2VLConfig

    with quiet_transformers():
        backbone = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=151655).to_dict()
    return VirtueConfig(
        backbone=backbone,
        sam=SamBranchConfig(sam2=sam2, points_per_side=3, enabled=sam_enabled),
        compat=compat or CompatConfig.clean(),
    )


PRESETS = {"tiny": tiny_config, "mid": mid_config, "2b": lambda **kw: real_config("2b", **kw),
           "7b": lambda **kw: real_config("7b", **kw)}
