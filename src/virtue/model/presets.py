"""Architecture presets built in code: a tiny random VIRTUE for tests, benchmarks and from-scratch
experiments (nothing downloaded), shaped like the real one but small at every level."""

from __future__ import annotations

from virtue.config import CompatConfig, SamBranchConfig, VirtueConfig, quiet_transformers


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
