"""`virtue demo`: a Gradio page to prompt a region of a photo and search a gallery (or captions) with it.

Three layers, so most of it is testable without a browser or Gradio:
- the gallery index (`virtue.apps.demo_gallery.build_gallery_index`): embeddings computed once, cached on disk
  in a `virtue.search` index of the folder (keyed by folder and model fingerprint); only new or changed files
  are embedded;
- `DemoBackend`: query embedding, ranking, and the SAM2 mask overlay that shows what the model looks at;
- `build_demo`: the Gradio UI wiring (Gradio is imported there only).

No `from __future__ import annotations` here on purpose: Gradio finds the `gr.SelectData` parameter of an
event handler through `typing.get_type_hints`, which cannot resolve a string annotation naming a module
imported inside a function; the handlers are closures in `build_demo`, so their annotations must be objects.
"""

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from virtue.apps.demo_gallery import GalleryIndex, build_gallery_index, fingerprint_of
from virtue.errors import InputError
from virtue.images import load_image, to_rgb
from virtue.inputs import EmbedInput
from virtue.model.embedder import VirtueModel
from virtue.model.mask_preview import SamImageFeatures, predict_mask, sam_image_features
from virtue.prompts import Box, Mask, Points, VisualPrompt

if TYPE_CHECKING:
    import gradio as gr

__all__ = [
    "CAPTION_INSTRUCTION",
    "CLICK_MODES",
    "MODE_BOX",
    "MODE_NEGATIVE",
    "MODE_POSITIVE",
    "ClickPrompt",
    "DemoBackend",
    "GalleryIndex",
    "SearchResult",
    "build_demo",
    "build_gallery_index",
    "draw_prompt",
    "fingerprint_of",
    "mask_from_editor",
    "render_overlay",
]

logger = logging.getLogger(__name__)

# The official SCaR query instruction: without one, a caption ranking would compare an image embedding
# ("Represent the given image.") with captions, which is not the task the checkpoints were trained on.
CAPTION_INSTRUCTION = "Find the caption that best describes the segmented object."

MODE_POSITIVE = "Positive point"
MODE_NEGATIVE = "Negative point"
MODE_BOX = "Box (2 clicks)"
CLICK_MODES = (MODE_POSITIVE, MODE_NEGATIVE, MODE_BOX)

MASK_RGB = (30, 144, 255)
POSITIVE_RGB = (40, 220, 60)
NEGATIVE_RGB = (235, 40, 40)
BOX_RGB = (255, 200, 0)
THUMBNAIL_SIDE = 512


