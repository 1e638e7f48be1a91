"""Data layouts as published: MMEB-train cloned from the hub (subset folders of `original-*` shards, `images/`)
and SCaR-train's flat folder of `SCAR_<Subset>.parquet` with `images/<subset>_train/`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from PIL import Image

from tests.train.test_data import _parquet, _scar_row
from virtue.errors import ConfigError
from virtue.train.data import MMEB_TRAIN_SUBSETS, DataSource, load_source

INSTRUCTION = "<|image_1|>\nRepresent the given image for classification\n"


def _jpeg(path: Path, size: tuple[int, int] = (64, 48)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (40, 160, 90)).save(path, format="JPEG")
    return path


def _mmeb_rows(subset: str, labels: list[str], instruction: str = INSTRUCTION) -> list[dict]:
    # MMEB-train's own form of image paths: `images/<Subset>/Train/<file>`, relative to the clone.
    return [
        {"qry": instruction, "qry_image_path": f"images/{subset}/Train/{label}.jpg", "pos_text": label,
         "pos_image_path": ""}
        for label in labels
    ]


@pytest.fixture
def hub(tmp_path: Path) -> Path:
    """A miniature clone of TIGER-Lab/MMEB-train: two subsets (one in two shards), the other splits, images."""
    root = tmp_path / "MMEB-train"
    for i, label in enumerate(["cat", "dog", "owl", "fox", "elk"]):
        _jpeg(root / "images" / "ImageNet_1K" / "Train" / f"{label}.jpg", (32 + i, 32))
    _jpeg(root / "images" / "VOC2007" / "Train" / "bus.jpg")
    shard0, shard1 = _mmeb_rows("ImageNet_1K", ["cat", "dog", "owl"]), _mmeb_rows("ImageNet_1K", ["fox", "elk"])
    _parquet(root / "ImageNet_1K" / "original-00000-of-00002.parquet", shard0)
    _parquet(root / "ImageNet_1K" / "original-00001-of-00002.parquet", shard1)
    paraphrased = _mmeb_rows("ImageNet_1K", ["cat"], "<|image_1|>\nWhat is this?\n")
    _parquet(root / "ImageNet_1K" / "diverse_instruction-00000-of-00001.parquet", paraphrased)
    _parquet(root / "ImageNet_1K" / "train-00000-of-00001.parquet", paraphrased)
    _parquet(root / "VOC2007" / "original-00000-of-00001.parquet", _mmeb_rows("VOC2007", ["bus"]))
    (root / "images_zip").mkdir()
    return root


def test_hub_layout_reads_the_original_shards_in_order(hub):
    subsets = load_source(DataSource("mmeb", str(hub)))
    assert [s.name for s in subsets] == ["ImageNet_1K", "VOC2007"]
    imagenet = subsets[0]
    assert [e.row_id for e in imagenet.examples] == [
        "ImageNet_1K/original-00000-of-00002.parquet:0",
        "ImageNet_1K/original-00000-of-00002.parquet:1",
        "ImageNet_1K/original-00000-of-00002.parquet:2",
        "ImageNet_1K/original-00001-of-00002.parquet:0",
        "ImageNet_1K/original-00001-of-00002.parquet:1",
    ]
    assert [e.positive.text for e in imagenet.examples] == ["cat", "dog", "owl", "fox", "elk"]
    assert all(e.query.text == "<|image_pad|>\nRepresent the given image for classification\n"
               for e in imagenet.examples)  # not the diverse_instruction paraphrase
    # The rows' `images/...` paths resolve against the clone, where unzip_file.py puts the images.
    assert imagenet.examples[0].query.image == hub / "images" / "ImageNet_1K" / "Train" / "cat.jpg"


def test_hub_layout_limit_spans_shards_and_subsets_selects(hub):
    (subset,) = load_source(DataSource("mmeb", str(hub), subsets=["ImageNet_1K"], limit=4))
    assert subset.examples[-1].row_id == "ImageNet_1K/original-00001-of-00002.parquet:0"
    assert len(subset.examples) == 4
    selected = load_source(DataSource("mmeb", str(hub), subsets=["VOC2007", "ImageNet_1K"]))
    assert [s.name for s in selected] == ["VOC2007", "ImageNet_1K"]
    (renamed,) = load_source(DataSource("mmeb", str(hub), subsets=["VOC2007"], name="voc"))
    assert renamed.name == "voc" and renamed.examples[0].row_id == "VOC2007/original-00000-of-00001.parquet:0"


def test_hub_layout_unknown_subset_lists_the_available_ones(hub):
    with pytest.raises(ConfigError, match=r"\['SUN397'\] not found.*available: \['ImageNet_1K', 'VOC2007'\]"):
        load_source(DataSource("mmeb", str(hub), subsets=["ImageNet_1K", "SUN397"]))
    with pytest.raises(ConfigError, match="name"):
        load_source(DataSource("mmeb", str(hub), name="all"))


def test_hub_layout_skips_and_reports_other_folders(hub, caplog):
    # A subset with another split only (as CIFAR_100 once was), and one outside the recipe's 20.
    _parquet(hub / "CIFAR_100" / "train-00000-of-00001.parquet", _mmeb_rows("VOC2007", ["bus"]))
    _parquet(hub / "Extra" / "original-00000-of-00001.parquet", _mmeb_rows("VOC2007", ["bus"]))
    assert "Extra" not in MMEB_TRAIN_SUBSETS and len(MMEB_TRAIN_SUBSETS) == 20
    with caplog.at_level(logging.WARNING, logger="virtue.train.data"):
        names = [s.name for s in load_source(DataSource("mmeb", str(hub)))]
    assert names == ["Extra", "ImageNet_1K", "VOC2007"]
    assert "CIFAR_100" in caplog.text and "['Extra']" in caplog.text


def test_hub_layout_incomplete_shards_are_an_error(hub):
    (hub / "ImageNet_1K" / "original-00001-of-00002.parquet").unlink()
    with pytest.raises(ConfigError, match=r"ImageNet_1K.*incomplete.*original-00000-of-00002\.parquet"):
        load_source(DataSource("mmeb", str(hub)))


def test_folder_without_any_subset_is_an_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError, match="no subset folder"):
        load_source(DataSource("mmeb", str(tmp_path)))
    with pytest.raises(ConfigError, match=r"no \*\.parquet"):
        load_source(DataSource("scar", str(tmp_path)))


def test_mmeb_paths_without_images_prefix_are_looked_up_in_images(hub):
    # Some copies store paths relative to the images folder; the hub layout finds them there too.
    rows = [{"qry": INSTRUCTION, "qry_image_path": "VOC2007/Train/bus.jpg", "pos_text": "bus", "pos_image_path": ""}]
    _parquet(hub / "VOC2007" / "original-00000-of-00001.parquet", rows)
    (subset,) = load_source(DataSource("mmeb", str(hub), subsets=["VOC2007"]))
    assert subset.bad_rows == [] and subset.examples[0].query.image == hub / "images" / "VOC2007" / "Train" / "bus.jpg"


def test_subsets_of_a_flat_folder_and_not_of_a_single_file(tmp_path):
    _jpeg(tmp_path / "imgs" / "a.jpg", (100, 80))
    for name in ("SCAR_A", "SCAR_B", "SCAR_C"):
        _parquet(tmp_path / f"{name}.parquet", [_scar_row(qry_image_path="imgs/a.jpg")])
    subsets = load_source(DataSource("scar", str(tmp_path), subsets=["SCAR_C", "SCAR_A"]))
    assert [s.name for s in subsets] == ["SCAR_C", "SCAR_A"]
    with pytest.raises(ConfigError, match="single file"):
        load_source(DataSource("scar", str(tmp_path / "SCAR_A.parquet"), subsets=["SCAR_A"]))


# ---------------------------------------------------------------------------------------------------------------
# SCaR-train, official layout


@pytest.fixture
def scar_train(tmp_path: Path) -> Path:
    root = tmp_path / "SCaR-Train"
    _jpeg(root / "images" / "refcocog_train" / "a.jpg", (100, 80))
    _jpeg(root / "images" / "ade20k_train" / "b.jpg", (120, 90))
    _parquet(root / "SCAR_RefCOCOg.parquet", [
        _scar_row(qry_image_path="refcocog_train/a.jpg"),  # as the official files (relative to image_dir)
        _scar_row(qry_image_path="images/refcocog_train/a.jpg"),  # already relative to the data folder
    ])
    _parquet(root / "SCAR_ADE20K.parquet", [_scar_row(qry_image_path="ade20k_train/b.jpg")])
    return root


def test_scar_official_layout_finds_images_in_images_folder(scar_train):
    subsets = load_source(DataSource("scar", str(scar_train)))
    assert [s.name for s in subsets] == ["SCAR_ADE20K", "SCAR_RefCOCOg"]
    assert all(s.bad_rows == [] for s in subsets)
    image = scar_train / "images" / "refcocog_train" / "a.jpg"
    assert [e.query.image for e in subsets[1].examples] == [image, image]
    assert subsets[0].examples[0].query.image == scar_train / "images" / "ade20k_train" / "b.jpg"


def test_scar_single_file_uses_the_images_folder_beside_it(scar_train):
    (subset,) = load_source(DataSource("scar", str(scar_train / "SCAR_ADE20K.parquet")))
    assert subset.examples[0].query.image == scar_train / "images" / "ade20k_train" / "b.jpg"


def test_explicit_image_root_is_used_as_is(scar_train):
    images = scar_train / "images"
    (subset,) = load_source(DataSource("scar", str(scar_train / "SCAR_RefCOCOg.parquet"), image_root=str(images)))
    assert subset.examples[0].query.image == images / "refcocog_train" / "a.jpg"
    # No `images/` rule with an explicit root: the second row's path names a file that does not exist.
    assert [(b.row_id, b.column) for b in subset.bad_rows] == [("SCAR_RefCOCOg.parquet:1", "qry_image_path")]
