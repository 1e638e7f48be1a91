"""`VirtueProcessor`: the preprocessing shared by encode, training and evaluation, so they cannot drift."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from PIL import Image

from virtue.config import VirtueConfig
from virtue.errors import InputError, PromptError
from virtue.inputs import EmbedInput
from virtue.processing.images import MAX_IMAGE_PIXELS, image_digest, load_image, prepare_image
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
        # Images above this many pixels are refused from their header, before decoding (None: no limit).
        self.max_image_pixels: int | None = MAX_IMAGE_PIXELS
        text = config.backbone["text_config"]
        self.max_positions = int(text.get("max_position_embeddings") or 32768)

    def text(self, item: EmbedInput, where: str) -> str:
        return with_image_token(item.text, item.has_image, where)

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def exif_transpose(self, item: EmbedInput) -> bool:
        """Whether this input's image is turned upright by its EXIF orientation (see `CompatConfig`)."""
        return self.config.compat.exif_orientation and not item.stored_pixels

    def length_limit(self, has_image: bool, max_length: int | None = None) -> int:
        """Tokens a row may hold: the model's positions, less the segmentation tokens' for an image row (they
        take positions 0 and push the text to 256 + j), or `max_length` when smaller."""
        limit = self.max_positions - (self.config.sam.num_tokens if has_image and self.config.sam.enabled else 0)
        return limit if max_length is None else min(limit, max_length)

    def row_ids(self, item: EmbedInput, where: str, num_visual_tokens: int | None = None, *,
                max_length: int | None = None, truncate: bool = False) -> list[int]:
        """Token ids of a row (the image placeholder expanded to `num_visual_tokens` copies for an image row).

        Past the limit (`length_limit`): an InputError naming the input by default; with `truncate`, text tokens
        are cut from the end (the image's tokens are kept whole).
        """
        ids = self.token_ids(self.text(item, where))
        if num_visual_tokens is not None:
            ids = expand_image_tokens(ids, self.image_token_id, num_visual_tokens)
        limit = self.length_limit(num_visual_tokens is not None, max_length)
        if len(ids) <= limit:
            return ids
        image = sum(1 for t in ids if t == self.image_token_id) if num_visual_tokens is not None else 0
        if not truncate or image > limit:
            what = f" ({image:,} of them the image's)" if image else ""
            hint = "shorten the text or pass truncate=True" if image <= limit else "use a smaller image"
            raise InputError(f"{where}: {len(ids):,} tokens{what}, above the limit of {limit:,} "
                             f"({'max_length' if max_length is not None and max_length < len(ids) else 'model'}"
                             f" positions); {hint}")
        excess = len(ids) - limit
        kept = []
        for token in reversed(ids):  # drop the last text tokens, never an image token
            if excess and token != self.image_token_id:
                excess -= 1
                continue
            kept.append(token)
        return kept[::-1]

    def load(self, item: EmbedInput, where: str, resize_to: tuple[int, int] | None) -> LoadedImage:
        if isinstance(item.image, LoadedImage):
            loaded = item.image
            if loaded.key[1] != resize_to:
                raise InputError(f"{where}: image was preprocessed with resize {loaded.key[1]}, asked for {resize_to}")
            self._check_prompt(item, loaded.size_wh, where)
            return loaded
        raw = load_image(item.image, where, max_pixels=self.max_image_pixels,
                         exif_transpose=self.exif_transpose(item))
        size = (raw.width, raw.height)
        self._check_prompt(item, size, where)
        image = prepare_image(raw, resize_to, where)
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
