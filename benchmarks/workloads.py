"""The inputs the speed benchmarks embed (SCaR-like, MMEB-like, phone photos) and the FLOPs each path executes
on them, shared by `throughput.py` and `gpu_all.py`. Photos are the mini-SCaR ones (and derived copies of them, so
that no two queries share an image unless a workload says so); captions are distinct by construction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_common import PHOTOS
from PIL import Image

from virtue.inputs import EmbedInput, parse_input
from virtue.model.flops import Flops, forward_flops
from virtue.processing.qwen import smart_resize
from virtue.processing.text import mmeb_query_text, scar_query_text

SCAR_RESIZE = (1344, 1344)
CANDIDATES_PER_QUERY = 10
PIPELINE_INSTRUCTION = "Describe the object in the box."
MMEB_INSTRUCTIONS = (
    "Represent the given image for classification",
    "Find a caption for the given image",
    "Represent the given image with the following question: What is the main object?",
)
ADJECTIVES = ("red", "small", "wooden", "striped", "old", "shiny", "tall", "broken", "white", "furry")
NOUNS = ("dog", "chair", "bicycle", "umbrella", "cup", "horse", "laptop", "kite", "bench", "clock")
PLACES = ("on the left", "near the window", "in the street", "on a table", "by the door", "in the grass",
          "under a tree", "at the back", "in the foreground", "next to a car")
ACTIONS = ("resting", "standing", "partly hidden", "seen from above", "in the shade")


def source_photos() -> list[Path]:
    photos = sorted(PHOTOS.glob("*.jpg"))
    if not photos:
        raise SystemExit(f"no photos found in {PHOTOS} (set VIRTUE_SHARED to the shared data folder)")
    return photos


def distinct_photos(n: int, tmp: Path, scale: int = 1) -> list[Path]:
    """n photos with distinct content: the mini-SCaR photos themselves (scale 1), else derived JPEGs in `tmp`
    (upscaled `scale` x bicubic, quality 92; mirrored copies once the photos run out)."""
    src = source_photos()
    out = []
    for i in range(n):
        path, variant = src[i % len(src)], i // len(src)
        if scale == 1 and variant == 0:
            out.append(path)
            continue
        with Image.open(path) as opened:
            img = opened.convert("RGB")
        if variant % 2:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if variant > 1:
            img = img.crop((variant, variant, img.width, img.height))
        if scale != 1:
            img = img.resize((img.width * scale, img.height * scale), Image.Resampling.BICUBIC)
        dest = tmp / f"{path.stem}-x{scale}-v{variant}.jpg"
        img.save(dest, quality=92)
        out.append(dest)
    return out


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def box_in(size: tuple[int, int], j: int, k: int) -> list[int]:
    """The j-th of k distinct boxes inside a w x h photo (XYXY pixels)."""
    w, h = size
    x0, y0 = int(w * (0.05 + 0.4 * j / k)), int(h * (0.08 + 0.3 * j / k))
    return [x0, y0, min(w - 1, x0 + int(w * (0.3 + 0.1 * j / k))), min(h - 1, y0 + int(h * 0.45))]


def caption(i: int) -> str:
    """The i-th of 5,000 distinct short captions."""
    i, a = divmod(i, len(ADJECTIVES))
    i, n = divmod(i, len(NOUNS))
    i, p = divmod(i, len(PLACES))
    act = ACTIONS[i % len(ACTIONS)]
    return f"A {ADJECTIVES[a]} {NOUNS[n]} {act} {PLACES[p]}."


def scar_workload(photos: Sequence[Path], k: int) -> tuple[list[dict], list[str]]:
    """k box queries per photo with the official SCaR query text, 10 distinct candidate captions per query."""
    queries, candidates = [], []
    for path in photos:
        size = image_size(path)
        for j in range(k):
            box = box_in(size, j, k)
            queries.append({"image": path, "text": scar_query_text(box), "box": box})
    for q in range(len(queries)):
        candidates += [caption(q * CANDIDATES_PER_QUERY + c) for c in range(CANDIDATES_PER_QUERY)]
    return queries, candidates


def mmeb_workload(photos: Sequence[Path], num_queries: int, num_candidates: int) -> tuple[list[dict], list[str]]:
    queries = [{"image": photos[i % len(photos)], "text": mmeb_query_text(MMEB_INSTRUCTIONS[i % 3])}
               for i in range(num_queries)]
    return queries, [caption(i) for i in range(num_candidates)]


def pipeline_items(photos: Sequence[Path]) -> list[EmbedInput]:
    return [parse_input({"image": path, "text": PIPELINE_INSTRUCTION, "box": box_in(image_size(path), 0, 1)}, i)
            for i, path in enumerate(photos)]


def workload_flops(model: Any, queries: Sequence[dict], candidates: Sequence[str], resize: tuple[int, int] | None,
                   *, per_row: bool, lm_head: bool = False) -> Flops:
    """FLOPs executed: the image towers once per query row (`per_row`) or once per distinct image (`encode` with
    feature reuse); `lm_head`: logits over the vocabulary at every position too (the official forward)."""
    proc = model.processor
    checked = proc.check_inputs([parse_input(q, i) for i, q in enumerate(queries)], image_resize=resize)
    grids: dict[Any, tuple[int, int, int]] = {}
    images, image_rows = [], []
    ip = model.config.image_processing
    for item in checked:
        size = proc.displayed_size(item, "query")
        w, h = resize or size
        rh, rw = smart_resize(h, w, ip)
        grid = (1, rh // ip.patch_size, rw // ip.patch_size)
        sparse = 0
        if model.sam is not None:  # the prompt's points + SAM's padding point (a box: 3)
            sparse = len(proc.sam_prompt(item, size, model.sam.mask_input_size).labels) + 1
        image_rows.append((len(item.token_ids), sparse))
        if per_row:
            images.append(grid)
        else:
            grids.setdefault(item.image_identity(), grid)
    images += list(grids.values())
    text_rows = [len(c.token_ids) for c in proc.check_inputs([parse_input(c, i) for i, c in enumerate(candidates)])]
    return forward_flops(model.config, images=images, image_rows=image_rows, text_rows=text_rows, lm_head=lm_head)
