"""Training data loaders: SCaR / MMEB parquet and JSON lines become validated examples; bad rows are reported."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from virtue.errors import ConfigError, DataError
from virtue.train.data import DataSource, PolygonMask, load_source, load_sources

QRY = "<|image_1|>\nFind it."
NEGS = [f"wrong caption {i}" for i in range(9)]


def _image(path: Path, size: tuple[int, int] = (100, 80)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 30, 200)).save(path)
    return path


def _parquet(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _jsonl(path: Path, records: list) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def _scar_row(**overrides) -> dict:
    row = {
        "qry": QRY,
        "qry_image_path": "imgs/a.png",
        "pos_text": "a purple square",
        "pos_image_path": None,
        "bbox": [10, 20, 30, 40],
        "segmentation": None,
        "category": "square",
        "image_id": 1,
        "neg_text": NEGS,
    }
    return row | overrides


@pytest.fixture
def root(tmp_path: Path) -> Path:
    _image(tmp_path / "imgs" / "a.png")
    return tmp_path


# ------------------------------------------------------------------------------------------------ SCaR


def test_scar_row_query_text_box_and_negatives(root):
    path = _parquet(root / "SCAR_Test.parquet", [_scar_row()])
    (subset,) = load_source(DataSource("scar", str(path), image_root=str(root), hard_negatives=3, weight=2))
    assert (subset.name, subset.weight, subset.bad_rows) == ("SCAR_Test", 2.0, [])
    (ex,) = subset.examples
    assert ex.query.text == "<|image_pad|>\nFind it.\nReferring object bbox: [10, 20, 40, 60]"
    assert ex.query.image == root / "imgs" / "a.png"
    assert ex.query.prompt.box.xyxy == (10, 20, 40, 60)
    assert ex.query.prompt.mask is None
    assert ex.positive.text == "a purple square" and ex.positive.image is None
    assert [n.text for n in ex.negatives] == NEGS[:3]
    assert (ex.subset, ex.row_id) == ("SCAR_Test", "SCAR_Test.parquet:0")


def test_scar_without_hard_negatives_has_none(root):
    path = _parquet(root / "s.parquet", [_scar_row()])
    (subset,) = load_source(DataSource("scar", str(path)))  # image_root defaults to the file's folder
    assert subset.examples[0].negatives == ()


def test_scar_polygon_is_ignored_by_default_as_officially(root):
    polygon = [[10, 20, 40, 20, 40, 60, 10, 60]]
    path = _parquet(root / "s.parquet", [_scar_row(segmentation=polygon)])
    (subset,) = load_source(DataSource("scar", str(path)))
    prompt = subset.examples[0].query.prompt
    assert prompt.box.xyxy == (10, 20, 40, 60) and prompt.mask is None
    # Not read at all: a malformed polygon is no reason to drop a row that trains on its box.
    _parquet(path, [_scar_row(segmentation=[[1, 2, 3]])])
    (subset,) = load_source(DataSource("scar", str(path)))
    assert subset.bad_rows == [] and subset.examples[0].query.prompt.mask is None


def test_scar_masks_option_adds_the_polygon_as_mask_of_image_size(root):
    polygon = [[10, 20, 40, 20, 40, 60, 10, 60]]
    path = _parquet(root / "s.parquet", [_scar_row(segmentation=polygon), _scar_row()])
    (subset,) = load_source(DataSource("scar", str(path), masks=True))
    with_polygon, without = subset.examples
    prompt = with_polygon.query.prompt
    assert prompt.box.xyxy == (10, 20, 40, 60)
    assert with_polygon.query.text.endswith("Referring object bbox: [10, 20, 40, 60]")
    assert without.query.prompt.mask is None and without.query.prompt.box is not None
    assert isinstance(prompt.mask, PolygonMask)
    mask = prompt.mask.array
    assert mask.shape == (80, 100) and mask.dtype == bool
    assert mask[40, 25] and not mask[5, 5] and not mask[70, 90]
    prompt.validate((100, 80))  # box and mask both fit the image


def test_scar_folder_gives_one_subset_per_file_and_limit_keeps_first_good_rows(root):
    rows = [_scar_row(pos_text=f"caption {i}") for i in range(5)]
    rows[1] = _scar_row(pos_text="")  # bad: skipped and not counted towards the limit
    _parquet(root / "data" / "SCAR_B.parquet", rows)
    _parquet(root / "data" / "SCAR_A.parquet", [_scar_row()])
    subsets = load_source(DataSource("scar", str(root / "data"), image_root=str(root), limit=3))
    assert [s.name for s in subsets] == ["SCAR_A", "SCAR_B"]
    assert [e.positive.text for e in subsets[1].examples] == ["caption 0", "caption 2", "caption 3"]
    assert [b.row_id for b in subsets[1].bad_rows] == ["SCAR_B.parquet:1"]


# ------------------------------------------------------------------------------------------------ bad rows

BAD_SCAR_ROWS = {
    "missing image file": (_scar_row(qry_image_path="imgs/missing.png"), "qry_image_path"),
    "bbox outside the image": (_scar_row(bbox=[80, 20, 30, 40]), "bbox"),
    "empty caption": (_scar_row(pos_text="  "), "pos_text"),
    "malformed bbox": (_scar_row(bbox=[10, 20, 30]), "bbox"),
    "zero-area bbox": (_scar_row(bbox=[10, 20, 0, 40]), "bbox"),
    "polygon outside the image": (_scar_row(segmentation=[[0, 0, 500, 0, 500, 10]]), "segmentation"),
    "too few negatives": (_scar_row(neg_text=["only one"]), "neg_text"),
}


def test_bad_rows_are_skipped_reported_and_logged(root, caplog):
    rows = [_scar_row()] + [row for row, _ in BAD_SCAR_ROWS.values()]
    path = _parquet(root / "mixed.parquet", rows)
    with caplog.at_level(logging.WARNING, logger="virtue.train.data"):
        (subset,) = load_source(DataSource("scar", str(path), hard_negatives=2, masks=True), on_bad_row="skip")
    assert [e.row_id for e in subset.examples] == ["mixed.parquet:0"]
    expected = [(f"mixed.parquet:{i + 1}", column) for i, (_, column) in enumerate(BAD_SCAR_ROWS.values())]
    assert [(b.row_id, b.column) for b in subset.bad_rows] == expected
    assert all(b.subset == "mixed" and b.reason for b in subset.bad_rows)
    (record,) = [r for r in caplog.records if r.name == "virtue.train.data"]
    assert record.levelno == logging.WARNING
    assert f"skipped {len(BAD_SCAR_ROWS)} bad row(s)" in record.getMessage()
    assert "mixed.parquet:1" in record.getMessage() and "qry_image_path" in record.getMessage()


@pytest.mark.parametrize("kind", list(BAD_SCAR_ROWS))
def test_bad_row_raises_in_error_mode_naming_row_and_column(root, kind):
    row, column = BAD_SCAR_ROWS[kind]
    path = _parquet(root / "scar.parquet", [_scar_row(), row])
    with pytest.raises(DataError) as info:
        load_source(DataSource("scar", str(path), hard_negatives=2, masks=True), on_bad_row="error")
    assert "scar.parquet:1" in str(info.value) and repr(column) in str(info.value)
    assert str(path) in str(info.value)


def test_file_missing_columns_is_a_data_error(root):
    path = _parquet(root / "broken.parquet", [{"qry": QRY, "pos_text": "x"}])
    with pytest.raises(DataError, match=r"broken\.parquet.*\['qry_image_path', 'bbox'\]"):
        load_source(DataSource("scar", str(path)))


def test_negatives_column_required_when_hard_negatives_asked(root):
    path = _parquet(root / "s.parquet", [{k: v for k, v in _scar_row().items() if k != "neg_text"}])
    with pytest.raises(DataError, match="neg_text"):
        load_source(DataSource("scar", str(path), hard_negatives=1))


def test_subset_without_any_good_row_is_an_error(root):
    path = _parquet(root / "s.parquet", [_scar_row(pos_text="")])
    with pytest.raises(DataError, match="no usable row"):
        load_source(DataSource("scar", str(path)))


# ------------------------------------------------------------------------------------------------ MMEB


def test_mmeb_text_and_image_sides(root):
    _image(root / "imgs" / "b.png", (64, 48))
    rows = [
        {
            "qry": "<|image_1|>\nRepresent the given image for classification",
            "qry_image_path": "imgs/a.png",
            "pos_text": "purple",
            "pos_image_path": "",
            "neg_text": "green",
            "neg_image_path": "",
        },
        {
            "qry": "Find me an everyday image that matches the given caption: a purple square",
            "qry_image_path": "",
            "pos_text": "<|image_1|>\nRepresent the given image.",
            "pos_image_path": "imgs/b.png",
            "neg_text": "<|image_1|>\nRepresent the given image.",
            "neg_image_path": "imgs/a.png",
        },
    ]
    path = _parquet(root / "MSCOCO.parquet", rows)
    (subset,) = load_source(DataSource("mmeb", str(path), image_root=str(root), hard_negatives=1))
    first, second = subset.examples
    assert first.query.text == "<|image_pad|>\nRepresent the given image for classification"
    assert first.query.image == root / "imgs" / "a.png"
    assert (first.positive.text, first.positive.image) == ("purple", None)
    assert [(n.text, n.image) for n in first.negatives] == [("green", None)]
    assert second.query.image is None and second.query.text.startswith("Find me")
    assert second.positive.text == "<|image_pad|>\nRepresent the given image."
    assert second.positive.image == root / "imgs" / "b.png"
    assert second.negatives[0].image == root / "imgs" / "a.png"


def test_mmeb_bad_rows(root):
    base = {"qry": "<|image_1|> q", "qry_image_path": "imgs/a.png", "pos_text": "p", "pos_image_path": ""}
    rows = [
        base,
        base | {"qry_image_path": "imgs/nope.jpg"},
        base | {"pos_text": ""},  # text-only side with no text
        base | {"qry_image_path": ""},  # image token but no image
    ]
    path = _parquet(root / "m.parquet", rows)
    (subset,) = load_source(DataSource("mmeb", str(path)))
    assert [(b.row_id, b.column) for b in subset.bad_rows] == [
        ("m.parquet:1", "qry_image_path"),
        ("m.parquet:2", "pos_text"),
        ("m.parquet:3", "qry"),
    ]


def test_hf_arrow_without_datasets_names_what_to_install(root, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # behave as if `datasets` were not installed
    arrow = root / "data-00000-of-00001.arrow"
    arrow.write_bytes(b"")
    with pytest.raises(ConfigError, match="datasets"):
        load_source(DataSource("mmeb", str(arrow)))


# ------------------------------------------------------------------------------------------------ JSON lines


def test_jsonl_box_points_mask_and_subsets(root):
    mask = np.zeros((80, 100), np.uint8)
    mask[20:60, 10:40] = 255
    Image.fromarray(mask).save(root / "imgs" / "mask.png")
    records = [
        {
            "query": {"text": "What is boxed?", "image": "imgs/a.png", "box": [10, 20, 40, 60]},
            "positive": "a purple square",
            "negatives": [{"text": "a dog"}, "a cat"],
        },
        {
            "query": {"image": "imgs/a.png", "points": [[20, 30], [90, 70]], "labels": [1, 0]},
            "positive": {"text": "square"},
            "negatives": ["circle", "triangle"],
            "subset": "points",
        },
        {
            "query": {"image": "imgs/a.png", "mask": "imgs/mask.png"},
            "positive": "masked",
            "negatives": ["n1", "n2", "n3"],
            "subset": "points",
        },
    ]
    path = _jsonl(root / "mine.jsonl", records)
    first, second = load_source(DataSource("jsonl", str(path), hard_negatives=2))
    assert [s.name for s in (first, second)] == ["mine", "points"]
    (boxed,) = first.examples
    assert boxed.query.image == root / "imgs" / "a.png"
    assert boxed.query.prompt.box.xyxy == (10, 20, 40, 60)
    assert boxed.positive.text == "a purple square"
    assert [n.text for n in boxed.negatives] == ["a dog", "a cat"]
    pointed, masked = second.examples
    assert pointed.query.prompt.points.xy == ((20, 30), (90, 70)) and pointed.query.prompt.points.labels == (1, 0)
    assert masked.query.prompt.mask.array.shape == (80, 100) and masked.query.prompt.mask.array[40, 20]
    assert (pointed.row_id, masked.row_id) == ("mine.jsonl:1", "mine.jsonl:2")


def test_jsonl_bad_rows(root, caplog):
    good = {"query": {"text": "q", "image": "imgs/a.png"}, "positive": "p"}
    records = [
        good,
        "{not json",
        {"query": {"image": "imgs/a.png", "points": [[150, 10]]}, "positive": "p"},
        {"query": {"image": "imgs/a.png", "box": [10, 10, 10, 30]}, "positive": "p"},
        {"query": good["query"], "positive": {"text": 3}},
        {"query": {"text": "q", "image": "missing.png"}, "positive": "p"},
        {"query": {"image": "imgs/a.png", "box": [1, 2, 3]}, "positive": "p"},
        {"query": good["query"]},
    ]
    path = _jsonl(root / "bad.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="virtue.train.data"):
        (subset,) = load_source(DataSource("jsonl", str(path)))
    assert len(subset.examples) == 1
    assert [(b.row_id, b.column) for b in subset.bad_rows] == [
        ("bad.jsonl:1", "json"),
        ("bad.jsonl:2", "query.points"),
        ("bad.jsonl:3", "query.box"),
        ("bad.jsonl:4", "positive"),
        ("bad.jsonl:5", "query.image"),
        ("bad.jsonl:6", "query"),
        ("bad.jsonl:7", "positive"),
    ]
    assert "skipped 7 bad row(s)" in caplog.text
    with pytest.raises(DataError, match=r"bad\.jsonl:1, column 'json'"):
        load_source(DataSource("jsonl", str(path)), on_bad_row="error")


# ------------------------------------------------------------------------------------------------ configuration


def test_data_source_from_dict_validates_keys_and_values(tmp_path):
    source = DataSource.from_dict({"kind": "scar", "path": tmp_path, "weight": 2, "limit": 5, "masks": True})
    assert (source.path, source.weight, source.limit, source.masks) == (str(tmp_path), 2.0, 5, True)
    source = DataSource.from_dict({"kind": "mmeb", "path": "x", "subsets": ["VisDial", "CIRR"]})
    assert (source.subsets, source.masks) == (("VisDial", "CIRR"), False)
    bad = [
        ({"kind": "scar", "path": "x", "wieght": 1}, "wieght"),
        ({"kind": "csv", "path": "x"}, "kind"),
        ({"kind": "scar"}, "path"),
        ({"kind": "scar", "path": "x", "weight": 0}, "weight"),
        ({"kind": "scar", "path": "x", "limit": 0}, "limit"),
        ({"kind": "scar", "path": "x", "hard_negatives": -1}, "hard_negatives"),
        ({"kind": "scar", "path": "x", "hard_negatives": True}, "hard_negatives"),
        ({"kind": "mmeb", "path": "x", "masks": True}, "masks"),
        ({"kind": "scar", "path": "x", "masks": "yes"}, "masks"),
        ({"kind": "mmeb", "path": "x", "subsets": "MSCOCO"}, "subsets"),
        ({"kind": "mmeb", "path": "x", "subsets": []}, "subsets"),
        ({"kind": "mmeb", "path": "x", "subsets": ["A", "A"]}, "subsets"),
        ({"kind": "jsonl", "path": "x", "subsets": ["A"]}, "subsets"),
    ]
    for data, key in bad:
        with pytest.raises(ConfigError, match=key):
            DataSource.from_dict(data)


def test_load_sources_requires_unique_subset_names(root):
    a = _parquet(root / "one" / "S.parquet", [_scar_row()])
    b = _parquet(root / "two" / "S.parquet", [_scar_row()])
    common = {"kind": "scar", "image_root": str(root)}
    with pytest.raises(ConfigError, match="'S'"):
        load_sources([common | {"path": str(a)}, common | {"path": str(b)}])
    subsets = load_sources([common | {"path": str(a)}, DataSource("scar", str(b), str(root), name="S2")])
    assert [s.name for s in subsets] == ["S", "S2"]


def test_load_errors_name_the_setting(root):
    with pytest.raises(ConfigError, match="path"):
        load_source(DataSource("scar", str(root / "nowhere.parquet")))
    with pytest.raises(ConfigError, match="image_root"):
        load_source(DataSource("scar", str(root), image_root=str(root / "nowhere")))
    with pytest.raises(ConfigError, match="on_bad_row"):
        load_source(DataSource("scar", str(root)), on_bad_row="ignore")
