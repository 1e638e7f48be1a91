"""`virtue demo`: a Gradio page to prompt a region of a photo and search a gallery (or captions) with it.

Three layers, so most of it is testable without a browser or Gradio:
- the gallery index (`build_gallery_index`): embeddings computed once, cached on disk as an npz plus a JSON
  manifest of (path, size, mtime, sha256) and the model fingerprint; only new or changed files are embedded;
- `DemoBackend`: query embedding, ranking, and the SAM2 mask overlay that shows what the model looks at;
- `build_demo`: the Gradio UI wiring (Gradio is imported there only).

No `from __future__ import annotations` here on purpose: Gradio finds the `gr.SelectData` parameter of an
event handler through `typing.get_type_hints`, which cannot resolve a string annotation naming a module
imported inside a function; the handlers are closures in `build_demo`, so their annotations must be objects.
"""

import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from virtue.errors import InputError
from virtue.inputs import EmbedInput
from virtue.model.embedder import VirtueModel
from virtue.model.mask_preview import SamImageFeatures, predict_mask, sam_image_features
from virtue.processing.images import load_image, to_rgb
from virtue.prompts import Box, Mask, Points, VisualPrompt

if TYPE_CHECKING:
    import gradio as gr

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
CACHE_FORMAT = 1
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


# ----------------------------------------------------------------------------- gallery index and cache
def list_gallery(gallery_dir: str | Path) -> list[Path]:
    """Image files under `gallery_dir` (recursive, sorted); hidden files and folders are skipped."""
    root = Path(gallery_dir)
    if not root.is_dir():
        raise InputError(f"gallery: not a directory: {root}")
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "virtue" / "demo"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint_of(model: VirtueModel) -> str:
    """The evaluation cache's model fingerprint (config + every weight), so a changed model never hits."""
    from virtue.eval.embed_cache import model_fingerprint

    return model_fingerprint(model, json.dumps(model.config.to_dict(), sort_keys=True))


