"""Evaluation loaders: SCaR-Eval variants on mini-SCaR (real COCO photos), bad rows, file discovery, MMEB-eval."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from virtue.errors import ConfigError, DataError
from virtue.eval.datasets import (
    SCAR_SUBSETS,
    SCAR_VARIANTS,
    EvalQuery,
    find_scar_files,
    load_mmeb_eval,
    load_scar_eval,
    mmeb_family,
    scar_eval_query_text,
)
from virtue.inputs import EmbedInput
from virtue.processing.text import DATASET_IMAGE_TOKEN, IMAGE_TOKEN, SCAR_INSTRUCTION, scar_query_text
from virtue.train.data import PolygonMask

MINI_SCAR = Path(__file__).resolve().parents[2].parent / "shared/data/mini-scar"
PARQUET = MINI_SCAR / "mini_scar.parquet"
N_ROWS = 72
STANDARD_QRY = f"{DATASET_IMAGE_TOKEN}\n{SCAR_INSTRUCTION}"


@pytest.fixture(scope="module")
def raw_rows() -> list[dict]:
    assert PARQUET.is_file(), f"mini-SCaR not found at {MINI_SCAR}"
    return pq.read_table(PARQUET).to_pylist()


@pytest.fixture(scope="module")
def loaded() -> dict[str, list[EvalQuery]]:
    return {v: load_scar_eval(PARQUET, MINI_SCAR, task="mini", variant=v) for v in SCAR_VARIANTS}


def _xyxy(bbox: list[int]) -> tuple[int, int, int, int]:
    x, y, w, h = bbox
    return x, y, x + w, y + h


def _rewrite(tmp_path: Path, edit, drop: tuple[str, ...] = ()) -> Path:
    """A copy of mini-SCaR's parquet with `edit(rows)` applied and the `drop` columns removed (images stay put)."""
    table = pq.read_table(PARQUET)
    rows = table.to_pylist()
    edit(rows)
    out = pa.Table.from_pylist(rows, schema=table.schema).drop_columns(list(drop))
    path = tmp_path / "mini_scar.parquet"
    pq.write_table(out, path)
    return path


# ---------------------------------------------------------------------------------------------------------------
# Query text


def test_query_text_is_the_official_build():
    text = scar_eval_query_text(STANDARD_QRY, [0, 417, 681, 93])
    assert text == (
        f"{IMAGE_TOKEN} \n{SCAR_INSTRUCTION}\nReferring object bbox: [0, 417, 681, 510]"
    )  # virtue-spec §5.3's example


@pytest.mark.parametrize("bbox", [[0, 417, 681, 93], [162, 226, 131, 185], [5, 6, 1, 1]])
def test_query_text_equals_scar_query_text(bbox):
    assert scar_eval_query_text(STANDARD_QRY, bbox) == scar_query_text(_xyxy(bbox))


def test_query_text_prints_numbers_like_python():
    # The official code prints `str(list)`: ints stay ints, floats stay floats, numpy scalars become plain numbers.
    assert scar_eval_query_text(STANDARD_QRY, np.array([1, 2, 3, 4])).endswith("bbox: [1, 2, 4, 6]")
    assert scar_eval_query_text(STANDARD_QRY, [1.5, 2, 3, 4]).endswith("bbox: [1.5, 2, 4.5, 6]")


def test_query_text_without_bbox_or_image():
    assert scar_eval_query_text(STANDARD_QRY, None) == f"{IMAGE_TOKEN} \n{SCAR_INSTRUCTION}\n"
    text_only = scar_eval_query_text(STANDARD_QRY, [1, 2, 3, 4], with_image=False)
    assert text_only == f"{SCAR_INSTRUCTION}\nReferring object bbox: [1, 2, 4, 6]"


# ---------------------------------------------------------------------------------------------------------------
# mini-SCaR variants


