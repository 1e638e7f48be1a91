"""mteb (2.x) model wrapper: VIRTUE as the official evaluation runs it, inside mteb's evaluation.

    import mteb
    from virtue.integrations.mteb import VirtueMtebModel

    model = VirtueMtebModel("Sony/VIRTUE-2B-SCaR")              # or a loaded `VirtueModel`
    mteb.evaluate(model, mteb.get_tasks(tasks=["MSCOCOI2TRetrieval"]))

What it does with mteb's batches (texts, images, or both):

* **The SAM branch is on.** mteb inputs carry no visual prompt, so every image goes through SAM2 with the
  model's no-prompt point grid (3x3 for the released checkpoints) and its segmentation tokens lead the
  sequence, as in the official MMEB evaluation (virtue-spec §8.1: MMEB uses no boxes, so every image, query or
  image candidate, goes through SAM with the grid).
* **Texts as the official evaluation writes them** (virtue-spec §5.3-5.4), by the task's family: the task's
  instruction (mteb's `TaskMetadata.prompt`, MMEB's wording for some tasks such as MSCOCOI2TRetrieval, or
  `instructions=` here) is put where the MMEB dataset rows store it, `"<|image_1|>\\n<instruction>"` for an image
  query, and the query is built by `mmeb_query_text` (`"<|image_pad|>\\n<instruction> <text>\\n"`; text-only
  queries `"<instruction> <text>\\n"`); image documents are MMEB's image candidates (`"<|image_pad|>\\nRepresent
  the given image.[ <caption>]\\n"`, without the trailing newline for i2i / grounding image-only candidates);
  text documents are the raw text, as MMEB's and SCaR's text candidates. The `scar` family builds SCaR's query
  (`scar_eval_query_text`, no bbox line: mteb has no box), exactly what `virtue eval`'s `no_box` variant encodes.
* **The official pre-resize:** images are squashed to the checkpoint's `compat.eval_image_resize` (1344x1344 for
  the released checkpoints), as `virtue eval` does; `image_resize=None` keeps the native size.
* Vectors: float32, L2-normalised; mteb scores them with cosine similarity.

How this differs from mteb's own VIRTUE entry (`mteb/models/model_implementations/virtue_models.py`, mteb
2.26): that entry loads the checkpoint as a plain `Qwen2VLForConditionalGeneration`, so there are no
segmentation tokens at all (the SAM2 branch and the connector are dropped), it writes one fixed text for every
task (`"<|image_pad|>\\nRepresent the given image with the following question: <text>"`, or `"...Represent the
given image."`, texts bare; the task's instruction is not used and there is no trailing newline), it feeds
images at their native size through the stock processor, and it runs in bfloat16. The released checkpoints were
trained and evaluated with the 256 segmentation tokens in front of every image row, so its vectors are not
the paper's model; this wrapper's are (what `virtue eval` computes for the same rows).

Ties: mteb ranks a query's documents by score, ties broken by document id in descending string order
(pytrec_eval / trec_eval's rule, which mteb's own MRR follows since mteb PR #5136), so a tie is won or lost by
how the documents are named. `virtue eval` counts every tie against the positive.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("virtue.integrations.mteb needs mteb 2.x: pip install 'virtue[mteb]'") from exc

from virtue.errors import ConfigError, InputError
from virtue.inputs import EmbedInput
from virtue.model.embedder import VirtueModel
from virtue.processing.text import (
    DATASET_IMAGE_TOKEN,
    IMAGE_TOKEN,
    SCAR_INSTRUCTION,
    mmeb_query_text,
)

__all__ = ["FAMILIES", "VirtueMtebModel", "task_family"]

# The official text builders (virtue-spec §5.3-5.4): MMEB's five parsers and SCaR's.
FAMILIES = ("cls", "i2t", "qa", "vg", "t2i", "scar")
IMAGE_CANDIDATE_INSTRUCTION = "Represent the given image."
QUERY, DOCUMENT = "query", "document"

VIRTUE_CITATION = """@article{wang2025virtue,
  title={VIRTUE: Visual-Interactive Text-Image Universal Embedder},
  author={Wang, Wei-Yao and Tateishi, Kazuya and Wu, Qiyu and Takahashi, Shusuke and Mitsufuji, Yuki},
  journal={arXiv preprint arXiv:2510.00523},
  year={2025}
}"""


def task_family(task_metadata: Any, families: Mapping[str, str] | None = None) -> str:
    """The official text family of an mteb task.

    Order: `families[task name]`; "scar" for a task whose name contains "scar"; else from mteb's category
    (`<query>2<document>`): image on both sides (i2i, it2i, i2it, it2it) -> "vg" (MMEB's i2i / grounding parser,
    CIRR, NIGHTS, OVEN, FashionIQ...); image+text query to text (it2t) -> "qa"; text query (t2i, t2it, t2t) ->
    "t2i"; image query to text -> "i2t"; anything else (classification, clustering, no category) -> "cls".
    cls and i2t write the same texts, as do qa and vg for queries.
    """
    name = task_metadata.name
    if families and name in families:
        family = families[name]
        if family not in FAMILIES:
            raise ConfigError(f"families[{name!r}]: expected one of {list(FAMILIES)}, got {family!r}")
        return family
    if "scar" in name.lower():
        return "scar"
    category = task_metadata.category or ""
    if "2" not in category:
        return "cls"
    query, document = category.split("2", 1)
    if "i" in query and "i" in document:
        return "vg"
    if "i" not in query:
        return "t2i"
    if "t" in query:
        return "qa"
    return "i2t" if "t" in document else "cls"


class VirtueMtebModel(AbsEncoder):
    """An mteb encoder (`mteb.models.EncoderProtocol`) over a `VirtueModel`.

    Args:
        model: a `VirtueModel`, or a hub id / local directory for `VirtueModel.from_pretrained`.
        revision: the revision recorded in mteb's results (its cache folder); default: a hash of the model's
            config and weights (`virtue.hashing.model_fingerprint`), so that a changed model never
            reuses another's cached results. It does not select a hub revision.
        device, dtype: for `from_pretrained` (a loaded model is used as it is).
        name: the model name in mteb's results; default: the hub id given (results then go to an
            `experiments/` folder of that name, apart from mteb's own VIRTUE entry's), else "virtue/<folder>".
        families: task name -> one of `FAMILIES`, for tasks `task_family` would misread.
        instructions: mteb-style prompt overrides: keys "<task name>-query" / "<task name>-document", "<task
            name>" (query side), "<task type>-query" / "<task type>-document", "<task type>", "query",
            "document". Otherwise the task's `TaskMetadata.prompt` (a string is the query's instruction).
        image_resize: (W, H) squash before preprocessing; "model" (default) takes the checkpoint's
            `compat.eval_image_resize` as `virtue eval` does; None keeps native sizes.
        batch_size: rows per forward pass when mteb gives none.
        chunk_size: inputs gathered from mteb's batches per `encode` call (images are held decoded until then).
        from_pretrained_kwargs: passed on (e.g. `sam_checkpoint=`, `allow_hub=False`).
    """

    def __init__(
        self,
        model: VirtueModel | str | Path,
        revision: str | None = None,
        *,
        device: str | None = None,
        dtype: Any = None,
        name: str | None = None,
        families: Mapping[str, str] | None = None,
        instructions: Mapping[str, str] | None = None,
        image_resize: tuple[int, int] | None | str = "model",
        batch_size: int = 16,
        chunk_size: int = 256,
        **from_pretrained_kwargs: Any,
    ) -> None:
        source = None
        if not isinstance(model, VirtueModel):
            import torch

            source = str(model)
            model = VirtueModel.from_pretrained(model, device=device, dtype=dtype or torch.float32,
                                                **from_pretrained_kwargs)
        elif from_pretrained_kwargs or device is not None or dtype is not None:
            raise ConfigError("device, dtype and loading options apply to a model path, not to a loaded VirtueModel")
        self.model = model.eval()
        if image_resize == "model":
            image_resize = model.config.compat.eval_image_resize
        elif isinstance(image_resize, str):
            raise ConfigError(f"image_resize: expected (width, height), None or 'model', got {image_resize!r}")
        self.image_resize = tuple(image_resize) if image_resize is not None else None
        self.families = dict(families or {})
        for task, family in self.families.items():
            if family not in FAMILIES:
                raise ConfigError(f"families[{task!r}]: expected one of {list(FAMILIES)}, got {family!r}")
        self.instructions = dict(instructions or {})
        if batch_size < 1 or chunk_size < 1:
            raise ConfigError(f"batch_size and chunk_size must be >= 1, got {batch_size}, {chunk_size}")
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self.mteb_model_meta = self._meta(source, name, revision)

    # ----------------------------------------------------------------- metadata
    def _meta(self, source: str | None, name: str | None, revision: str | None) -> ModelMeta:
        if name is None:
            if source is not None and not Path(source).expanduser().exists() and source.count("/") == 1:
                name = source  # a hub id such as Sony/VIRTUE-2B-SCaR
            else:
                name = f"virtue/{Path(source).name if source else 'VirtueModel'}"
        if revision is None:
            from virtue.hashing import model_fingerprint

            revision = model_fingerprint(self.model)
        sam = self.model.sam is not None
        resize = "native" if self.image_resize is None else f"{self.image_resize[0]}x{self.image_resize[1]}"
        return ModelMeta(
            loader=None,
            name=name,
            revision=revision,
            release_date=None,
            languages=["eng-Latn"],
            n_parameters=sum(p.numel() for p in self.model.parameters()),
            memory_usage_mb=None,
            max_tokens=None,
            embed_dim=self.model.config.hidden_size,
            license=None,
            open_weights=True,
            public_training_code="https://github.com/sony/virtue",
            public_training_data=None,
            framework=["PyTorch", "Transformers"],
            similarity_fn_name=ScoringFunction.COSINE,
            use_instructions=True,
            training_datasets=None,
            modalities=["image", "text"],
            model_type=["dense"],
            citation=VIRTUE_CITATION,
            # Apart from mteb's own entry of the same name in mteb's results cache: another implementation.
            experiment_kwargs={"implementation": "virtue", "sam_branch": "grid" if sam else "none",
                               "image_resize": resize},
        )

    # ----------------------------------------------------------------- texts
    def family(self, task_metadata: Any) -> str:
        return task_family(task_metadata, self.families)

    def instruction(self, task_metadata: Any, side: str) -> str:
        """The task's instruction for one side ("query" / "document"), "" when it has none (module docstring)."""
        name, task_type = task_metadata.name, task_metadata.type
        keys = [f"{name}-{side}", name if side == QUERY else None, f"{task_type}-{side}",
                task_type if side == QUERY else None, side]
        for key in keys:
            if key is not None and key in self.instructions:
                return self.instructions[key]
        prompt = task_metadata.prompt
        if isinstance(prompt, Mapping):
            return prompt.get(side) or ""
        return (prompt or "") if side == QUERY else ""

    def build_input(self, image: Any, text: str | None, *, task_metadata: Any, side: str) -> EmbedInput:
        """One mteb row as the official evaluation would encode it (module docstring)."""
        text = text if text else None
        if image is None and text is None:
            raise InputError(f"task {task_metadata.name}: a row with neither text nor image")
        family = self.family(task_metadata)
        instruction = self.instruction(task_metadata, side)
        if side == DOCUMENT:
            return _document(image, text, instruction, family)
        if family == "scar":
            return _scar_query(image, text, instruction)
        if image is None:
            from virtue.eval.datasets import t2i_query_suffix

            query = mmeb_query_text(instruction, text or "", with_image=False, family="t2i")
            if family == "t2i":
                query += t2i_query_suffix(task_metadata.name)
            return EmbedInput(text=query)
        if not instruction:
            # No instruction: the model's default image text, or the text after the placeholder line.
            return EmbedInput(text=None if text is None else f"{IMAGE_TOKEN}\n{text}\n", image=image)
        fam = family if family in ("cls", "i2t", "qa", "vg") else "cls"
        return EmbedInput(text=mmeb_query_text(_stored(instruction), text or "", family=fam), image=image)

    def build_inputs(self, batch: Mapping[str, Any], *, task_metadata: Any,
                     prompt_type: PromptType | str | None) -> list[EmbedInput]:
        """The `EmbedInput`s of one mteb batch (`BatchedInput`: lists under "text", "image", ...)."""
        texts, images = batch.get("text"), batch.get("image")
        n = _batch_len(batch)
        out = []
        for i in range(n):
            image = _image(images[i]) if images is not None else None
            text = texts[i] if texts is not None else None
            if text is not None and not isinstance(text, str):
                raise InputError(f"task {task_metadata.name}: expected text strings, got {type(text).__name__}")
            side = _side(prompt_type, task_metadata, image is not None)
            out.append(self.build_input(image, text, task_metadata=task_metadata, side=side))
        return out

    # ----------------------------------------------------------------- mteb's encoder protocol
    def encode(
        self,
        inputs: Iterable[Mapping[str, Any]],
        *,
        task_metadata: Any,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | str | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """float32 [N, D] L2-normalised vectors, one per row of mteb's DataLoader, in order."""
        batch_size = int(kwargs.get("batch_size") or self.batch_size)
        show = bool(kwargs.get("show_progress_bar", False))
        parts: list[np.ndarray] = []
        pending: list[EmbedInput] = []
        for batch in inputs:
            pending.extend(self.build_inputs(batch, task_metadata=task_metadata, prompt_type=prompt_type))
            if len(pending) >= self.chunk_size:
                parts.append(self._encode(pending, batch_size, show))
                pending = []
        if pending:
            parts.append(self._encode(pending, batch_size, show))
        if not parts:
            return np.zeros((0, self.model.config.hidden_size), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _encode(self, items: Sequence[EmbedInput], batch_size: int, show: bool) -> np.ndarray:
        return self.model.encode(list(items), batch_size=batch_size, show_progress_bar=show,
                                 image_resize=self.image_resize)


# ---------------------------------------------------------------------------------------------------------------


def _stored(instruction: str) -> str:
    """An image-side instruction as the MMEB / SCaR rows store it: `<|image_1|>\\n` + the instruction."""
    if DATASET_IMAGE_TOKEN in instruction or IMAGE_TOKEN in instruction:
        return instruction.replace(IMAGE_TOKEN, DATASET_IMAGE_TOKEN)
    return f"{DATASET_IMAGE_TOKEN}\n{instruction}"


def _scar_query(image: Any, text: str | None, instruction: str) -> EmbedInput:
    """SCaR's evaluation query without the bbox line (`virtue eval`'s `no_box` variant), virtue-spec §5.3."""
    from virtue.eval.datasets import scar_eval_query_text

    qry_text = _stored(instruction or SCAR_INSTRUCTION)
    if text is not None:
        qry_text += " " + text
    return EmbedInput(text=scar_eval_query_text(qry_text, None, with_image=image is not None), image=image)


def _document(image: Any, text: str | None, instruction: str, family: str) -> EmbedInput:
    """A candidate: text alone is used raw (MMEB / SCaR text candidates); an image is MMEB's image candidate."""
    from virtue.eval.datasets import mmeb_image_candidate_text

    if image is None:
        return EmbedInput(text=f"{instruction} {text}" if instruction else text)
    stored = _stored(instruction or IMAGE_CANDIDATE_INSTRUCTION)  # as tgt_inst: "<|image_1|>\n<instruction>"
    return EmbedInput(text=mmeb_image_candidate_text(stored, text or "", family), image=image)


def _side(prompt_type: PromptType | str | None, task_metadata: Any, has_image: bool) -> str:
    """Query or document. Without a prompt type (classification, clustering, STS...), an image row is the query
    (MMEB's classification query), and a text alone in a task with images is a candidate (a class label)."""
    if prompt_type is not None:
        side = prompt_type.value if isinstance(prompt_type, PromptType) else str(prompt_type)
        if side not in (QUERY, DOCUMENT):
            raise ConfigError(f"prompt_type: expected 'query' or 'document', got {prompt_type!r}")
        return side
    if has_image or "image" not in (task_metadata.modalities or []):
        return QUERY
    return DOCUMENT


def _batch_len(batch: Mapping[str, Any]) -> int:
    for key in ("id", "text", "image"):
        if key in batch:
            return len(batch[key])
    for value in batch.values():
        return len(value)
    return 0


def _image(value: Any) -> Any:
    """An image from mteb's batch: a PIL image (decoded by `datasets`), or a path, bytes dict, array or tensor."""
    if value is None or isinstance(value, (Image.Image, np.ndarray, Path)):
        return value
    if isinstance(value, str):
        return Path(value)
    if isinstance(value, Mapping):  # datasets' undecoded {"bytes", "path"}
        if value.get("bytes"):
            with Image.open(io.BytesIO(value["bytes"])) as img:
                img.load()
                return img.copy()
        if value.get("path"):
            return Path(value["path"])
    if hasattr(value, "detach"):  # a torch tensor, C x H x W (torchvision) or H x W x C
        arr = value.detach().cpu().numpy()
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)
        return arr
    raise InputError(f"mteb image: expected a PIL image, path, bytes, array or tensor, got {type(value).__name__}")
