"""Typed, validated configuration objects. `VirtueConfig` alone describes a model; it is `config.json`
of the library layout."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from virtue.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# One version per on-disk format change, so that old files fail loudly instead of loading wrongly.
FORMAT_VERSION = 1


def dataclass_from_dict(cls, data: dict[str, Any], where: str):
    """Build a config dataclass from a dict, naming unknown keys and bad values."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected an object, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    try:
        return cls(**data)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from exc


@dataclass(frozen=True)
class CompatConfig:
    """One flag per reproduced quirk of the official code. On for the released checkpoints (they were
    trained with these quirks), off for models trained by this library.

    Attributes:
        sam_input_from_qwen_pixels: SAM receives the Qwen-resized, CLIP-normalised image, ImageNet-normalised
            a second time (virtue-spec §10.1). When False SAM receives the original image, normalised once.
        boxes_in_raw_pixels: boxes reach SAM as raw original-image pixels, read by SAM as if they were in its
            1024x1024 frame (virtue-spec §10.2, the SCaR training convention). When False boxes are scaled
            into the SAM frame like points are.
        eval_image_resize: (width, height) every image is squashed to before preprocessing in the official
            evaluation (1344x1344, virtue-spec §10.5); used by the eval harness, `None` for native aspect.
        exif_orientation: a user's photo is turned upright as its EXIF orientation says before anything else,
            so that a box drawn on the photo as displayed lands on the right pixels. Off for the released
            checkpoints (the official code reads stored pixels). Dataset rows always use stored pixels, since
            their boxes were drawn in them (`EmbedInput.stored_pixels`).
    """

    sam_input_from_qwen_pixels: bool = False
    boxes_in_raw_pixels: bool = False
    eval_image_resize: tuple[int, int] | None = None
    exif_orientation: bool = True

    def __post_init__(self):
        if self.eval_image_resize is not None:
            size = tuple(int(v) for v in self.eval_image_resize)
            if len(size) != 2 or min(size) <= 0:
                raise ConfigError(f"compat.eval_image_resize: expected [width, height] > 0, got {size}")
            object.__setattr__(self, "eval_image_resize", size)

    @classmethod
    def official(cls) -> CompatConfig:
        return cls(sam_input_from_qwen_pixels=True, boxes_in_raw_pixels=True, eval_image_resize=(1344, 1344),
                   exif_orientation=False)

    @classmethod
    def clean(cls) -> CompatConfig:
        return cls()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CompatConfig:
        data = dict(data)
        # Configs saved before the flag existed: the official quirks mean the official reading of pixels.
        data.setdefault("exif_orientation", not data.get("sam_input_from_qwen_pixels", False))
        return dataclass_from_dict(cls, data, "compat")


@dataclass(frozen=True)
class ImageProcessingConfig:
    """Qwen2-VL image preprocessing (virtue-spec §2.1)."""

    min_pixels: int = 28 * 28 * 4
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self):
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ConfigError(
                f"image_processing: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}"
            )
        for name in ("patch_size", "merge_size", "temporal_patch_size"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"image_processing.{name}: must be > 0, got {getattr(self, name)}")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ImageProcessingConfig:
        return dataclass_from_dict(cls, data, "image_processing")


@dataclass(frozen=True)
class SamBranchConfig:
    """The SAM2 region branch.

    Attributes:
        sam2: kwargs of `transformers.Sam2Config` (vision, prompt encoder, mask decoder).
        points_per_side: k of the k x k point grid used when an image has no prompt (one k^2-point prompt).
        reducer_kernel: kernel = stride of the Conv2d that turns the 64x64 map into (64/k)^2 tokens.
        enabled: False builds a model without the SAM branch (text and Qwen image tokens only).
    """

    sam2: dict[str, Any] = field(default_factory=dict)
    points_per_side: int = 3
    reducer_kernel: int = 4
    enabled: bool = True

    def __post_init__(self):
        object.__setattr__(self, "sam2", json.loads(json.dumps(self.sam2)))
        if self.points_per_side < 1:
            raise ConfigError(f"sam.points_per_side: must be >= 1, got {self.points_per_side}")
        if self.reducer_kernel < 1:
            raise ConfigError(f"sam.reducer_kernel: must be >= 1, got {self.reducer_kernel}")

    @property
    def image_size(self) -> int:
        return int(self.sam2.get("prompt_encoder_config", {}).get("image_size", 1024))

    @property
    def embed_grid(self) -> int:
        """Side of the image embedding the mask decoder sees (64 for 1024 input)."""
        patch = int(self.sam2.get("prompt_encoder_config", {}).get("patch_size", 16))
        return self.image_size // patch

    @property
    def dim(self) -> int:
        return int(self.sam2.get("vision_config", {}).get("fpn_hidden_size", 256))

    @property
    def num_tokens(self) -> int:
        side = self.embed_grid // self.reducer_kernel
        return side * side

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamBranchConfig:
        return dataclass_from_dict(cls, data, "sam")


@dataclass(frozen=True)
class VirtueConfig:
    """Everything needed to build a `VirtueModel` (without weights).

    Attributes:
        backbone: `transformers.Qwen2VLConfig.to_dict()` of the Qwen2-VL backbone.
        sam: the SAM2 branch and connector.
        compat: reproduced quirks of the official code (see `CompatConfig`).
        image_processing: Qwen2-VL preprocessing.
        image_token: placeholder that marks where the image goes in the text.
        pad_token_id: id used for left padding (Qwen's `<|endoftext|>`).
    """

    backbone: dict[str, Any]
    sam: SamBranchConfig = field(default_factory=SamBranchConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)
    image_processing: ImageProcessingConfig = field(default_factory=ImageProcessingConfig)
    image_token: str = "<|image_pad|>"
    pad_token_id: int = 151643
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if not isinstance(self.backbone, dict) or "text_config" not in self.backbone:
            raise ConfigError("backbone: expected a Qwen2VLConfig dict with a 'text_config' entry")
        # Canonical JSON form (e.g. id2label's int keys become strings), so a saved config equals the original.
        object.__setattr__(self, "backbone", json.loads(json.dumps(self.backbone)))
        if self.format_version != FORMAT_VERSION:
            raise ConfigError(
                f"format_version: this library reads version {FORMAT_VERSION}, got {self.format_version}"
            )

    @property
    def hidden_size(self) -> int:
        return int(self.backbone["text_config"]["hidden_size"])

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["model_type"] = "virtue"
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VirtueConfig:
        data = dict(data)
        if data.pop("model_type", "virtue") != "virtue":
            raise ConfigError("model_type: expected 'virtue'")
        sub = {
            "sam": SamBranchConfig.from_dict,
            "compat": CompatConfig.from_dict,
            "image_processing": ImageProcessingConfig.from_dict,
        }
        for key, build in sub.items():
            if key in data:
                data[key] = build(data[key])
        return dataclass_from_dict(cls, data, "config")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> VirtueConfig:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: cannot read config: {exc}") from exc
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> VirtueConfig:
        return dataclasses.replace(self, **changes)


@contextlib.contextmanager
def quiet_transformers():
    """Qwen2-VL configs carry `mrope_section` (and legacy `rope_scaling`); transformers warns on every
    parse although Qwen2-VL reads them. Raise its logger's level only while a config is parsed."""
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def qwen_config(backbone: dict[str, Any]):
    """`transformers.Qwen2VLConfig` from its dict form."""
    from transformers import Qwen2VLConfig

    with quiet_transformers():
        return Qwen2VLConfig.from_dict(backbone)
