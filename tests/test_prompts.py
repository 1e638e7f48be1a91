from __future__ import annotations

import numpy as np
import pytest

from virtue import Box, Mask, Points, PromptError
from virtue.inputs import parse_input


def test_points_forms():
    assert Points([3, 4]).xy == ((3.0, 4.0),) and Points([3, 4]).labels == (1,)
    p = Points([[1, 2], [3, 4]], [1, 0])
    assert p.labels == (1, 0)
    with pytest.raises(PromptError, match="2 points but 1 labels"):
        Points([[1, 2], [3, 4]], [1])
    with pytest.raises(PromptError, match="finite"):
        Points([[1, float("nan")]])


def test_box_from_coco_xywh():
    assert Box.from_xywh([162, 226, 131, 185]).xyxy == (162, 226, 293, 411)


def test_mask_accepts_0_255_and_rgb():
    m = np.zeros((4, 5, 3), np.uint8)
    m[1:3, 1:4] = 255
    mask = Mask(m)
    assert mask.array.dtype == bool and mask.array.sum() == 6
    mask.validate((5, 4))
    with pytest.raises(PromptError, match="does not match"):
        mask.validate((4, 5))


def test_dict_aliases_and_prompt_parts(tmp_path):
    item = parse_input({"image": np.zeros((8, 8, 3), np.uint8), "bbox": [1, 1, 5, 5], "point": [2, 2]}, 0)
    assert item.prompt.box.xyxy == (1, 1, 5, 5) and item.prompt.points.xy == ((2.0, 2.0),)
    with pytest.raises(PromptError, match="labels' given without 'points'"):
        parse_input({"image": np.zeros((8, 8, 3), np.uint8), "labels": [1]}, 4)
