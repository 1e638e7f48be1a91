"""`VirtueProcessor`: the preprocessing shared by encode, training and evaluation, so they cannot drift."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from virtue.config import VirtueConfig
from virtue.errors import InputError, PromptError
from virtue.inputs import EmbedInput
from virtue.processing.images import image_digest, load_image, prepare_image
from virtue.processing.qwen import QwenImage, qwen_image
from virtue.processing.sam import SamPrompt, sam_pixels, sam_prompt, sam_source
from virtue.processing.text import expand_image_tokens, with_image_token


@dataclass
class PreparedImage:
    """An image ready for the model, on the CPU: the Qwen-normalised image (patches are cut on the device) and
    what SAM's input is resized from on the device (`VirtueProcessor.sam_input`)."""

    qwen: QwenImage
    sam_source: torch.Tensor | None  # uint8 [3, H, W] (clean), None when made from `qwen` (official) or no SAM

    def pin_memory(self) -> PreparedImage:
        source = None if self.sam_source is None else self.sam_source.pin_memory()
        qwen = dataclasses.replace(self.qwen, normalized=self.qwen.normalized.pin_memory())
        return PreparedImage(qwen, source)


@dataclass
class LoadedImage:
    """An input's image after the official pre-resizes, with the key its features are cached under.

    `prepared` holds the model-ready tensors when the image was preprocessed ahead of time (a DataLoader worker,
    `VirtueProcessor.preprocess`); `image` may then be None.
    """

    image: Image.Image | None
    size_wh: tuple[int, int]  # original size, the frame of the prompt coordinates
    key: tuple
    prepared: PreparedImage | None = None


class VirtueProcessor:
    """Tokeniser + image preprocessing + prompt mapping for one model configuration."""

    def __init__(self, config: VirtueConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise InputError(f"tokenizer has no {config.image_token} token")

    def text(self, item: EmbedInput, where: str) -> str:
        return with_image_token(item.text, item.has_image, where)

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def load(self, item: EmbedInput, where: str, resize_to: tuple[int, int] | None) -> LoadedImage:
        if isinstance(item.image, LoadedImage):
            loaded = item.image
            if loaded.key[1] != resize_to:
                raise InputError(f"{where}: image was preprocessed with resize {loaded.key[1]}, asked for {resize_to}")
            self._check_prompt(item, loaded.size_wh, where)
            return loaded
        raw = load_image(item.image, where)
        size = (raw.width, raw.height)
        self._check_prompt(item, size, where)
        image = prepare_image(raw, resize_to)
        return LoadedImage(image, size, (image_digest(image), resize_to))

    @staticmethod
    def _check_prompt(item: EmbedInput, size: tuple[int, int], where: str) -> None:
        if item.prompt is not None:
            try:
                item.prompt.validate(size)
            except PromptError as exc:
                raise PromptError(f"{where}: {exc}") from None

    def preprocess(
        self, item: EmbedInput, where: str, resize_to: tuple[int, int] | None = None, *, done: dict | None = None
    ) -> EmbedInput:
        """The same input with its image decoded and turned into model-ready CPU tensors, so that the work can
        run ahead of the model (DataLoader workers). `done` maps images already preprocessed (same path) to
        their result, so an image shared by several rows is read once."""
        if item.image is None or isinstance(item.image, LoadedImage):
            return item
        identity = item.image_identity()
        loaded = (done or {}).get(identity)
        if loaded is None:
            raw = self.load(item, where, resize_to)
            loaded = LoadedImage(None, raw.size_wh, raw.key, self.prepare_image(raw))
            if done is not None:
                done[identity] = loaded
        else:
            self._check_prompt(item, loaded.size_wh, where)
        return dataclasses.replace(item, image=loaded)

    def prepare_image(self, loaded: LoadedImage) -> PreparedImage:
        """The CPU part of an image's preprocessing (what a background worker can do ahead of the model)."""
        if loaded.prepared is not None:
            return loaded.prepared
        qwen = qwen_image(loaded.image, self.config.image_processing)
        source = sam_source(loaded.image, self.config.compat) if self.config.sam.enabled else None
        return PreparedImage(qwen, source)

    def sam_input(self, prepared: PreparedImage, device: torch.device | str = "cpu") -> torch.Tensor:
        """SAM's [3, S, S] input, resized and normalised on `device`."""
        return sam_pixels(prepared.sam_source, prepared.qwen, self.config.sam.image_size, self.config.compat, device)

    def image_row_ids(self, text: str, num_visual_tokens: int) -> list[int]:
        return expand_image_tokens(self.token_ids(text), self.image_token_id, num_visual_tokens)

    def sam_prompt(self, item: EmbedInput, size_wh: tuple[int, int], mask_size: int) -> SamPrompt:
        sam = self.config.sam
        return sam_prompt(
            item.prompt,
            size_wh,
            sam_size=sam.image_size,
            mask_size=mask_size,
            points_per_side=sam.points_per_side,
            compat=self.config.compat,
        )
