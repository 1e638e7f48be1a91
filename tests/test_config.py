from __future__ import annotations

import json

import pytest

from virtue import CompatConfig, ConfigError, ImageProcessingConfig, SamBranchConfig, VirtueConfig
from virtue.model.presets import tiny_config


def test_round_trip_through_json(tmp_path):
    config = tiny_config(compat=CompatConfig.official(), points_per_side=4)
    config.save(tmp_path / "config.json")
    loaded = VirtueConfig.load(tmp_path / "config.json")
    assert loaded == config
    assert loaded.compat.eval_image_resize == (1344, 1344)
    assert loaded.sam.points_per_side == 4 and loaded.sam.num_tokens == 16


def test_unknown_keys_are_named(tmp_path):
    data = tiny_config().to_dict()
    data["compat"]["boxes_in_pixels"] = True
    with pytest.raises(ConfigError, match=r"compat: unknown key\(s\) \['boxes_in_pixels'\]"):
        VirtueConfig.from_dict(data)
    data = tiny_config().to_dict()
    data["colour"] = 1
    with pytest.raises(ConfigError, match="colour"):
        VirtueConfig.from_dict(data)


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: ImageProcessingConfig(min_pixels=10, max_pixels=5), "min_pixels"),
        (lambda: ImageProcessingConfig(patch_size=0), "patch_size"),
        (lambda: SamBranchConfig(points_per_side=0), "points_per_side"),
        (lambda: CompatConfig(eval_image_resize=(0, 10)), "eval_image_resize"),
        (lambda: VirtueConfig(backbone={}), "backbone"),
    ],
)
def test_invalid_values(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_future_format_is_refused(tmp_path):
    data = tiny_config().to_dict()
    data["format_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="format_version"):
        VirtueConfig.load(tmp_path / "config.json")
