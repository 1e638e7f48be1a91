"""VIRTUE as a sentence-transformers (6.x) model.

    from sentence_transformers import SentenceTransformer
    model = SentenceTransformer("./virtue-2b", trust_remote_code=True)   # a folder written by `virtue`
    queries = model.encode_query([{"image": "photo.jpg", "box": [120, 40, 380, 300]}])
    captions = model.encode_document(["a dog on a sofa", "a cat on a sofa"])

Every library-layout folder (`VirtueModel.save_pretrained`, `virtue convert`, `virtue export`) carries the
sentence-transformers files (`write_sentence_transformers_files`): a pipeline of `VirtueModule` (this package's
module: inputs -> the model's last-token hidden state) and ST's own `Normalize`, VIRTUE's instructions as `prompts`,
and `requirements` that name the `virtue` package the module class is imported from. sentence-transformers 6 asks
for `trust_remote_code=True` for any module class outside its own package; nothing is downloaded, the class comes
from the installed `virtue`.

Inputs are those of `VirtueModel.encode`: a string is a text, a PIL image / `pathlib.Path` / H x W x C array an
image, and a dict may hold `image`, `text` and VIRTUE's visual prompts `box` / `points` + `labels` / `mask` (ST's
modality names cover text and image only; the extra keys reach this module untouched). Two ST conventions are
followed where `VirtueModel.encode` says otherwise: a string that ST itself reads as an image (the path of an
existing image file) is an image, and chat messages (`{"role": ..., "content": [...]}`) are accepted.

Prompts are instructions, not prefixes: `apply_prompt` writes one where the official evaluation writes the
instruction for that kind of input (see its docstring). Without a prompt (plain `encode`, `encode_document`), an
input is embedded exactly as `VirtueModel.encode` embeds it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from virtue.checkpoints.st_files import (
    MODALITY_CONFIG,
    MODULE_CONFIG_FILE,
    OUTPUT_NAME,
    PROMPTS,
    ST_CONFIG_FILE,
    json_modality_config,
    module_config,
    requirements,
    write_sentence_transformers_files,
)
from virtue.errors import ConfigError, InputError
from virtue.inputs import EmbedInput, parse_input
from virtue.processing.text import (
    DATASET_IMAGE_TOKEN,
    IMAGE_TOKEN,
    mmeb_query_text,
    scar_query_text,
)

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from virtue.model.embedder import VirtueModel

try:
    from sentence_transformers.base.modules import InputModule as _InputModule
except ImportError:  # the `st` extra is optional; saving still writes the files, loading needs the package

    class _InputModule(nn.Module):  # type: ignore[no-redef]
        """Stand-in base when sentence-transformers is not installed: building the module says what to install."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError('VirtueModule needs sentence-transformers 6: pip install "virtue[st]"')


# ----------------------------------------------------------------------------------------------- prompts
def apply_prompt(item: EmbedInput, prompt: str | None, where: str = "input") -> EmbedInput:
    """Write instruction `prompt` into an input's text the way the official evaluations write instructions.

    A prompt is an instruction (ST prepends its prompts; VIRTUE's checkpoints were trained on these layouts):

    * region query (an image with a box, points or a mask; SCaR): `"<|image_pad|> \\n{prompt}[ {text}]\\n"` and,
      with a box, `"Referring object bbox: [x1, y1, x2, y2]"` (pixels, as given), i.e. `scar_query_text(box,
      prompt)`: the default "query" prompt gives SCaR's official query text;
    * image without a visual prompt (MMEB image query or candidate): `mmeb_query_text(prompt, text)`, i.e.
      `"<|image_pad|> {prompt} {text}\\n"`; a prompt written as MMEB stores it, with a leading `<|image_1|>\\n`,
      puts the instruction on its own line as the official code does;
    * text only (MMEB text-to-image query): `"{prompt} {text}\\n"`.

    An empty prompt leaves the input as it is. A text that already holds the image placeholder is a finished query
    text, so adding an instruction to it is refused (encode it without a prompt).
    """
    if not prompt:
        return item
    text = item.text or ""
    if IMAGE_TOKEN in text or DATASET_IMAGE_TOKEN in text:
        raise InputError(
            f"{where}: the text already holds the image placeholder (a finished query text), so the prompt "
            f"{_short(prompt)} cannot be added; encode it with prompt='' (or with `encode`, which applies none)"
        )
    if item.image is None:
        new_text = mmeb_query_text(prompt, text, with_image=False, family="t2i")
    elif item.prompt is None:
        new_text = mmeb_query_text(prompt, text, family="cls")
    else:
        body = " ".join(p for p in (prompt.replace(DATASET_IMAGE_TOKEN, "").strip(), text) if p)
        box = item.prompt.box
        new_text = scar_query_text(box.xyxy, body) if box is not None else f"{IMAGE_TOKEN} \n{body}\n"
    return dataclasses.replace(item, text=new_text)  # keeps every other field (image, prompt, flags)