@dataclass
class GalleryIndex:
    """Gallery images and their embeddings, row i for paths[i]."""

    root: Path
    paths: list[Path]
    embeddings: np.ndarray  # float32 [N, D], L2-normalised
    cache_dir: Path
    reused: int = 0  # rows served from the cache
    embedded: int = 0  # rows computed by this build
    skipped: list[str] = field(default_factory=list)  # unreadable files, with the reason

    def top_k(self, query: np.ndarray, k: int) -> list[tuple[Path, float]]:
        scores = self.embeddings @ np.asarray(query, np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [(self.paths[i], float(scores[i])) for i in order]


def _cache_folder(cache_dir: Path, root: Path, fingerprint: str) -> Path:
    # One folder per (gallery, model): several galleries or models do not evict each other.
    where = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    return cache_dir / f"gallery-{where}-{fingerprint[:12]}"


def _read_cache(folder: Path, settings: dict) -> tuple[dict[str, dict], np.ndarray | None]:
    """(relative path -> manifest entry, embeddings), or nothing when absent, stale or unreadable."""
    manifest_path, npz_path = folder / "manifest.json", folder / "embeddings.npz"
    if not (manifest_path.is_file() and npz_path.is_file()):
        return {}, None
    try:
        manifest = json.loads(manifest_path.read_text())
        with np.load(npz_path) as data:
            vectors = np.asarray(data["embeddings"], np.float32)
    except (OSError, ValueError, KeyError) as exc:
        logger.warning("gallery cache %s is unreadable (%s); rebuilding it", folder, exc)
        return {}, None
    entries = manifest.get("entries", [])
    if manifest.get("settings") != settings or len(entries) != len(vectors):
        return {}, None
    return {e["path"]: e for e in entries}, vectors


def _atomic_write(path: Path, write) -> None:
    # Write then rename, so a crash mid-write leaves the previous cache, never a torn file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_cache(folder: Path, settings: dict, entries: list[dict], vectors: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)

    def write_npz(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez(f, embeddings=vectors.astype(np.float32))

    _atomic_write(folder / "embeddings.npz", write_npz)
    # The manifest is written last: it is what declares the npz valid (row counts are checked on read).
    manifest = {"format": CACHE_FORMAT, "settings": settings, "entries": entries}
    _atomic_write(folder / "manifest.json", lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))


def _embed_files(
    model: VirtueModel, paths: list[Path], batch_size: int, show_progress: bool
) -> tuple[dict[int, np.ndarray], list[str]]:
    """Embeddings of `paths` by position; unreadable files are skipped (and reported), not fatal."""
    out: dict[int, np.ndarray] = {}
    skipped: list[str] = []
    chunk = max(batch_size, 1) * 4  # several batches per encode call keeps the bar moving on big galleries
    with tqdm(total=len(paths), desc="Embedding gallery", unit="img", disable=not show_progress) as bar:
        for start in range(0, len(paths), chunk):
            part = list(range(start, min(start + chunk, len(paths))))
            try:
                vecs = model.encode([paths[i] for i in part], batch_size=batch_size, show_progress_bar=False)
                out.update({i: vecs[n] for n, i in enumerate(part)})
            except InputError:
                # One bad file must not cost the whole chunk: retry one by one to isolate it.
                for i in part:
                    try:
                        out[i] = model.encode([paths[i]], show_progress_bar=False)[0]
                    except InputError as exc:
                        logger.warning("gallery: skipping %s: %s", paths[i], exc)
                        skipped.append(f"{paths[i]}: {exc}")
            bar.update(len(part))
    return out, skipped


def build_gallery_index(
    model: VirtueModel,
    gallery_dir: str | Path,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
    fingerprint: str | None = None,
) -> GalleryIndex:
    """Embed every image under `gallery_dir`, reusing the on-disk cache for files that did not change.

    A file is unchanged when its size and mtime match the manifest (then its recorded sha256 is trusted),
    or when its content hash matches a cached row (a touched or renamed file is not re-embedded). The cache
    is keyed by the model fingerprint and the gallery folder; files removed from the folder leave it.

    Args:
        cache_dir: where the cache lives (default `$XDG_CACHE_HOME/virtue/demo`).
        fingerprint: `fingerprint_of(model)`, if already computed (it hashes every weight).
    Raises:
        InputError: the folder does not exist or holds no readable image.
    """
    root = Path(gallery_dir).resolve()
    paths = list_gallery(root)
    if not paths:
        raise InputError(f"gallery: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    fingerprint = fingerprint or fingerprint_of(model)
    cache_root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = _cache_folder(cache_root, root, fingerprint)
    # Everything a stored vector depends on besides the file itself: a mismatch discards the whole cache.
    settings = {"format": CACHE_FORMAT, "model": fingerprint, "gallery": str(root), "text": None, "resize": None}
    old_entries, old_vectors = _read_cache(folder, settings)
    row_of_sha = {e["sha256"]: n for n, e in enumerate(old_entries.values())}

    entries: list[dict] = []
    vectors: dict[int, np.ndarray] = {}
    todo: list[int] = []
    for i, path in enumerate(paths):
        rel = path.relative_to(root).as_posix()
        stat = path.stat()
        old = old_entries.get(rel)
        if old is not None and old["size"] == stat.st_size and old["mtime_ns"] == stat.st_mtime_ns:
            sha = old["sha256"]
        else:
            sha = file_sha256(path)
        entries.append({"path": rel, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha})
        row = row_of_sha.get(sha)
        if row is not None and old_vectors is not None:
            vectors[i] = old_vectors[row]
        else:
            todo.append(i)
    reused = len(vectors)
    computed, skipped = _embed_files(model, [paths[i] for i in todo], batch_size, show_progress)
    vectors.update({todo[n]: v for n, v in computed.items()})

    keep = [i for i in range(len(paths)) if i in vectors]
    if not keep:
        raise InputError(f"gallery: none of the {len(paths)} images in {root} could be read")
    kept_entries = [entries[i] for i in keep]
    matrix = np.stack([vectors[i] for i in keep]).astype(np.float32)
    # Rewrite only when something changed (new rows, removed files, new stats), so a hit touches nothing.
    if computed or kept_entries != list(old_entries.values()):
        _write_cache(folder, settings, kept_entries, matrix)
    logger.info("gallery: %d images, %d from the cache, %d embedded", len(keep), reused, len(computed))
    return GalleryIndex(root, [paths[i] for i in keep], matrix, folder, reused, len(computed), skipped)


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

    def editor_value(image: np.ndarray | None) -> dict | None:
        return None if image is None else {"background": image, "layers": [], "composite": image}

    def on_upload(image: np.ndarray | None):
        clicks = ClickPrompt()
        info = "Image loaded: click on it to add a prompt, or Search with the whole image."
        return image, clicks, editor_value(image), None, info

    def on_clear():
        return None, ClickPrompt(), None, None, "No image."

    def on_click(mode: str, original: np.ndarray | None, clicks: ClickPrompt, evt: gr.SelectData):
        if original is None or evt.index is None:
            return gr.skip(), clicks, "Upload an image first."
        clicks = clicks.click(mode, evt.index)
        return draw_prompt(original, clicks), clicks, f"Prompt: {clicks.describe()}"

    def on_clear_prompt(original: np.ndarray | None):
        clicks = ClickPrompt()
        info = "Prompt cleared." if original is not None else "No image."
        return original, clicks, editor_value(original), info

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

    with gr.Blocks(title="VIRTUE demo") as demo:
        gr.Markdown(HELP)
        original = gr.State(None)
        clicks = gr.State(ClickPrompt())
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Image(
                    label="Query image (click to add a prompt)", type="numpy", image_mode="RGB", format="png",
                    sources=["upload", "clipboard"], elem_id="query-image",
                )
                mode = gr.Radio(list(CLICK_MODES), value=MODE_POSITIVE, label="A click adds", elem_id="click-mode")
                with gr.Accordion("Paint a mask (optional)", open=False):
                    painter = gr.ImageEditor(
                        label="Paint over the region", type="numpy", sources=(), layers=False, transforms=(),
                        brush=gr.Brush(colors=["#ff3030"], color_mode="fixed"), format="png", elem_id="mask-painter",
                    )
                instruction = gr.Textbox(
                    label="Instruction (optional)", lines=1, elem_id="instruction",
                    placeholder="e.g. Find the caption that best describes the segmented object.",
                )
                k_slider = gr.Slider(1, max_k, value=min(top_k, max_k), step=1, label="Results to show")
                with gr.Row():
                    search_btn = gr.Button("Search", variant="primary", elem_id="search-button")
                    clear_btn = gr.Button("Clear prompt", elem_id="clear-prompt")
                prompt_info = gr.Markdown("No image.", elem_id="prompt-info")
            with gr.Column(scale=1):
                overlay = gr.Image(
                    label="What SAM2 looks at: its mask for this prompt" if backend.has_sam else "Query",
                    type="numpy", format="png", interactive=False, elem_id="mask-overlay",
                )
                status = gr.Markdown("", elem_id="search-status")
                results = gr.Gallery(
                    label="Gallery matches (score · file)", columns=4, object_fit="contain", height="auto",
                    elem_id="results-gallery", visible=backend.gallery is not None,
                )
                caption_table = gr.Dataframe(
                    headers=["rank", "score", "caption"], label="Caption matches", interactive=False,
                    elem_id="caption-results", visible=bool(backend.captions), wrap=True,
                )

        reset_outputs = [original, clicks, painter, overlay, prompt_info]
        query.upload(on_upload, inputs=[query], outputs=reset_outputs)
        query.clear(on_clear, outputs=reset_outputs)
        query.select(on_click, inputs=[mode, original, clicks], outputs=[query, clicks, prompt_info])
        clear_btn.click(on_clear_prompt, inputs=[original], outputs=[query, clicks, painter, prompt_info])
        search_inputs = [original, clicks, painter, instruction, k_slider]
        search_outputs = [overlay, results, caption_table, status]
        search_btn.click(on_search, inputs=search_inputs, outputs=search_outputs)
        instruction.submit(on_search, inputs=search_inputs, outputs=search_outputs)
    demo.backend = backend  # for callers and tests: the index, captions and search without the page
    return demo