@pytest.mark.parametrize("variant", SCAR_VARIANTS)
def test_every_variant_loads_every_row(loaded, variant):
    queries = loaded[variant]
    assert len(queries) == N_ROWS
    for i, q in enumerate(queries):
        assert q.row_id == f"mini_scar.parquet:{i}" and q.task == "mini" and q.positive == 0
        assert len(q.candidates) == 10
        assert all(c.text and not c.has_image and c.prompt is None for c in q.candidates)
        assert q.candidate_kinds is not None and q.candidate_kinds[0] == "gt"


def test_candidates_are_the_captions_ground_truth_first(loaded, raw_rows):
    for q, row in zip(loaded["box"], raw_rows, strict=True):
        assert [c.text for c in q.candidates] == row["tgt_text"]


def test_box_variant_row0(loaded, raw_rows):
    q = loaded["box"][0]
    assert raw_rows[0]["bbox"] == [162, 226, 131, 185]
    assert q.query.text == (
        "<|image_pad|> \nFind the caption that best describes the segmented object, considering both local details "
        "and global context in the given image.\nReferring object bbox: [162, 226, 293, 411]"
    )
    assert q.query.image == MINI_SCAR / "images/000000000049.jpg"


def test_box_variant_prompt_is_the_bbox_as_xyxy(loaded, raw_rows):
    for q, row in zip(loaded["box"], raw_rows, strict=True):
        prompt = q.query.prompt
        assert prompt is not None and prompt.points is None and prompt.mask is None
        assert prompt.box.xyxy == _xyxy(row["bbox"])
        assert q.query.text == scar_eval_query_text(row["qry_text"], row["bbox"])


def test_crop_variant_is_the_box_region(loaded, raw_rows):
    for q, row in zip(loaded["crop"], raw_rows, strict=True):
        assert isinstance(q.query.image, Image.Image) and q.query.prompt is None
        assert q.query.image.size == tuple(row["bbox"][2:])
        assert "Referring object bbox" not in q.query.text and q.query.text.count(IMAGE_TOKEN) == 1
    # The crop holds the original pixels of the box.
    x1, y1, x2, y2 = _xyxy(raw_rows[0]["bbox"])
    with Image.open(MINI_SCAR / raw_rows[0]["qry_image_path"]) as full:
        expected = np.asarray(full.crop((x1, y1, x2, y2)))
    np.testing.assert_array_equal(np.asarray(loaded["crop"][0].query.image), expected)


def test_text_only_variant_has_no_image(loaded, raw_rows):
    for q, row in zip(loaded["text_only"], raw_rows, strict=True):
        assert not q.query.has_image and q.query.prompt is None
        assert IMAGE_TOKEN not in q.query.text and DATASET_IMAGE_TOKEN not in q.query.text
        assert q.query.text.startswith("Find the caption")
        assert q.query.text.endswith(f"Referring object bbox: {list(_xyxy(row['bbox']))}")


def test_no_box_variant_is_the_whole_image_with_the_instruction(loaded, raw_rows):
    for q, row in zip(loaded["no_box"], raw_rows, strict=True):
        assert q.query.image == MINI_SCAR / row["qry_image_path"] and q.query.prompt is None
        assert "Referring object bbox" not in q.query.text
        assert q.query.text == f"{IMAGE_TOKEN} \n{SCAR_INSTRUCTION}\n"


def test_mask_variant_is_the_polygon(loaded, raw_rows):
    for q, row in list(zip(loaded["mask"], raw_rows, strict=True))[:8]:
        mask = q.query.prompt.mask
        assert isinstance(mask, PolygonMask) and q.query.prompt.box is None
        with Image.open(MINI_SCAR / row["qry_image_path"]) as img:
            assert mask.size_wh == img.size
        ys, xs = np.nonzero(mask.array)
        x1, y1, x2, y2 = _xyxy(row["bbox"])  # the bbox is the polygon's extent, floor / ceil
        assert x1 - 1 <= xs.min() and xs.max() <= x2 and y1 - 1 <= ys.min() and ys.max() <= y2
        assert "Referring object bbox" not in q.query.text