# ----------------------------------------------------------------------------------------------- inputs
def _short(value: Any, limit: int = 60) -> str:
    """A compact, address-free description of one value, for error messages."""
    if isinstance(value, Image.Image):
        return f"<PIL image {value.mode} {value.width}x{value.height}>"
    if isinstance(value, np.ndarray):
        return f"<array {'x'.join(map(str, value.shape))} {value.dtype}>"
    if isinstance(value, torch.Tensor):
        return f"<tensor {'x'.join(map(str, value.shape))} {value.dtype}>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_short(v, 40)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)) and any(isinstance(v, (dict, Image.Image, np.ndarray)) for v in value):
        return "[" + ", ".join(_short(v, 40) for v in value) + "]"
    text = repr(str(value) if isinstance(value, Path) else value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe_input(value: Any) -> str:
    """How errors name an input. ST sorts inputs by length before batching and does not tell a module their
    positions, so an input is named by what it is, e.g. `input {'image': <PIL image RGB 240x160>, 'boxx': [...]}`."""
    return f"input {_short(value)}"


_ROWS = re.compile(r"(^|; |bad inputs: )input (\d+): ")


def _string_input(value: str, where: str) -> Any:
    """ST reads a string that names an existing image file (or an image URL / data URI) as an image; so does this
    module for local files, so that `model.encode(["photo.jpg", "a caption"])` means what ST users expect."""
    from sentence_transformers.base.modality import is_image_url_or_path

    if not is_image_url_or_path(value):
        return value
    if value.startswith(("http://", "https://", "data:")):
        raise InputError(f"{where}: image URLs and data URIs are not fetched or decoded here; pass a PIL image or a "
                         "local path (or {'text': ...} if this string is a text)")
    return Path(value)


def _from_messages(value: Any, where: str) -> tuple[dict[str, Any], str | None]:
    """A chat-style input (ST's "message" modality) -> VIRTUE dict and its system instruction, if any.

    Accepts one message or a list: role "user" (content a string, or parts `{"type": "text", "text": ...}` /
    `{"type": "image", "image": ...}`, at most one image; texts joined by newlines) and optionally role "system"
    (text only), which is the input's instruction in place of the call's prompt.
    """
    messages = [value] if isinstance(value, dict) else list(value)
    out: dict[str, Any] = {}
    texts: dict[str, list[str]] = {"user": [], "system": []}
    for message in messages:
        role = message.get("role") if isinstance(message, dict) else None
        if role not in texts:
            raise InputError(f"{where}: message role {role!r} is not supported; expected 'user' (and 'system')")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(parts, list):
            raise InputError(f"{where}: message 'content' must be a string or a list of parts")
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts[role].append(part["text"])
            elif kind == "image" and role == "user" and "image" not in out:
                out["image"] = part.get("image")
            elif kind == "image":
                raise InputError(f"{where}: one image per input, in a 'user' message")
            else:
                raise InputError(f"{where}: message part {_short(part)} is not supported; expected "
                                 "{'type': 'text', 'text': ...} or {'type': 'image', 'image': ...}")
    if texts["user"]:
        out["text"] = "\n".join(texts["user"])
    return out, ("\n".join(texts["system"]) or None)


def _is_message(value: Any) -> bool:
    if isinstance(value, dict):
        return "role" in value and "content" in value
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def to_embed_input(value: Any, prompt: str | None = None) -> EmbedInput:
    """One ST input -> a validated `EmbedInput` with `prompt` applied (`apply_prompt`); errors name the input."""
    where = describe_input(value)
    if isinstance(value, str):
        value = _string_input(value, where)
    elif _is_message(value):
        value, system = _from_messages(value, where)
        prompt = system if system is not None else prompt
    return apply_prompt(parse_input(value, where=where), prompt, where)


# ----------------------------------------------------------------------------------------------- the module
class VirtueModule(_InputModule):
    """The input module of a VIRTUE SentenceTransformer: inputs (with VIRTUE's visual prompts) -> embeddings.

    `preprocess` parses and validates the inputs and writes the prompt into their texts (`apply_prompt`); `forward`
    runs `VirtueModel.encode` on the batch and stores the last-token hidden state under `sentence_embedding`, which
    the `Normalize` module after it L2-normalises: the vectors equal `VirtueModel.encode`'s.

    Args:
        model: the loaded `VirtueModel`.
        modality_config: ST's modality config (default `MODALITY_CONFIG`); its keys are `model.modalities`.
        module_output_name: the feature this module writes ("sentence_embedding").
        image_resize: (W, H) to squash every image to first (the official evaluation: (1344, 1344)); per call as
            `encode(..., image_resize=...)`.
    """

    config_file_name = MODULE_CONFIG_FILE
    config_keys = ["modality_config", "module_output_name", "image_resize"]
    save_in_root = True
    forward_kwargs = {"image_resize"}

    def __init__(
        self,
        model: VirtueModel,
        *,
        modality_config: dict[Any, dict[str, Any]] | None = None,
        module_output_name: str = OUTPUT_NAME,
        image_resize: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.modality_config = dict(MODALITY_CONFIG if modality_config is None else modality_config)
        self.module_output_name = module_output_name
        self.image_resize = tuple(image_resize) if image_resize is not None else None

    # ------------------------------------------------------------- what ST asks of an input module
    @property
    def modalities(self) -> list[Any]:
        return list(self.modality_config)

    @property
    def tokenizer(self) -> Any:
        return self.model.processor.tokenizer

    @property
    def processor(self) -> Any:
        return self.model.processor

    def get_embedding_dimension(self) -> int:
        return self.model.config.hidden_size

    def get_config_dict(self) -> dict[str, Any]:
        return module_config(self.image_resize) | {
            "modality_config": json_modality_config(self.modality_config),
            "module_output_name": self.module_output_name,
        }

    def preprocess(self, inputs: Sequence[Any], prompt: str | None = None, **kwargs: Any) -> dict[str, Any]:
        """Parse, validate and prompt the batch; no tensors yet (images are read in `forward`, by the model's
        prefetching pipeline). `task` (from `encode_query` / `encode_document`) changes nothing: the prompt does."""
        if kwargs.get("processing_kwargs"):
            raise InputError("processing_kwargs: VIRTUE's preprocessing is fixed by the checkpoint (its config.json); "
                             "use image_resize=(W, H) to squash images first")
        return {"virtue_inputs": [to_embed_input(x, prompt) for x in inputs], "virtue_raw": list(inputs)}

    def forward(self, features: dict[str, Any], image_resize: Sequence[int] | None = None,
                **kwargs: Any) -> dict[str, Any]:
        items = features["virtue_inputs"]
        resize = tuple(image_resize) if image_resize is not None else self.image_resize
        try:
            emb = self.model.encode(items, batch_size=max(len(items), 1), show_progress_bar=False,
                                    convert_to_numpy=False, normalize_embeddings=False, image_resize=resize)
        except InputError as exc:
            raise self._named(exc, features.get("virtue_raw", [])) from None
        features[self.module_output_name] = emb.to(self.model.device)
        return features

    @staticmethod
    def _named(exc: InputError, raw: Sequence[Any]) -> InputError:
        """Errors raised inside `VirtueModel.encode` name rows of ST's (length-sorted) batch, one or several ("2 bad
        inputs: input 0: ...; input 3: ..."); name the inputs themselves."""

        def name(match: re.Match) -> str:
            row = int(match.group(2))
            return match.group(0) if row >= len(raw) else f"{match.group(1)}{describe_input(raw[row])}: "

        return type(exc)(_ROWS.sub(name, str(exc)))

    # ------------------------------------------------------------- saving and loading
    def save(self, output_path: str, *args: Any, safe_serialization: bool = True, **kwargs: Any) -> None:
        """The library layout (so `VirtueModel.from_pretrained` reads the folder too) plus this module's config.
        ST writes modules.json and config_sentence_transformers.json itself, with the prompts of the loaded
        model, so they are not rewritten here; only the version `requirements` are added to the latter."""
        from virtue.errors import CheckpointError

        if not safe_serialization:
            raise CheckpointError("VIRTUE checkpoints are written as safetensors only (safe_serialization=True)")
        self.model.save_pretrained(output_path, sentence_transformers_files=False)
        self.save_config(output_path)
        # ST has just written its model config, without `requirements`: add them, keep everything else.
        st_config = Path(output_path, ST_CONFIG_FILE)
        if st_config.is_file():
            data = json.loads(st_config.read_text())
            data.setdefault("requirements", requirements())
            st_config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(
        cls,
        model_name_or_path: str,
        subfolder: str = "",
        token: bool | str | None = None,
        cache_folder: str | None = None,
        revision: str | None = None,
        local_files_only: bool = False,
        model_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> VirtueModule:
        """Load the folder's VIRTUE checkpoint with `VirtueModel.from_pretrained` (a hub repo is fetched whole by
        ST's own `load_dir_path`).

        model_kwargs (ST's `SentenceTransformer(..., model_kwargs=...)`): `dtype` / `torch_dtype` (a torch dtype or
        its name, e.g. "bfloat16") and `attn_implementation`; anything else is refused by name.
        """
        from virtue.model.embedder import VirtueModel

        local = cls.load_dir_path(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                  revision=revision, local_files_only=local_files_only)
        if local is None:
            raise ConfigError(f"{model_name_or_path}: no folder {subfolder!r} with a VIRTUE checkpoint")
        config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        options = _model_options(model_kwargs)
        model = VirtueModel.from_pretrained(Path(local), allow_hub=not local_files_only, **options)
        modality_config = config.get("modality_config")
        if modality_config is not None:
            modality_config = {tuple(k.split("+")) if "+" in k else k: v for k, v in modality_config.items()}
        return cls(model, modality_config=modality_config,
                   module_output_name=config.get("module_output_name", OUTPUT_NAME),
                   image_resize=config.get("image_resize"))


def _model_options(model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """ST's `model_kwargs` -> `VirtueModel.from_pretrained` arguments."""
    kwargs = dict(model_kwargs or {})
    options: dict[str, Any] = {}
    dtype = kwargs.pop("dtype", None)
    dtype = kwargs.pop("torch_dtype", dtype)
    if dtype is not None and dtype != "auto":
        if isinstance(dtype, str):
            resolved = getattr(torch, dtype, None)
            if not isinstance(resolved, torch.dtype):
                raise ConfigError(f"model_kwargs['dtype']: unknown dtype {dtype!r}; e.g. 'float32', 'bfloat16'")
            dtype = resolved
        options["dtype"] = dtype
    if "attn_implementation" in kwargs:
        options["attn_implementation"] = kwargs.pop("attn_implementation")
    if kwargs:
        raise ConfigError(f"model_kwargs: {sorted(kwargs)} not supported by VIRTUE; "
                          "supported: dtype (torch_dtype), attn_implementation")
    return options


def as_sentence_transformer(model: VirtueModel, *, device: str | None = None, **kwargs: Any) -> SentenceTransformer:
    """An in-memory SentenceTransformer around a loaded `VirtueModel` (no files): the pipeline and prompts that
    `save_pretrained` writes. Extra `kwargs` go to `SentenceTransformer` (e.g. `prompts=`, `truncate_dim=`)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Normalize

    prompts = {**PROMPTS, **kwargs.pop("prompts", {})}
    device = device if device is not None else str(model.device)
    return SentenceTransformer(modules=[VirtueModule(model), Normalize()], device=device, prompts=prompts,
                               similarity_fn_name=kwargs.pop("similarity_fn_name", "cosine"), **kwargs)


__all__ = [
    "MODALITY_CONFIG",
    "PROMPTS",
    "VirtueModule",
    "apply_prompt",
    "as_sentence_transformer",
    "describe_input",
    "requirements",
    "to_embed_input",
    "write_sentence_transformers_files",
]