# ----------------------------------------------------------------------------- prompts and drawing
@dataclass(frozen=True)
class ClickPrompt:
    """The prompt built by clicks on the query image, in its pixels (a value: each click returns a new one)."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box_start: tuple[float, float] | None = None  # first corner of a box being drawn
    box: tuple[float, float, float, float] | None = None

    def click(self, mode: str, xy: Sequence[float]) -> "ClickPrompt":
        x, y = float(xy[0]), float(xy[1])
        if mode == MODE_BOX:
            if self.box_start is None:
                return replace(self, box_start=(x, y))
            (x0, y0) = self.box_start
            if x0 == x or y0 == y:  # a degenerate box cannot be a prompt: start over from this corner
                return replace(self, box_start=(x, y))
            return replace(self, box_start=None, box=(min(x0, x), min(y0, y), max(x0, x), max(y0, y)))
        label = 0 if mode == MODE_NEGATIVE else 1
        return replace(self, points=(*self.points, (x, y)), labels=(*self.labels, label))

    def visual_prompt(self, mask: np.ndarray | None = None) -> VisualPrompt | None:
        prompt = VisualPrompt(
            points=Points(self.points, self.labels) if self.points else None,
            box=Box(*self.box) if self.box is not None else None,
            mask=Mask(mask) if mask is not None and mask.any() else None,
        )
        return None if prompt.is_empty else prompt

    def describe(self) -> str:
        parts = []
        if self.points:
            pos = sum(self.labels)
            parts.append(f"{pos} positive / {len(self.labels) - pos} negative point(s)")
        if self.box is not None:
            parts.append("box [" + ", ".join(f"{v:.0f}" for v in self.box) + "]")
        if self.box_start is not None:
            parts.append("box: click the opposite corner")
        return "; ".join(parts) if parts else "no clicks yet"


def _radius(size_wh: tuple[int, int]) -> int:
    return max(3, round(min(size_wh) / 80))


def draw_prompt(image: np.ndarray, clicks: ClickPrompt) -> np.ndarray:
    """The image with the clicked points (green +, red -), the box and a pending box corner drawn on it."""
    img = Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    draw = ImageDraw.Draw(img)
    r = _radius(img.size)
    width = max(2, r // 2)
    if clicks.box is not None:
        draw.rectangle(clicks.box, outline=BOX_RGB, width=width)
    if clicks.box_start is not None:
        x, y = clicks.box_start
        draw.rectangle((x - r, y - r, x + r, y + r), outline=BOX_RGB, width=width)
    for (x, y), label in zip(clicks.points, clicks.labels, strict=True):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=POSITIVE_RGB if label else NEGATIVE_RGB,
                     outline=(255, 255, 255), width=max(1, r // 3))
    return np.asarray(img)


def render_overlay(image: np.ndarray, mask: np.ndarray | None, clicks: ClickPrompt | None = None) -> np.ndarray:
    """The mask tinted over the image (outside darkened, so the selected region stands out), prompt on top."""
    rgb = np.asarray(Image.fromarray(np.ascontiguousarray(image)).convert("RGB"), np.float32)
    if mask is not None:
        m = mask[..., None]
        tint = 0.45 * rgb + 0.55 * np.array(MASK_RGB, np.float32)
        rgb = np.where(m, tint, 0.55 * rgb)
    out = rgb.round().clip(0, 255).astype(np.uint8)
    return draw_prompt(out, clicks) if clicks is not None else out


def mask_from_editor(value: Any, size_wh: tuple[int, int]) -> np.ndarray | None:
    """The union of the painted strokes of a `gr.ImageEditor` value, at the image's size, or None."""
    if not isinstance(value, dict):
        return None
    union: np.ndarray | None = None
    for layer in value.get("layers") or []:
        arr = np.asarray(layer)
        if arr.ndim != 3 or arr.shape[2] != 4:
            continue
        painted = arr[..., 3] > 0
        union = painted if union is None or union.shape != painted.shape else union | painted
    if union is None or not union.any():
        return None
    w, h = size_wh
    if union.shape != (h, w):  # the editor's canvas may not be the image's size: map it back
        union = np.asarray(Image.fromarray(union).resize((w, h), Image.Resampling.NEAREST))
    return union


# ----------------------------------------------------------------------------- search backend
@dataclass
class SearchResult:
    mask: np.ndarray | None  # H x W bool, SAM2's mask for the prompt (None: no image or no SAM branch)
    overlay: np.ndarray | None  # H x W x 3 uint8
    gallery: list[tuple[Path, float]]
    captions: list[tuple[str, float]]
    seconds: float

    def summary(self) -> str:
        parts = []
        if self.mask is not None:
            parts.append(f"mask covers {100 * self.mask.mean():.1f}% of the image")
        if self.gallery:
            parts.append(f"top {len(self.gallery)} images")
        if self.captions:
            parts.append(f"top {len(self.captions)} captions")
        return f"{' · '.join(parts)} · {self.seconds:.2f} s"