def test_box_mask_variant_is_the_box_protocol_plus_the_polygon(loaded, raw_rows):
    for boxed, masked, polygon in zip(loaded["box"], loaded["box_mask"], loaded["mask"], strict=True):
        assert masked.query.text == boxed.query.text  # the `box` variant's text, bbox line included
        assert masked.query.image == boxed.query.image
        assert masked.query.prompt.box == boxed.query.prompt.box
        assert isinstance(masked.query.prompt.mask, PolygonMask) and masked.query.prompt.points is None
        np.testing.assert_array_equal(masked.query.prompt.mask.array, polygon.query.prompt.mask.array)
        assert [c.text for c in masked.candidates] == [c.text for c in boxed.candidates]
    assert boxed.query.prompt.mask is None


def test_point_variant_is_the_point_column(loaded, raw_rows):
    for q, row in zip(loaded["point"], raw_rows, strict=True):
        points = q.query.prompt.points
        assert points.xy == (tuple(float(v) for v in row["point"]),) and points.labels == (1,)
        assert q.query.prompt.box is None and "Referring object bbox" not in q.query.text


def test_limit_keeps_the_first_rows(loaded):
    queries = load_scar_eval(PARQUET, MINI_SCAR, task="mini", limit=5)
    assert [q.row_id for q in queries] == [q.row_id for q in loaded["box"][:5]]
    with pytest.raises(ConfigError, match="limit"):
        load_scar_eval(PARQUET, MINI_SCAR, task="mini", limit=0)


def test_unknown_variant():
    with pytest.raises(ConfigError, match="variant"):
        load_scar_eval(PARQUET, MINI_SCAR, task="mini", variant="boxes")


# ---------------------------------------------------------------------------------------------------------------
# Bad files and rows


@pytest.mark.parametrize(("variant", "column"), [("point", "point"), ("mask", "segmentation"),
                                                 ("box_mask", "segmentation")])
def test_prompt_variant_needs_its_column(tmp_path, variant, column):
    path = _rewrite(tmp_path, lambda rows: None, drop=(column,))
    with pytest.raises(ConfigError, match=rf"{path}.*'{column}'"):
        load_scar_eval(path, MINI_SCAR, task="mini", variant=variant)
    assert len(load_scar_eval(path, MINI_SCAR, task="mini")) == N_ROWS  # the box protocol does not need it


def test_missing_columns_are_listed(tmp_path):
    path = _rewrite(tmp_path, lambda rows: None, drop=("bbox", "tgt_text"))
    with pytest.raises(DataError, match=r"missing required column\(s\) \['tgt_text', 'bbox'\].*'qry_text'"):
        load_scar_eval(path, MINI_SCAR, task="mini")


def _set(index: int, column: str, value):
    def edit(rows: list[dict]) -> None:
        rows[index][column] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "row", "column", "reason"),
    [
        (_set(3, "qry_image_path", "images/missing.jpg"), 3, "qry_image_path", "not found"),
        (_set(7, "bbox", [600, 10, 50, 50]), 7, "bbox", "outside"),
        (_set(7, "bbox", [-1, 10, 50, 50]), 7, "bbox", "outside"),
        (_set(9, "bbox", [10, 10, 0, 20]), 9, "bbox", "zero-area"),
        (_set(11, "bbox", [10, 10, 20]), 11, "bbox", "4 finite numbers"),
        (_set(20, "tgt_text", [f"caption {i}" for i in range(9)]), 20, "tgt_text", "expected 10 candidates, got 9"),
        (_set(21, "tgt_text", ["caption"] * 9 + ["  "]), 21, "tgt_text", "empty text"),
        (_set(22, "qry_text", None), 22, "qry_text", "expected a string"),
        (_set(23, "neg_types", ["gt"] * 3), 23, "neg_types", "expected 10"),
    ],
)
def test_bad_row_names_file_row_and_column(tmp_path, edit, row, column, reason):
    path = _rewrite(tmp_path, edit)
    with pytest.raises(DataError) as info:
        # strict_boxes: a box crossing the border is a bad row only then (by default it is scored as given)
        load_scar_eval(path, MINI_SCAR, task="mini", strict_boxes=True)
    message = str(info.value)
    assert str(path) in message and "1 bad row(s)" in message
    assert f"row mini_scar.parquet:{row}, column {column!r}" in message and reason in message


