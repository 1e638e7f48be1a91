"""Image checks deferred to `run_deferred_checks` (`check_images=False`): no image opened at load, and the same
bad rows (row id, column, reason) as the checks at load time, for every kind of bad row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL import Image

from tests.train.test_data import BAD_SCAR_ROWS, _image, _jsonl, _parquet, _scar_row
from virtue.data.rows import BadRow, MaskFile, PolygonMask
from virtue.train.data import DataSource, ImageHeaders, Subset, load_source, run_deferred_checks

POLYGON = [[10, 20, 40, 20, 40, 60, 10, 60]]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _image(tmp_path / "imgs" / "a.png")  # 100 x 80
    _image(tmp_path / "imgs" / "b.png", (64, 48))
    (tmp_path / "imgs" / "garbage.png").write_bytes(b"not an image at all")
    masks = {
        "mask.png": np.zeros((80, 100), np.uint8),
        "small.png": np.full((40, 50), 255, np.uint8),
        "empty.png": np.zeros((80, 100), np.uint8),
        "grey.png": np.full((80, 100), 7, np.uint8),
    }
    masks["mask.png"][20:60, 10:40] = 255
    for name, array in masks.items():
        Image.fromarray(array).save(tmp_path / "imgs" / name)
    return tmp_path


def _scar_source(root: Path) -> DataSource:
    rows = [_scar_row(segmentation=POLYGON)]
    rows += [row for row, _ in BAD_SCAR_ROWS.values()]
    rows += [
        _scar_row(qry_image_path="imgs/garbage.png"),  # unreadable image
        _scar_row(qry_image_path=""),  # empty image path
        _scar_row(segmentation=[[1, 2, 3]]),  # malformed polygon
        _scar_row(bbox=[10, 50, 20, 40]),  # bbox below the image
        _scar_row(qry_image_path="imgs/b.png", bbox=[5, 5, 20, 20], segmentation=[[10, 10, 70, 10, 70, 40]]),
        _scar_row(qry_image_path="imgs/b.png", bbox=[5, 5, 20, 20]),
    ]
    return DataSource("scar", str(_parquet(root / "scar.parquet", rows)), hard_negatives=2, masks=True)


def _mmeb_source(root: Path) -> DataSource:
    base = {"qry": "<|image_1|> q", "qry_image_path": "imgs/a.png", "pos_text": "p", "pos_image_path": "",
            "neg_text": ["n"], "neg_image_path": [""]}
    rows = [
        base,
        base | {"qry_image_path": "imgs/nope.jpg"},
        base | {"qry_image_path": "imgs/garbage.png"},
        base | {"pos_text": "<|image_1|>", "pos_image_path": "imgs/missing.png"},
        base | {"neg_text": ["<|image_1|>"], "neg_image_path": ["imgs/gone.png"]},
        base | {"pos_text": ""},
        base | {"qry_image_path": ""},
        base | {"neg_text": []},
    ]
    return DataSource("mmeb", str(_parquet(root / "m.parquet", rows)), hard_negatives=1)


def _jsonl_source(root: Path) -> DataSource:
    img = "imgs/a.png"
    records = [
        {"query": {"text": "q", "image": img, "box": [10, 20, 40, 60], "mask": "imgs/mask.png"}, "positive": "p"},
        {"query": {"text": "q", "image": "imgs/missing.png"}, "positive": "p"},
        {"query": {"text": "q", "image": "imgs/garbage.png"}, "positive": "p"},
        {"query": {"image": img, "box": [10, 20, 140, 60]}, "positive": "p"},
        {"query": {"image": img, "box": [10, 20, 10, 60]}, "positive": "p"},
        {"query": {"image": img, "points": [[20, 30], [150, 10]], "labels": [1, 0]}, "positive": "p"},
        {"query": {"image": img, "points": [[20, 30]], "labels": [1, 0]}, "positive": "p"},
        {"query": {"image": img, "mask": "imgs/nomask.png"}, "positive": "p"},
        {"query": {"image": img, "mask": "imgs/small.png"}, "positive": "p"},
        {"query": {"image": img, "mask": "imgs/empty.png"}, "positive": "p"},
        {"query": {"image": img, "mask": "imgs/grey.png"}, "positive": "p"},
        {"query": {"image": img, "mask": "imgs/garbage.png"}, "positive": "p"},
        {"query": {"text": "q", "image": ""}, "positive": "p"},
        {"query": "q", "positive": {"image": "imgs/b.png", "box": [0, 0, 65, 10]}},
        {"query": "q", "positive": "p", "negatives": [{"text": "n", "image": "imgs/gone.png"}]},
        {"query": {"text": "q", "image": "imgs/b.png"}, "positive": "p", "negatives": ["n"]},
    ]
    records = [r | {"negatives": r.get("negatives", ["n"])} for r in records]
    return DataSource("jsonl", str(_jsonl(root / "j.jsonl", records)), hard_negatives=1)


SOURCES = {"scar": _scar_source, "mmeb": _mmeb_source, "jsonl": _jsonl_source}


def _row_index(bad: BadRow) -> int:
    return int(bad.row_id.rsplit(":", 1)[1])


def _lazy_bad_rows(subset: Subset, sizes: ImageHeaders | None = None) -> tuple[list[BadRow], list[str]]:
    """All bad rows of a lazily loaded subset (found at load or by the deferred checks) and the good row ids."""
    bad, good = list(subset.bad_rows), []
    for example in subset.examples:
        found = run_deferred_checks(example, sizes)
        if found is None:
            good.append(example.row_id)
        else:
            bad.append(found)
    return sorted(bad, key=_row_index), good


@pytest.mark.parametrize("kind", list(SOURCES))
def test_lazy_checks_report_the_same_bad_rows_as_eager_ones(root, kind):
    source = SOURCES[kind](root)
    (eager,) = load_source(source)
    (lazy,) = load_source(source, check_images=False)
    assert len(eager.bad_rows) >= 6 and all(e.deferred == () for e in eager.examples)
    bad, good = _lazy_bad_rows(lazy)
    assert bad == eager.bad_rows  # subset, row id, column and reason
    assert good == [e.row_id for e in eager.examples]
    # Every bad-row kind above is reported once, under its own row.
    assert len({_row_index(b) for b in bad}) == len(bad)


def test_the_expected_columns_are_named(root):
    (eager,) = load_source(_jsonl_source(root))
    assert [(_row_index(b), b.column) for b in eager.bad_rows] == [
        (1, "query.image"), (2, "query.image"), (3, "query.box"), (4, "query.box"), (5, "query.points"),
        (6, "query"), (7, "query.mask"), (8, "query.mask"), (9, "query.mask"), (10, "query.mask"),
        (11, "query.mask"), (12, "query.image"), (13, "positive.box"), (14, "negatives[0].image"),
    ]  # fmt: skip
    reasons = {_row_index(b): b.reason for b in eager.bad_rows}
    assert reasons[7].startswith("mask file not found") and "does not match the 100x80 image" in reasons[8]
    assert reasons[9] == "mask is empty (no pixel set)" and "binary values" in reasons[10]
    (scar,) = load_source(_scar_source(root))
    columns = [b.column for b in scar.bad_rows]
    assert columns[-5:] == ["qry_image_path", "qry_image_path", "segmentation", "bbox", "segmentation"]


def test_no_image_file_is_opened_at_load(root, monkeypatch):
    opened: list = []

    def refuse(path, *args, **kwargs):
        opened.append(path)
        raise AssertionError(f"image opened at load: {path}")

    monkeypatch.setattr(PIL.Image, "open", refuse)
    for make in SOURCES.values():
        (subset,) = load_source(make(root), check_images=False)
        assert any(e.deferred for e in subset.examples)
    assert opened == []


def test_a_shared_header_cache_reads_each_image_once(root, monkeypatch):
    (subset,) = load_source(_scar_source(root), check_images=False)
    opened: list = []
    real_open = PIL.Image.open

    def counting(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting)
    sizes = ImageHeaders()
    first, _ = _lazy_bad_rows(subset, sizes)
    assert sorted(set(opened)) == sorted(opened)  # no header read twice
    assert {p.name for p in opened} == {"a.png", "b.png", "garbage.png"}
    opened.clear()
    assert _lazy_bad_rows(subset, sizes)[0] == first and opened == []


def test_deferred_checks_name_column_image_and_part(root):
    (subset,) = load_source(_scar_source(root), check_images=False)
    checks = subset.examples[0].deferred
    image = root / "imgs" / "a.png"
    assert [(c.column, c.image) for c in checks] == [("qry_image_path", image), ("bbox", image),
                                                     ("segmentation", image)]
    assert checks[0].part is None and checks[1].part.xyxy == (10, 20, 40, 60)
    assert isinstance(checks[2].part, PolygonMask)
    (jsonl,) = load_source(_jsonl_source(root), check_images=False)
    mask_check = jsonl.examples[0].deferred[-1]
    assert mask_check.column == "query.mask" and isinstance(mask_check.part, MaskFile)


def test_lazily_loaded_polygon_mask_takes_the_image_size_when_drawn(root):
    (subset,) = load_source(_scar_source(root), check_images=False)
    mask = subset.examples[0].query.prompt.mask
    assert isinstance(mask, PolygonMask)
    assert mask.size_wh == (100, 80) and mask.array.shape == (80, 100)
    assert mask.array[40, 25] and not mask.array[5, 5]
    eager = load_source(_scar_source(root))[0].examples[0].query.prompt.mask
    np.testing.assert_array_equal(mask.array, eager.array)


def test_lazily_loaded_mask_file_is_read_when_used(root):
    (subset,) = load_source(_jsonl_source(root), check_images=False)
    mask = subset.examples[0].query.prompt.mask
    assert isinstance(mask, MaskFile) and mask.path == root / "imgs" / "mask.png"
    assert mask.array.shape == (80, 100) and mask.array[40, 20] and not mask.array[5, 5]


def test_limit_counts_rows_that_passed_the_load_checks(root):
    rows = [_scar_row(), _scar_row(qry_image_path="imgs/missing.png"), _scar_row(), _scar_row()]
    source = DataSource("scar", str(_parquet(root / "s.parquet", rows)), limit=2)
    (lazy,) = load_source(source, check_images=False)
    (eager,) = load_source(source)
    assert [e.row_id for e in lazy.examples] == ["s.parquet:0", "s.parquet:1"]  # row 1 is found bad later
    assert [e.row_id for e in eager.examples] == ["s.parquet:0", "s.parquet:2"]