class DemoBackend:
    """Everything the page does, without the page: gallery index, caption embeddings, search, mask preview.

    Model calls are serialised by a lock: Gradio runs event handlers in worker threads.
    """

    def __init__(
        self,
        model: VirtueModel,
        gallery_dir: str | Path | None = None,
        *,
        captions: Sequence[str] | None = None,
        cache_dir: str | Path | None = None,
        batch_size: int = 8,
        show_progress: bool = True,
        caption_instruction: str = CAPTION_INSTRUCTION,
    ):
        captions = [c.strip() for c in captions or [] if c.strip()]
        if gallery_dir is None and not captions:
            raise InputError("demo: give a gallery folder and/or a caption list to search")
        self.model = model
        self.caption_instruction = caption_instruction
        self._lock = threading.Lock()
        self._features: OrderedDict[str, SamImageFeatures] = OrderedDict()
        self._thumbs: OrderedDict[Path, Image.Image] = OrderedDict()
        self.gallery: GalleryIndex | None = None
        if gallery_dir is not None:
            self.gallery = build_gallery_index(
                model, gallery_dir, cache_dir=cache_dir, batch_size=batch_size, show_progress=show_progress
            )
        self.captions = captions
        self.caption_embeddings: np.ndarray | None = None
        if captions:
            self.caption_embeddings = np.asarray(
                model.encode(captions, batch_size=batch_size, show_progress_bar=show_progress), np.float32
            )

    @property
    def has_sam(self) -> bool:
        return self.model.sam is not None

    def _image_features(self, image: np.ndarray) -> SamImageFeatures:
        # SAM2's image encoder is the costly part of a mask; clicks on one image only change the prompt.
        key = hashlib.blake2b(f"{image.shape}{image.dtype}".encode() + image.tobytes(), digest_size=16).hexdigest()
        feats = self._features.get(key)
        if feats is None:
            feats = sam_image_features(self.model, image)
            self._features[key] = feats
            while len(self._features) > 4:
                self._features.popitem(last=False)
        self._features.move_to_end(key)
        return feats

    def thumbnail(self, path: Path) -> Image.Image:
        """A small copy of a gallery image for the results grid (sending full photos would slow the page)."""
        with self._lock:  # two searches (button and Enter are separate events) may run at once
            thumb = self._thumbs.get(path)
            if thumb is None:
                thumb = to_rgb(load_image(path, str(path)))
                thumb.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
                self._thumbs[path] = thumb
                while len(self._thumbs) > 256:
                    self._thumbs.popitem(last=False)
            return thumb

    def search(
        self,
        image: np.ndarray | None,
        prompt: VisualPrompt | None = None,
        instruction: str | None = None,
        top_k: int = 8,
        clicks: ClickPrompt | None = None,
    ) -> SearchResult:
        """Rank the gallery and the captions for (image, prompt, instruction); text only without an image.

        Raises:
            InputError (PromptError...): nothing to search with, or a prompt that does not fit the image.
        """
        start = time.perf_counter()
        text = (instruction or "").strip() or None
        if image is None and text is None:
            raise InputError("upload an image (or type a text query) first")
        if image is None and prompt is not None:
            raise InputError("a visual prompt needs an image")
        with self._lock:
            mask = overlay = None
            if image is not None:
                if self.has_sam:
                    mask = predict_mask(self.model, image, prompt, features=self._image_features(image))
                overlay = render_overlay(image, mask, clicks)
            gallery: list[tuple[Path, float]] = []
            if self.gallery is not None:
                query = self.model.encode(EmbedInput(text=text, image=image, prompt=prompt))
                gallery = self.gallery.top_k(query, top_k)
            captions: list[tuple[str, float]] = []
            if self.caption_embeddings is not None:
                # An image query needs the caption-retrieval instruction; a text query is its own.
                caption_text = text if text is not None or image is None else self.caption_instruction
                query = self.model.encode(EmbedInput(text=caption_text, image=image, prompt=prompt))
                scores = self.caption_embeddings @ query
                order = np.argsort(-scores, kind="stable")[:top_k]
                captions = [(self.captions[i], float(scores[i])) for i in order]
        return SearchResult(mask, overlay, gallery, captions, time.perf_counter() - start)