def test_boxes_crossing_the_border_are_scored_as_given_and_listed(tmp_path, raw_rows):
    def edit(rows: list[dict]) -> None:
        rows[7]["bbox"] = [600, 10, 50, 50]  # crosses its photo's right border
        rows[8]["bbox"] = [-1, 10, 50, 50]

    path = _rewrite(tmp_path, edit)
    task = load_scar_eval(path, MINI_SCAR, task="mini")
    assert task.boxes_outside_image == ["mini_scar.parquet:7", "mini_scar.parquet:8"] and len(task) == N_ROWS
    box = task[7].query.prompt.box
    assert box.xyxy == (600, 10, 650, 60) and box.outside_ok  # not clipped, in the prompt ...
    assert task[7].query.text.endswith("Referring object bbox: [600, 10, 650, 60]")  # ... and in the text
    assert not task[6].query.prompt.box.outside_ok
    cropped = load_scar_eval(path, MINI_SCAR, task="mini", variant="crop")[7].query.image
    assert cropped.size == (50, 50)  # PIL pads the part outside the photo
    with pytest.raises(DataError, match=r"2 bad row\(s\).*:7, column 'bbox'.*outside.*:8, column 'bbox'"):
        load_scar_eval(path, MINI_SCAR, task="mini", strict_boxes=True)


def test_every_bad_row_is_counted(tmp_path):
    def edit(rows: list[dict]) -> None:
        rows[1]["qry_image_path"] = "images/missing.jpg"
        rows[2]["tgt_text"] = rows[2]["tgt_text"][:9]

    with pytest.raises(DataError, match=r"2 bad row\(s\).*:1, column 'qry_image_path'.*:2, column 'tgt_text'"):
        load_scar_eval(_rewrite(tmp_path, edit), MINI_SCAR, task="mini")


def test_tgt_text_must_be_a_list(tmp_path):
    rows = pq.read_table(PARQUET).slice(0, 2).to_pylist()
    for row in rows:
        row["tgt_text"] = "a single caption"
    path = tmp_path / "strings.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"strings.parquet:0, column 'tgt_text': expected a list"):
        load_scar_eval(path, MINI_SCAR, task="mini")


@pytest.mark.parametrize(
    ("edit", "column"),
    [
        (_set(4, "point", [10_000, 5]), "point"),
        (_set(4, "point", None), "point"),
        (_set(4, "segmentation", None), "segmentation"),
        (_set(4, "segmentation", [[0.0, 0.0, 5000.0, 0.0, 0.0, 5.0]]), "segmentation"),
    ],
)
def test_bad_prompt_rows(tmp_path, edit, column):
    path = _rewrite(tmp_path, edit)
    for variant in ("point",) if column == "point" else ("mask", "box_mask"):
        with pytest.raises(DataError, match=rf"mini_scar.parquet:4, column '{column}'"):
            load_scar_eval(path, MINI_SCAR, task="mini", variant=variant)


# ---------------------------------------------------------------------------------------------------------------
# File discovery


def test_find_scar_files_released_names(tmp_path):
    for subset in SCAR_SUBSETS:
        (tmp_path / f"SCaR_eval_{subset}.parquet").touch()
    (tmp_path / "notes.parquet").touch()
    found = find_scar_files(tmp_path)
    assert list(found) == [f"SCaR_eval_{s}" for s in SCAR_SUBSETS]
    assert found["SCaR_eval_RefCOCO_plus"] == tmp_path / "SCaR_eval_RefCOCO_plus.parquet"


def test_find_scar_files_renamed_official_names(tmp_path):
    (tmp_path / "SCAR_RefCOCOg_val_filtered.parquet").touch()
    (tmp_path / "SCaR_eval_ADE20K.parquet").touch()
    assert find_scar_files(tmp_path) == {
        "SCaR_eval_ADE20K": tmp_path / "SCaR_eval_ADE20K.parquet",
        "SCaR_eval_RefCOCOg": tmp_path / "SCAR_RefCOCOg_val_filtered.parquet",
    }


