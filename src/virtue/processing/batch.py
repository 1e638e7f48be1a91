"""`VirtueProcessor`: the preprocessing shared by encode, training, evaluation and the HTTP service, so they
cannot drift: input checks before any compute, token ids, batch planning, image decoding and preparation."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from virtue.config import VirtueConfig
from virtue.errors import ImageError, InputError, PromptError
from virtue.images import MAX_IMAGE_PIXELS, check_pixels, header_size, load_image
from virtue.inputs import EmbedInput
from virtue.processing.images import image_digest, prepare_image, prepared_size
from virtue.processing.qwen import QwenImage, qwen_image, smart_resize
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


@dataclass(frozen=True, eq=False)
class CheckedInput(EmbedInput):
    """An input that passed `VirtueProcessor.check_inputs`, with its token ids as the model reads them (the image
    placeholder expanded to the image's visual tokens) and the length settings they were computed for. `encode`
    takes it like any input and does not tokenise it again when its settings match the call's."""

    token_ids: tuple[int, ...] = ()
    checked_for: tuple | None = None  # `length_settings(...)` of the check


def length_settings(image_resize: tuple[int, int] | None, max_length: int | None, truncate: bool) -> tuple:
    """What an input's token ids depend on besides the input itself (the key `CheckedInput.checked_for`)."""
    return (None if image_resize is None else tuple(image_resize), max_length, bool(truncate))


class VirtueProcessor:
    """Tokeniser + input checks + batch planning + image preprocessing + prompt mapping for one model
    configuration. Needs no weights, so the HTTP service checks and counts requests with the model's own
    processor before queueing them."""

    def __init__(self, config: VirtueConfig, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        # Request threads of the HTTP service tokenise while the model thread does: one caller at a time.
        self._tokenizer_lock = threading.Lock()
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
        with self._tokenizer_lock:
            return list(self.tokenizer(text)["input_ids"])

    def __getstate__(self) -> dict[str, Any]:  # copies and pickles (DataLoader workers) get their own lock
        state = dict(self.__dict__)
        del state["_tokenizer_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tokenizer_lock = threading.Lock()

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

    # ------------------------------------------------------------------------- checks before any compute
    def check_inputs(
        self,
        items: Sequence[EmbedInput],
        *,
        image_resize: tuple[int, int] | None = None,
        max_length: int | None = None,
        truncate: bool = False,
        names: Sequence[str] | None = None,
    ) -> list[CheckedInput]:
        """Check every input before any compute: its image readable (a file's header only, once per image) and
        not above `max_image_pixels`, its prompt inside the image (as displayed, when EXIF rotates it) and
        readable by the model (a SAM branch), its image placeholders, its length. Inputs already checked for the
        same settings keep their token ids (they are not tokenised again).

        names: how errors name each input (default "input {i}").
        Raises one error naming every bad input (its type when all problems share one, else `InputError`).
        Returns the inputs as `CheckedInput`s, in order, each with its token ids as the model reads them.
        """
        settings = length_settings(image_resize, max_length, truncate)
        problems: list[InputError] = []
        sizes: dict[Any, tuple[int, int]] = {}  # image identity -> size: k prompts on one photo, one header
        checked: list[CheckedInput] = []
        for i, item in enumerate(items):
            where = names[i] if names is not None else f"input {i}"
            try:
                visual = None
                if item.has_image:
                    if item.prompt is not None and not self.config.sam.enabled:
                        raise PromptError(f"{where}: this model has no SAM branch, so it cannot read a visual prompt")
                    size = sizes.get(item.image_identity())
                    if size is None:
                        size = sizes[item.image_identity()] = self.displayed_size(item, where)
                    self.check_prompt(item, size, where)
                    visual = self.visual_tokens_for_size(size, image_resize, where)
                if isinstance(item, CheckedInput) and item.checked_for == settings:
                    checked.append(item)
                    continue
                ids = self.row_ids(item, where, visual, max_length=max_length, truncate=truncate)
                checked.append(as_checked(item, ids, settings))
            except InputError as exc:
                problems.append(exc)
        if len(problems) == 1:
            raise problems[0]
        if problems:
            kinds = {type(p) for p in problems}
            kind = kinds.pop() if len(kinds) == 1 else InputError
            raise kind(f"{len(problems)} bad inputs: " + "; ".join(str(p) for p in problems))
        return checked

    def displayed_size(self, item: EmbedInput, where: str) -> tuple[int, int]:
        """(width, height) of an input's image as the model will see it (upright when EXIF turns it), from the
        header alone; ImageError naming `where` if it cannot be read, is empty or is above the pixel limit."""
        image = item.image
        if isinstance(image, LoadedImage):
            return image.size_wh
        if isinstance(image, np.ndarray):
            return load_image(image, where, max_pixels=self.max_image_pixels).size
        if not isinstance(image, (str, Path, Image.Image)):
            raise ImageError(f"{where}: expected a path, PIL image or numpy array, got {type(image).__name__}")
        size = header_size(image, where, self.exif_transpose(item))
        check_pixels(size, self.max_image_pixels, where)
        if size[0] == 0 or size[1] == 0:
            raise ImageError(f"{where}: image is empty ({size[0]}x{size[1]})")
        return size

    def visual_tokens_for_size(
        self, size_wh: tuple[int, int], image_resize: tuple[int, int] | None = None, where: str | None = None
    ) -> int:
        """Visual tokens (after the 2x2 merge) of an image of `size_wh` (width, height, as displayed), after the
        official pre-resizes and Qwen2-VL's `smart_resize`; ImageError for an aspect ratio it cannot resize."""
        w, h = prepared_size(size_wh, image_resize)
        try:
            h, w = smart_resize(h, w, self.config.image_processing)
        except ImageError as exc:
            if where is None:
                raise
            raise ImageError(f"{where}: {exc}") from None
        return h * w // self.config.image_processing.factor ** 2

    def sequence_length(self, item: CheckedInput) -> int:
        """Tokens the language model reads for a checked input: its token ids, plus the SAM2 branch's
        segmentation tokens in front of an image row (what the OpenAI route reports as usage)."""
        segmentation = self.config.sam.num_tokens if item.has_image and self.config.sam.enabled else 0
        return len(item.token_ids) + segmentation

    @staticmethod
    def plan_batches(items: Sequence[CheckedInput], batch_size: int) -> Iterable[list[int]]:
        """Batches of indices into `items`: text rows sorted by length; image rows grouped by image (features
        reused), the images ordered by the length of their first row (its visual tokens, mostly), so that the
        rows of a batch pad little. The order changes no vector (embeddings do not depend on the batch)."""
        text = [i for i, it in enumerate(items) if not it.has_image]
        text.sort(key=lambda i: -len(items[i].token_ids))
        first_seen: dict[Any, int] = {}
        image = [i for i, it in enumerate(items) if it.has_image]
        for i in image:
            first_seen.setdefault(items[i].image_identity(), i)
        image.sort(key=lambda i: (-len(items[first_seen[items[i].image_identity()]].token_ids),
                                  first_seen[items[i].image_identity()], i))
        for group in (text, image):
            for start in range(0, len(group), batch_size):
                yield group[start : start + batch_size]

    # ------------------------------------------------------------------------- images
    def load(self, item: EmbedInput, where: str, resize_to: tuple[int, int] | None) -> LoadedImage:
        if isinstance(item.image, LoadedImage):
            loaded = item.image
            if loaded.key[1] != resize_to:
                raise InputError(f"{where}: image was preprocessed with resize {loaded.key[1]}, asked for {resize_to}")
            self.check_prompt(item, loaded.size_wh, where)
            return loaded
        raw = load_image(item.image, where, max_pixels=self.max_image_pixels,
                         exif_transpose=self.exif_transpose(item))
        size = (raw.width, raw.height)
        self.check_prompt(item, size, where)
        image = prepare_image(raw, resize_to, where)
        return LoadedImage(image, size, (image_digest(image), resize_to))

    @staticmethod
    def check_prompt(item: EmbedInput, size: tuple[int, int], where: str) -> None:
        """PromptError naming `where` unless the input's prompt lies inside an image of `size` (W, H)."""
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
            self.check_prompt(item, loaded.size_wh, where)
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


def as_checked(item: EmbedInput, token_ids: Sequence[int], settings: tuple) -> CheckedInput:
    """`item` (any field kept) as a `CheckedInput` with these token ids."""
    fields = {f.name: getattr(item, f.name) for f in dataclasses.fields(EmbedInput)}
    return CheckedInput(**fields, token_ids=tuple(token_ids), checked_for=settings)
