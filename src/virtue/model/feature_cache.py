"""Per-image work done once: SAM2 image embeddings and Qwen vision-tower outputs, keyed by image content
and preprocessing."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class ImageFeatures:
    """What the model computes from an image alone, before any prompt or text.

    Attributes:
        vision: [num_visual_tokens, hidden] Qwen ViT + merger output.
        sam: [C, 64, 64] SAM2 image embedding (None when the SAM branch is disabled).
        size_wh: original image size (prompt coordinates refer to it).
    """

    vision: torch.Tensor
    sam: torch.Tensor | None
    size_wh: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.vision.shape[0]


class FeatureCache:
    """Bounded LRU of `ImageFeatures`. The key must cover everything the features depend on besides the
    weights: image content and preprocessing; a cache lives no longer than one set of weights (one call)."""

    def __init__(self, capacity: int = 32):
        self.capacity = max(1, capacity)
        self._items: OrderedDict[tuple, ImageFeatures] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> ImageFeatures | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return item

    def put(self, key: tuple, features: ImageFeatures) -> None:
        self._items[key] = features
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