def test_find_scar_files_errors(tmp_path):
    with pytest.raises(ConfigError, match="no SCaR_eval"):
        find_scar_files(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        find_scar_files(tmp_path / "absent")
    (tmp_path / "SCAR_ADE20K_val_filtered.parquet").touch()
    (tmp_path / "SCaR_eval_ADE20K.parquet").touch()
    with pytest.raises(ConfigError, match="both"):
        find_scar_files(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# MMEB-eval


def _image(path: Path, colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 24), colour).save(path)


@pytest.fixture
def mmeb_root(tmp_path: Path) -> Path:
    for name, colour in (("q.png", (200, 0, 0)), ("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
        _image(tmp_path / "imgs" / name, colour)
    return tmp_path


def _write(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


REPRESENT = f"{DATASET_IMAGE_TOKEN}\nRepresent the given image."
V1_ROWS = [
    {  # an image query against image candidates (i2i / grounding, the v1 layout: token and instruction in the text)
        "qry_text": f"{DATASET_IMAGE_TOKEN}\nFind an image that looks like this one.",
        "qry_img_path": "imgs/q.png",
        "tgt_text": [REPRESENT, REPRESENT],
        "tgt_img_path": ["imgs/red.png", "imgs/blue.png"],
    },
    {  # a text query (t2i)
        "qry_text": "Find me an everyday image that matches the given caption: a red square",
        "qry_img_path": "",
        "tgt_text": [REPRESENT, REPRESENT],
        "tgt_img_path": ["imgs/red.png", "imgs/blue.png"],
    },
]


def test_mmeb_image_query_and_image_candidates(mmeb_root):
    path = _write(mmeb_root / "CIRR.parquet", V1_ROWS[:1])
    [q] = load_mmeb_eval(path, mmeb_root, task="CIRR", family="vg")
    assert q.row_id == "CIRR.parquet:0" and q.task == "CIRR" and q.positive == 0
    assert q.query.text == f"{IMAGE_TOKEN}\nFind an image that looks like this one.\n"
    assert q.query.image == mmeb_root / "imgs/q.png" and q.query.prompt is None
    assert [c.image for c in q.candidates] == [mmeb_root / "imgs/red.png", mmeb_root / "imgs/blue.png"]
    assert [c.text for c in q.candidates] == [f"{IMAGE_TOKEN}\nRepresent the given image."] * 2


def test_mmeb_text_query(mmeb_root):
    path = _write(mmeb_root / "MSCOCO_t2i.parquet", V1_ROWS[1:])
    [q] = load_mmeb_eval(path, mmeb_root, task="MSCOCO_t2i", family="t2i")
    assert not q.query.has_image
    assert q.query.text == "Find me an everyday image that matches the given caption: a red square\n"
    assert all(c.has_image and c.text.count(IMAGE_TOKEN) == 1 for c in q.candidates)
    [visdial] = load_mmeb_eval(path, mmeb_root, task="VisDial", family="t2i")
    assert visdial.query.text == q.query.text + "\n"  # the official t2i code's extra newline for VisDial


def test_mmeb_instruct_layout(mmeb_root):
    rows = [
        {  # QA: instruction on its own line, text candidates, no tgt_img_path column
            "qry_inst": f"{DATASET_IMAGE_TOKEN}\nRepresent the given image with the following question:",
            "qry_text": "What colour is it?",
            "qry_img_path": "imgs/q.png",
            "tgt_text": ["red", "blue", "green"],
        }
    ]
    [q] = load_mmeb_eval(_write(mmeb_root / "GQA.parquet", rows), mmeb_root, task="GQA", family="qa")
    assert q.query.text == f"{IMAGE_TOKEN}\nRepresent the given image with the following question: What colour is it?\n"
    assert [c.text for c in q.candidates] == ["red", "blue", "green"]
    assert not any(c.has_image for c in q.candidates)


@pytest.mark.parametrize(
    ("family", "captions", "expected"),
    [
        ("t2i", ["", ""], f"{IMAGE_TOKEN}\nRepresent the given image.\n"),
        ("t2i", ["a red square", "a blue square"], f"{IMAGE_TOKEN}\nRepresent the given image. a red square\n"),
        ("vg", ["", ""], f"{IMAGE_TOKEN}\nRepresent the given image."),  # image-only i2i / VG: no trailing newline
    ],
)
def test_mmeb_instruct_image_candidates(mmeb_root, family, captions, expected):
    row = {
        "qry_inst": "Find me an everyday image that matches the given caption:",
        "qry_text": "a red square",
        "qry_img_path": "" if family == "t2i" else "imgs/q.png",
        "tgt_inst": REPRESENT,
        "tgt_text": captions,
        "tgt_img_path": ["imgs/red.png", "imgs/blue.png"],
    }
    [q] = load_mmeb_eval(_write(mmeb_root / "t.parquet", [row]), mmeb_root, task="t", family=family)
    assert q.candidates[0].text == expected and q.candidates[0].image == mmeb_root / "imgs/red.png"


def test_mmeb_bad_rows(mmeb_root):
    rows = [dict(V1_ROWS[0], tgt_img_path=["imgs/red.png", "imgs/missing.png"]), V1_ROWS[1]]
    with pytest.raises(DataError, match=r"m.parquet:0, column 'tgt_img_path': image file not found"):
        load_mmeb_eval(_write(mmeb_root / "m.parquet", rows), mmeb_root, task="m", family="vg")
    rows = [dict(V1_ROWS[0], tgt_img_path=["imgs/red.png"])]
    with pytest.raises(DataError, match=r"column 'tgt_img_path': 1 image paths for 2"):
        load_mmeb_eval(_write(mmeb_root / "m.parquet", rows), mmeb_root, task="m", family="vg")
    with pytest.raises(DataError, match=r"m.parquet:0, column 'qry_img_path': family 't2i'"):
        load_mmeb_eval(_write(mmeb_root / "m.parquet", V1_ROWS[:1]), mmeb_root, task="m", family="t2i")
    rows = [dict(V1_ROWS[1], tgt_text=["a", ""], tgt_img_path=["", ""])]
    with pytest.raises(DataError, match=r"column 'tgt_text': empty text and no image"):
        load_mmeb_eval(_write(mmeb_root / "m.parquet", rows), mmeb_root, task="m", family="i2t")


def test_mmeb_missing_columns_and_family(mmeb_root):
    path = _write(mmeb_root / "m.parquet", [{"qry_text": "x", "tgt_text": ["a"]}])
    with pytest.raises(DataError, match=r"missing required column\(s\) \['qry_img_path'\]; the file has"):
        load_mmeb_eval(path, mmeb_root, task="m", family="cls")
    with pytest.raises(ConfigError, match="family"):
        load_mmeb_eval(path, mmeb_root, task="m", family="retrieval")


def test_mmeb_family_by_task():
    assert mmeb_family("ImageNet-1K") == "cls" and mmeb_family("GQA", "VQA") == "qa"
    # "Retrieval" mixes families, so a meta-task name is resolved per task.
    assert [mmeb_family(t, "Retrieval") for t in ("MSCOCO_i2t", "VisDial", "CIRR")] == ["i2t", "t2i", "vg"]
    assert mmeb_family("my-task", "t2i") == "t2i"
    with pytest.raises(ConfigError, match="not an MMEB task"):
        mmeb_family("my-task")


def test_mmeb_family_from_the_task_name(mmeb_root):
    path = _write(mmeb_root / "VisDial.parquet", V1_ROWS[1:])
    [q] = load_mmeb_eval(path, mmeb_root, task="VisDial")
    assert q.query.text.endswith("a red square\n\n") and not q.query.has_image


def test_eval_query_checks_positive_and_kinds():
    text = EmbedInput(text="a caption")
    with pytest.raises(DataError, match="positive"):
        EvalQuery.from_inputs("t", "f:0", text, [text], positive=1)
    with pytest.raises(DataError, match="candidate kinds"):
        EvalQuery.from_inputs("t", "f:0", text, [text], candidate_kinds=["gt", "x"])
