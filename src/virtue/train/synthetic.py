"""Procedural SCaR-style data: coloured shapes on distinct backgrounds, a box around one shape, 10 captions.

A caption reads `a <colour> <shape> <relation> a <colour> <shape> <scene>`: the boxed object, its relation
to one other object (from the geometry of the two centres) and the background kind. It is small enough
to train a model from scratch on CPU, and every negative is checked false against the rendered scene.

Candidate layout. SCaR's negatives each change one part of the positive; the positive is then the
per-part majority of the 10 candidates and a text-only "consensus caption" picks it every time. Here,
as in mini-SCaR, each query uses one true (t) and one wrong (f) value per part (object, relation,
scene), crossed as a 2x2x2 cube, plus two captions wrong in every part with "fresh" values whose words
never favour one side of the cube. Counting words then ties the 8 cube captions (1 in 8 by chance).
The order is still SCaR's: gt, 3 `global_context`, 3 `background_relation`, 3 `object_swap`; each group
holds one caption wrong in its own part only, one wrong in two parts and one wrong everywhere.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from virtue.inputs import EmbedInput
from virtue.processing.text import DATASET_IMAGE_TOKEN, SCAR_INSTRUCTION, scar_query_text
from virtue.prompts import Box, VisualPrompt
from virtue.train.examples import TrainExample

SHAPES = ("circle", "square", "triangle", "cross")
# Saturated colours that no background uses, so a pixel of one of them always belongs to an object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "blue": (40, 70, 230),
    "yellow": (245, 215, 0),
    "white": (250, 250, 250),
    "purple": (150, 50, 200),
}
# No two scene phrases share a word, so a wrong scene never echoes the true one word by word.
SCENES = ("in a forest", "on a beach", "at night", "inside a kitchen", "by a brick wall")
RELATIONS = ("to the left of", "to the right of", "above", "below")
KINDS = ("gt", "global_context", "background_relation", "object_swap")
CANDIDATE_KINDS = ("gt",) + ("global_context",) * 3 + ("background_relation",) * 3 + ("object_swap",) * 3
# The `qry` column of SCaR-train rows: the dataset's image token, a newline, the instruction.
SCAR_TRAIN_QRY = f"{DATASET_IMAGE_TOKEN}\n{SCAR_INSTRUCTION}"
# Rows appended by `write_scar_parquet(..., with_bad_rows=True)`, in this order, after the n good rows.
BAD_ROW_KINDS = ("missing_image", "bbox_outside", "empty_caption")

_TRAIN_STREAM, _EVAL_STREAM = 0, 1
_MAX_TRIES = 50
_PARQUET_NAME = "synthetic_scar_train.parquet"


@dataclass(frozen=True)
class Desc:
    """What a caption says about one object."""

    colour: str
    shape: str

    def __str__(self) -> str:
        return f"{self.colour} {self.shape}"


ALL_DESCS = tuple(Desc(c, s) for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape; `box` is XYXY in pixels, x2/y2 exclusive (so x2 - x1 is the pixel width)."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box
        return (x1 + x2) / 2, (y1 + y2) / 2

    @property
    def desc(self) -> Desc:
        return Desc(self.colour, self.shape)


@dataclass(frozen=True, eq=False)
class Scene:
    image: Image.Image
    objects: list[SceneObject]
    scene: str


@dataclass(frozen=True)
class CaptionParts:
    """`a <target> <relation> a <anchor> <scene>`."""

    target: Desc
    relation: str
    anchor: Desc
    scene: str

    @property
    def text(self) -> str:
        return caption(self.target, self.relation, self.anchor, self.scene)


@dataclass(frozen=True)
class Candidate:
    parts: CaptionParts
    kind: str

    @property
    def text(self) -> str:
        return self.parts.text


# ---------------------------------------------------------------- scenes


def make_scene(rng: np.random.Generator, size: int = 112) -> Scene:
    """2-4 non-overlapping shapes (18-30 % of the side, each colour+shape at most once) on a background."""
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels for the shapes to be visible, got {size}")
    kind = SCENES[int(rng.integers(len(SCENES)))]
    image = Image.fromarray(_BACKGROUNDS[kind](rng, size))
    boxes = None
    while boxes is None:
        boxes = _place_boxes(rng, size, int(rng.integers(2, 5)))
    descs = [ALL_DESCS[i] for i in rng.choice(len(ALL_DESCS), size=len(boxes), replace=False)]
    objects = [SceneObject(d.shape, d.colour, b) for d, b in zip(descs, boxes, strict=True)]
    draw = ImageDraw.Draw(image)
    for obj in objects:
        _draw_shape(draw, obj)
    return Scene(image, objects, kind)


def _place_boxes(rng: np.random.Generator, size: int, k: int) -> list[tuple[int, int, int, int]] | None:
    lo, hi = round(0.18 * size), round(0.30 * size)
    gap = max(size // 40, 2)  # a visible strip of background between shapes keeps them apart
    boxes: list[tuple[int, int, int, int]] = []
    for _ in range(k):
        for _ in range(100):
            s = int(rng.integers(lo, hi + 1))
            x, y = (int(v) for v in rng.integers(1, size - s, size=2))
            box = (x, y, x + s, y + s)
            if all(_apart(box, other, gap) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _apart(a: tuple[int, ...], b: tuple[int, ...], gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _draw_shape(draw: ImageDraw.ImageDraw, obj: SceneObject) -> None:
    x1, y1, x2, y2 = obj.box
    r = (x1, y1, x2 - 1, y2 - 1)  # PIL includes the end pixel; the box's x2/y2 are exclusive
    fill = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse(r, fill=fill)
    elif obj.shape == "square":
        draw.rectangle(r, fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
    else:  # cross: two bars a third of the side thick
        t = (x2 - x1) // 3
        draw.rectangle((x1 + t, y1, x2 - 1 - t, y2 - 1), fill=fill)
        draw.rectangle((x1, y1 + t, x2 - 1, y2 - 1 - t), fill=fill)


def _forest(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), (34, 96, 44), np.uint8)
    step, width = max(size // 8, 4), max(size // 28, 2)
    for x in range(int(rng.integers(step)), size, step):
        img[:, x : x + width] = (20, 58, 26)  # tree trunks
    return img


def _beach(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), (228, 206, 152), np.uint8)  # sand
    img[: int(size * rng.uniform(0.35, 0.55))] = (80, 165, 205)  # sea above the shore line
    return img


def _night(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), (14, 20, 56), np.uint8)
    ys, xs = rng.integers(size, size=(2, size * size // 120))
    img[ys, xs] = (200, 200, 160)  # stars
    return img


def _kitchen(rng: np.random.Generator, size: int) -> np.ndarray:
    tile = max(size // 8, 4)
    oy, ox = rng.integers(tile, size=2)
    yy, xx = np.indices((size, size))
    light = ((yy + oy) // tile + (xx + ox) // tile) % 2 == 0
    return np.where(light[..., None], np.array((178, 178, 178)), np.array((138, 138, 138))).astype(np.uint8)


def _brick(rng: np.random.Generator, size: int) -> np.ndarray:
    img = np.full((size, size, 3), (168, 96, 62), np.uint8)
    mortar, h = (214, 204, 188), max(size // 10, 4)
    for row, y in enumerate(range(int(rng.integers(h)) - h, size, h)):
        if y >= 0:
            img[y] = mortar
        # bricks are two rows long, every other course shifted by half a brick
        img[max(y, 0) : y + h, (row % 2) * h :: 2 * h] = mortar
    return img


_BACKGROUNDS = {
    "in a forest": _forest,
    "on a beach": _beach,
    "at night": _night,
    "inside a kitchen": _kitchen,
    "by a brick wall": _brick,
}


# ---------------------------------------------------------------- relations and truth


def _offset(a: SceneObject, b: SceneObject) -> tuple[float, float]:
    (ax, ay), (bx, by) = a.centre, b.centre
    return ax - bx, ay - by


def relation_between(a: SceneObject, b: SceneObject) -> str:
    """Where `a` is relative to `b`, along the dominant axis of the centre offset (image y grows down)."""
    dx, dy = _offset(a, b)
    if abs(dx) >= abs(dy):
        return RELATIONS[0] if dx < 0 else RELATIONS[1]
    return RELATIONS[2] if dy < 0 else RELATIONS[3]


def _arguably_holds(relation: str, a: SceneObject, b: SceneObject) -> bool:
    """Lenient reading: the offset points the relation's way by at least half the cross-axis offset.

    Negatives must be false even under this reading, so a diagonal pair ("left of" and "above" both
    defensible) never yields a negative that a reader could call true.
    """
    dx, dy = _offset(a, b)
    along, across = {
        RELATIONS[0]: (-dx, dy),
        RELATIONS[1]: (dx, dy),
        RELATIONS[2]: (-dy, dx),
        RELATIONS[3]: (dy, dx),
    }[relation]
    return along > 0 and along >= 0.5 * abs(across)


def is_true(parts: CaptionParts, scene: Scene) -> bool:
    """Whether the caption could be read as true of *some* object of the scene (not only the boxed one)."""
    if parts.scene != scene.scene:
        return False
    return any(
        _arguably_holds(parts.relation, a, b)
        for a in scene.objects
        if a.desc == parts.target
        for b in scene.objects
        if b is not a and b.desc == parts.anchor
    )


def caption(target: Desc | SceneObject, relation: str, other: Desc | SceneObject, scene: str) -> str:
    """E.g. "a red circle to the left of a blue square in a forest"."""
    return f"a {target.colour} {target.shape} {relation} a {other.colour} {other.shape} {scene}"


# ---------------------------------------------------------------- candidates


def scar_candidates(scene: Scene, target_index: int, rng: np.random.Generator) -> list[Candidate]:
    """The 10 candidates (index 0 the ground truth) with their kinds, in `CANDIDATE_KINDS` order."""
    for _ in range(_MAX_TRIES):
        candidates = _try_candidates(scene, target_index, rng)
        if candidates is not None:
            return candidates
    raise RuntimeError(f"no valid candidate set for object {target_index} after {_MAX_TRIES} tries")


def scar_example(scene: Scene, target_index: int, rng: np.random.Generator) -> tuple[EmbedInput, list[str]]:
    """A SCaR query (image, box, instruction with the box) and its 10 captions, ground truth first."""
    candidates = scar_candidates(scene, target_index, rng)
    return _query(scene, target_index), [c.text for c in candidates]


def _query(scene: Scene, target_index: int) -> EmbedInput:
    box = scene.objects[target_index].box
    return EmbedInput(text=scar_query_text(box), image=scene.image, prompt=VisualPrompt(box=Box(*map(float, box))))


def _try_candidates(scene: Scene, target_index: int, rng: np.random.Generator) -> list[Candidate] | None:
    target = scene.objects[target_index]
    anchor = _pick_anchor(scene, target_index, rng)
    gt = CaptionParts(target.desc, relation_between(target, anchor), anchor.desc, scene.scene)
    f_rel = _wrong_relation(scene, gt, rng)
    f_obj = _wrong_object(scene, gt, f_rel, rng)
    if f_obj is None:
        return None
    f_scene = _choice(rng, [s for s in SCENES if s != gt.scene])
    cube = {
        (o, r, s): CaptionParts(
            gt.target if o else f_obj,
            gt.relation if r else f_rel[0],
            gt.anchor if r else f_rel[1],
            gt.scene if s else f_scene,
        )
        for o, r, s in itertools.product((True, False), repeat=3)
    }
    fresh = _fresh_pair(list(cube.values()), rng)
    if fresh is None:
        return None
    t, f = True, False
    groups = (
        [cube[t, t, t]],
        [cube[t, t, f], cube[t, f, f], fresh[0]],  # global_context: wrong scene
        [cube[t, f, t], cube[f, f, t], cube[f, f, f]],  # background_relation: wrong relation
        [cube[f, t, t], cube[f, t, f], fresh[1]],  # object_swap: wrong object
    )
    candidates = [Candidate(p, kind) for kind, group in zip(KINDS, groups, strict=True) for p in group]
    return candidates if _valid(candidates, scene) else None


def _choice(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))]


def _pick_anchor(scene: Scene, target_index: int, rng: np.random.Generator) -> SceneObject:
    """Another object, preferring one where only a single relation word is defensible."""
    target = scene.objects[target_index]
    others = [o for i, o in enumerate(scene.objects) if i != target_index]
    clear = [o for o in others if sum(_arguably_holds(r, target, o) for r in RELATIONS) == 1]
    return _choice(rng, clear or others)


def _wrong_relation(scene: Scene, gt: CaptionParts, rng: np.random.Generator) -> tuple[str, Desc]:
    """A false (relation word, anchor) pair: another word, or another anchor present or absent."""
    words = [(w, gt.anchor) for w in RELATIONS if w != gt.relation]
    anchors = [(gt.relation, d) for d in ALL_DESCS if d not in (gt.anchor, gt.target)]
    options = [p for p in words + anchors if not is_true(replace(gt, relation=p[0], anchor=p[1]), scene)]
    present = {o.desc for o in scene.objects}
    pools = [
        [p for p in options if p[1] == gt.anchor],
        [p for p in options if p[1] != gt.anchor and p[1] in present],  # hard: a real object, wrong side
        [p for p in options if p[1] not in present],
    ]
    return _choice(rng, _choice(rng, [pool for pool in pools if pool]))


def _wrong_object(scene: Scene, gt: CaptionParts, f_rel: tuple[str, Desc], rng: np.random.Generator) -> Desc | None:
    """Another colour, shape or both for the target, false with the true and the wrong relation."""

    def false_everywhere(d: Desc) -> bool:
        with_true = replace(gt, target=d)
        with_wrong = replace(gt, target=d, relation=f_rel[0], anchor=f_rel[1])
        return not is_true(with_true, scene) and not is_true(with_wrong, scene)

    options = [d for d in ALL_DESCS if d not in (gt.target, gt.anchor, f_rel[1]) and false_everywhere(d)]
    pools = [
        [d for d in options if d.shape == gt.target.shape],  # colour swapped
        [d for d in options if d.colour == gt.target.colour],  # shape swapped
        [d for d in options if d.shape != gt.target.shape and d.colour != gt.target.colour],
    ]
    pools = [pool for pool in pools if pool]
    return _choice(rng, _choice(rng, pools)) if pools else None


def _fresh_pair(cube: list[CaptionParts], rng: np.random.Generator) -> list[CaptionParts] | None:
    """Two all-wrong captions built only from words in all or none of the cube captions.

    A word found in some cube captions but not others would add weight to one side of the cube and
    let word counting single out the ground truth.
    """
    word_sets = [set(p.text.split()) for p in cube]
    common, seen = set.intersection(*word_sets), set.union(*word_sets)

    def neutral(values) -> list:
        return [v for v in values if all(w in common or w not in seen for w in v.split())]

    colours, shapes, relations = neutral(COLOURS), neutral(SHAPES), neutral(RELATIONS)
    scenes = [s for s in neutral(SCENES) if s not in {p.scene for p in cube}]
    if not (colours and shapes and relations and scenes):
        return None
    fresh = []
    for _ in range(_MAX_TRIES):
        target, anchor = (Desc(_choice(rng, colours), _choice(rng, shapes)) for _ in range(2))
        parts = CaptionParts(target, _choice(rng, relations), anchor, _choice(rng, scenes))
        if target != anchor and parts not in fresh:
            fresh.append(parts)
        if len(fresh) == 2:
            return fresh
    return None


def _valid(candidates: list[Candidate], scene: Scene) -> bool:
    """All distinct, the ground truth true, every negative false and wrong in its own part."""
    gt = candidates[0].parts
    if len({c.text for c in candidates}) != len(candidates) or not is_true(gt, scene):
        return False
    return all(not is_true(c.parts, scene) and wrong_in_kind(c.parts, gt, scene, c.kind) for c in candidates[1:])


def wrong_in_kind(parts: CaptionParts, gt: CaptionParts, scene: Scene, kind: str) -> bool:
    """Whether a negative is wrong in the part its kind names (scene, relation or object)."""
    if kind == "global_context":
        return parts.scene != gt.scene
    if kind == "object_swap":
        return parts.target != gt.target
    if kind == "background_relation":
        return not is_true(replace(gt, relation=parts.relation, anchor=parts.anchor), scene)
    raise ValueError(f"not a negative kind: {kind!r}")


# ---------------------------------------------------------------- data sets


@dataclass(frozen=True)
class _Sample:
    scene_index: int
    scene: Scene
    target_index: int
    candidates: list[Candidate]


def _rng(seed: int, stream: int) -> np.random.Generator:
    # Seeding with [seed, stream] keeps training and evaluation streams independent for every seed.
    return np.random.default_rng([seed, stream])


def _samples(rng: np.random.Generator, n: int, size: int) -> list[_Sample]:
    """One sample per (scene, target object), scenes drawn until there are n."""
    samples: list[_Sample] = []
    scene_index = 0
    while len(samples) < n:
        scene = make_scene(rng, size)
        for i in range(min(len(scene.objects), n - len(samples))):
            samples.append(_Sample(scene_index, scene, i, scar_candidates(scene, i, rng)))
        scene_index += 1
    return samples


def _interleaved_negatives(candidates: list[Candidate]) -> list[Candidate]:
    """Distractors taken one per kind in turn, so any prefix mixes the three kinds (hardest first)."""
    negatives = candidates[1:]
    return [negatives[g * 3 + i] for i in range(3) for g in range(3)]


def synthetic_train_examples(
    n: int, seed: int, *, size: int = 112, hard_negatives: int = 0, subset: str = "synthetic"
) -> list[TrainExample]:
    """n contrastive examples: SCaR query -> ground-truth caption, with up to 9 hard-negative captions."""
    if not 0 <= hard_negatives <= 9:
        raise ValueError(f"hard_negatives must be between 0 and 9, got {hard_negatives}")
    examples = []
    for i, s in enumerate(_samples(_rng(seed, _TRAIN_STREAM), n, size)):
        negatives = _interleaved_negatives(s.candidates)[:hard_negatives]
        examples.append(
            TrainExample(
                query=_query(s.scene, s.target_index),
                positive=EmbedInput(text=s.candidates[0].text),
                negatives=tuple(EmbedInput(text=c.text) for c in negatives),
                subset=subset,
                row_id=f"synthetic:{i}",
            )
        )
    return examples


def synthetic_eval_queries(n: int, seed: int, size: int = 112) -> list[tuple[EmbedInput, list[str]]]:
    """n held-out SCaR queries (a random stream disjoint from training) with their 10 candidates."""
    return [
        (_query(s.scene, s.target_index), [c.text for c in s.candidates])
        for s in _samples(_rng(seed, _EVAL_STREAM), n, size)
    ]


# ---------------------------------------------------------------- SCaR-train parquet

_PARQUET_SCHEMA = pa.schema(
    [
        ("qry", pa.string()),
        ("qry_image_path", pa.string()),
        ("pos_text", pa.string()),
        ("pos_image_path", pa.string()),
        ("bbox", pa.list_(pa.int64())),
        ("segmentation", pa.list_(pa.list_(pa.float64()))),
        ("category", pa.string()),
        ("image_id", pa.int64()),
        ("neg_text", pa.list_(pa.string())),
    ]
)


def write_scar_parquet(dir: Path, n: int, seed: int, size: int = 112, with_bad_rows: bool = False) -> Path:
    """Write PNGs under dir/images/ and a SCaR-train parquet of n rows; return the parquet's path.

    The rows are those of `synthetic_train_examples(n, seed, size=size)`. `bbox` is COCO [x, y, w, h] in
    pixels; image paths are relative to `dir`. with_bad_rows appends one row per `BAD_ROW_KINDS` entry,
    in that order: an image file that does not exist, a bbox reaching outside its image, an empty caption.
    """
    dir = Path(dir)
    (dir / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for s in _samples(_rng(seed, _TRAIN_STREAM), n, size):
        rel = f"images/{s.scene_index:06d}.png"
        if not (dir / rel).exists():
            s.scene.image.save(dir / rel)
        rows.append(_row(s, rel))
    if with_bad_rows:
        rows += _bad_rows(rows[0] if rows else None, size)
    path = dir / _PARQUET_NAME
    pq.write_table(pa.Table.from_pylist(rows, schema=_PARQUET_SCHEMA), path)
    return path


def _row(s: _Sample, image_path: str) -> dict:
    obj = s.scene.objects[s.target_index]
    x1, y1, x2, y2 = obj.box
    return {
        "qry": SCAR_TRAIN_QRY,
        "qry_image_path": image_path,
        "pos_text": s.candidates[0].text,
        "pos_image_path": None,
        "bbox": [x1, y1, x2 - x1, y2 - y1],
        "segmentation": None,
        "category": obj.shape,
        "image_id": s.scene_index,
        "neg_text": [c.text for c in s.candidates[1:]],
    }


def _bad_rows(template: dict | None, size: int) -> list[dict]:
    """Rows that are wrong in one known way each; the rest of each row is well formed."""
    if template is None:
        raise ValueError("with_bad_rows needs n >= 1 (bad rows are derived from a good one)")
    missing = {**template, "qry_image_path": "images/missing.png", "image_id": -1}
    outside = {**template, "bbox": [size - 8, size - 8, size // 2, size // 2]}
    empty = {**template, "pos_text": ""}
    return [missing, outside, empty]