# ----------------------------------------------------------------------------- Gradio UI
HELP = """### VIRTUE: search with a region of a photo
1. Upload a photo. 2. Click on it: positive / negative points, or two clicks for a box (choose below); or
open *Paint a mask*. No prompt: the whole image (the model's point grid). 3. Optional instruction. 4. **Search**.
The blue area on the right is the mask SAM2 predicts for your prompt: what the embedding is looking at."""


def build_demo(
    model: VirtueModel,
    gallery_dir: str | Path | None,
    *,
    captions: list[str] | None = None,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    top_k: int = 8,
    show_progress: bool = True,
) -> "gr.Blocks":
    """The demo page: upload, prompt (clicks / box / painted mask), instruction, Search.

    The gallery (and captions) are embedded here, before the page exists, with a console progress bar;
    the gallery's embeddings are cached on disk (see `build_gallery_index`). Launch the result with
    `demo.launch(server_name="127.0.0.1")`.

    Args:
        gallery_dir: folder of images to rank, or None for caption search only.
        captions: texts to rank (text mode), or None.
        cache_dir: gallery embedding cache (default `$XDG_CACHE_HOME/virtue/demo`).
    """
    import gradio as gr

    backend = DemoBackend(
        model, gallery_dir, captions=captions, cache_dir=cache_dir, batch_size=batch_size,
        show_progress=show_progress,
    )
    n_results = max(len(backend.gallery.paths) if backend.gallery else 0, len(backend.captions))
    max_k = max(1, min(50, n_results))
    with gr.Blocks(title="VIRTUE demo") as demo:
        gr.Markdown(HELP)
        ui: dict[str, Any] = {"original": gr.State(None), "clicks": gr.State(ClickPrompt())}
        with gr.Row():
            with gr.Column(scale=1):
                ui.update(_query_column(gr, max_k, top_k))
            with gr.Column(scale=1):
                ui.update(_result_column(gr, backend))
        _wire(ui, _handlers(gr, backend))
    demo.backend = backend  # for callers and tests: the index, captions and search without the page
    return demo


def _query_column(gr: Any, max_k: int, top_k: int) -> dict[str, Any]:
    """The left column's components: the query image, click mode, mask painter, instruction and buttons."""
    ui: dict[str, Any] = {}
    ui["query"] = gr.Image(
        label="Query image (click to add a prompt)", type="numpy", image_mode="RGB", format="png",
        sources=["upload", "clipboard"], elem_id="query-image",
    )
    ui["mode"] = gr.Radio(list(CLICK_MODES), value=MODE_POSITIVE, label="A click adds", elem_id="click-mode")
    with gr.Accordion("Paint a mask (optional)", open=False):
        ui["painter"] = gr.ImageEditor(
            label="Paint over the region", type="numpy", sources=(), layers=False, transforms=(),
            brush=gr.Brush(colors=["#ff3030"], color_mode="fixed"), format="png", elem_id="mask-painter",
        )
    ui["instruction"] = gr.Textbox(
        label="Instruction (optional)", lines=1, elem_id="instruction",
        placeholder="e.g. Find the caption that best describes the segmented object.",
    )
    ui["k_slider"] = gr.Slider(1, max_k, value=min(top_k, max_k), step=1, label="Results to show")
    with gr.Row():
        ui["search_btn"] = gr.Button("Search", variant="primary", elem_id="search-button")
        ui["clear_btn"] = gr.Button("Clear prompt", elem_id="clear-prompt")
    ui["prompt_info"] = gr.Markdown("No image.", elem_id="prompt-info")
    return ui


def _result_column(gr: Any, backend: DemoBackend) -> dict[str, Any]:
    """The right column's components: the mask overlay, the status line, gallery and caption results."""
    return {
        "overlay": gr.Image(
            label="What SAM2 looks at: its mask for this prompt" if backend.has_sam else "Query",
            type="numpy", format="png", interactive=False, elem_id="mask-overlay",
        ),
        "status": gr.Markdown("", elem_id="search-status"),
        "results": gr.Gallery(
            label="Gallery matches (score · file)", columns=4, object_fit="contain", height="auto",
            elem_id="results-gallery", visible=backend.gallery is not None,
        ),
        "caption_table": gr.Dataframe(
            headers=["rank", "score", "caption"], label="Caption matches", interactive=False,
            elem_id="caption-results", visible=bool(backend.captions), wrap=True,
        ),
    }


def _handlers(gr: Any, backend: DemoBackend) -> dict[str, Any]:
    """The page's event handlers. Defined here, with `gr` an object, so their annotations are objects too:
    Gradio finds the `gr.SelectData` parameter of `on_click` through them (see the module docstring)."""

    def editor_value(image: np.ndarray | None) -> dict | None:
        return None if image is None else {"background": image, "layers": [], "composite": image}

    def on_upload(image: np.ndarray | None):
        info = "Image loaded: click on it to add a prompt, or Search with the whole image."
        return image, ClickPrompt(), editor_value(image), None, info

    def on_clear():
        return None, ClickPrompt(), None, None, "No image."

    def on_click(mode: str, original: np.ndarray | None, clicks: ClickPrompt, evt: gr.SelectData):
        if original is None or evt.index is None:
            return gr.skip(), clicks, "Upload an image first."
        clicks = clicks.click(mode, evt.index)
        return draw_prompt(original, clicks), clicks, f"Prompt: {clicks.describe()}"

    def on_clear_prompt(original: np.ndarray | None):
        info = "Prompt cleared." if original is not None else "No image."
        return original, ClickPrompt(), editor_value(original), info

    def on_search(original: np.ndarray | None, clicks: ClickPrompt, painted: Any, instruction: str, k: float):
        try:
            mask = None
            if original is not None:
                mask = mask_from_editor(painted, (original.shape[1], original.shape[0]))
            prompt = clicks.visual_prompt(mask) if original is not None else None
            result = backend.search(original, prompt, instruction, int(k), clicks)
        except InputError as exc:  # a user mistake: say it on the page, keep the server going
            raise gr.Error(str(exc)) from None
        items = [(backend.thumbnail(p), f"{s:.3f} · {p.name}") for p, s in result.gallery]
        rows = [[r + 1, round(s, 4), c] for r, (c, s) in enumerate(result.captions)]
        return result.overlay, items, rows, result.summary()

    return {"upload": on_upload, "clear": on_clear, "click": on_click, "clear_prompt": on_clear_prompt,
            "search": on_search}


def _wire(ui: dict[str, Any], on: dict[str, Any]) -> None:
    """Connect the components' events to the handlers."""
    query, original, clicks = ui["query"], ui["original"], ui["clicks"]
    reset_outputs = [original, clicks, ui["painter"], ui["overlay"], ui["prompt_info"]]
    query.upload(on["upload"], inputs=[query], outputs=reset_outputs)
    query.clear(on["clear"], outputs=reset_outputs)
    query.select(on["click"], inputs=[ui["mode"], original, clicks], outputs=[query, clicks, ui["prompt_info"]])
    ui["clear_btn"].click(on["clear_prompt"], inputs=[original],
                          outputs=[query, clicks, ui["painter"], ui["prompt_info"]])
    search_inputs = [original, clicks, ui["painter"], ui["instruction"], ui["k_slider"]]
    search_outputs = [ui["overlay"], ui["results"], ui["caption_table"], ui["status"]]
    ui["search_btn"].click(on["search"], inputs=search_inputs, outputs=search_outputs)
    ui["instruction"].submit(on["search"], inputs=search_inputs, outputs=search_outputs)
