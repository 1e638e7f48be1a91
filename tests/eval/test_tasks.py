"""The task table against virtue-spec §5.1 / §8.1, name resolution, and the paper's aggregate arithmetic."""

from __future__ import annotations

from collections import Counter

import pytest

from virtue.errors import ConfigError
from virtue.eval.tasks import TASKS, aggregate, aggregate_sizes, find_task, get_tasks

# Written out independently of tasks.py: the MMEB tasks that are in MMEB-train (spec §5.1), eval spelling.
IND = {
    "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
    "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W",
    "MSCOCO_i2t", "VisualNews_i2t", "VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA", "CIRR", "NIGHTS",
    "MSCOCO",
}  # fmt: skip
OOD = {
    "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
    "ScienceQA", "VizWiz", "GQA", "TextVQA",
    "EDIS", "Wiki-SS-NQ", "OVEN", "FashionIQ",
    "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing",
}  # fmt: skip
SCAR = {
    "RefCOCO+": "SCaR_eval_RefCOCO_plus",
    "RefCOCOg": "SCaR_eval_RefCOCOg",
    "VisualGenome": "SCaR_eval_VisualGenome",
    "COCO-Stuff": "SCaR_eval_COCO_Stuff",
    "ADE20K": "SCaR_eval_ADE20K",
}
# The paper's VIRTUE-2B meta-task numbers (spec §8.2).
VIRTUE_2B = {"Classification": 64.1, "VQA": 55.7, "Retrieval": 68.4, "Grounding": 78.7}


def test_table_sizes_and_splits():
    assert len(TASKS) == 41
    assert len({t.name for t in TASKS}) == 41
    mmeb = [t for t in TASKS if t.benchmark == "mmeb"]
    assert Counter(t.meta for t in mmeb) == {"Classification": 10, "VQA": 10, "Retrieval": 12, "Grounding": 4}
    assert Counter(t.split for t in mmeb) == {"IND": 20, "OOD": 16}
    assert {t.name for t in mmeb if t.split == "IND"} == IND
    assert {t.name for t in mmeb if t.split == "OOD"} == OOD
    mscoco = find_task("MSCOCO")
    assert mscoco is not None and mscoco.meta == "Grounding" and mscoco.split == "IND"
    assert all(t.file_stem == t.name for t in mmeb)


def test_scar_subsets_and_file_stems():
    scar = get_tasks(["SCaR"])
    assert {t.name: t.file_stem for t in scar} == SCAR
    assert all(t.benchmark == "scar" and t.meta == "SCaR" and t.split is None for t in scar)


def test_get_tasks_names_groups_and_case():
    assert [t.name for t in get_tasks(["refcoco+", "ADE20k"])] == ["RefCOCO+", "ADE20K"]
    assert [t.name for t in get_tasks(["scar_eval_coco_stuff"])] == ["COCO-Stuff"]
    assert len(get_tasks(None)) == 41
    assert len(get_tasks(["MMEB"])) == 36
    assert len(get_tasks(["classification"])) == 10
    assert len(get_tasks(["Grounding"])) == 4
    assert {t.name for t in get_tasks(["ind"])} == IND
    assert len(get_tasks(None, benchmark="scar")) == 5
    # Duplicates collapse and the result keeps table order.
    assert [t.name for t in get_tasks(["VQA", "OK-VQA", "ChartQA"])] == [t.name for t in get_tasks(["VQA"])]


def test_get_tasks_unknown_name_lists_close_matches():
    with pytest.raises(ConfigError, match="ImageNet-1K") as err:
        get_tasks(["ImageNet-1"])
    assert "close matches" in str(err.value)
    with pytest.raises(ConfigError, match="RefCOCO"):
        get_tasks(["RefCOC+"])


def test_get_tasks_benchmark_mismatch_and_bad_benchmark():
    with pytest.raises(ConfigError, match="not mmeb"):
        get_tasks(["RefCOCO+"], benchmark="mmeb")
    with pytest.raises(ConfigError, match="benchmark"):
        get_tasks(None, benchmark="coco")  # type: ignore[arg-type]


def test_aggregate_reproduces_virtue_2b_overall():
    # Each task gets its meta-task's number, so meta means are exact and Overall is the dataset-level mean:
    # (64.1*10 + 55.7*10 + 68.4*12 + 78.7*4) / 36 = (641 + 557 + 820.8 + 314.8) / 36 = 2333.6 / 36 = 64.822...
    scores = {t.name: VIRTUE_2B[t.meta] for t in get_tasks(["MMEB"])}
    agg = aggregate(scores)
    assert round(agg["Overall"], 1) == 64.8
    assert agg["Overall"] == pytest.approx(2333.6 / 36)
    for meta, value in VIRTUE_2B.items():
        assert agg[meta] == pytest.approx(value)
    # IND = (5 CLS*64.1 + 6 VQA*55.7 + 8 Ret*68.4 + 1 Grd*78.7) / 20 = (320.5 + 334.2 + 547.2 + 78.7) / 20 = 64.03
    assert agg["IND"] == pytest.approx(1280.6 / 20)
    # OOD = (5*64.1 + 4*55.7 + 4*68.4 + 3*78.7) / 16 = (320.5 + 222.8 + 273.6 + 236.1) / 16 = 65.8125
    assert agg["OOD"] == pytest.approx(1053.0 / 16)
    assert agg["n_tasks/Overall"] == 36 and agg["n_tasks/IND"] == 20 and agg["n_tasks/Retrieval"] == 12
    assert "SCaR Overall" not in agg


def test_aggregate_scar_and_partial_coverage():
    agg = aggregate({"RefCOCO+": 0.6, "adE20k": 0.4, "GQA": 0.3})
    assert agg["SCaR Overall"] == pytest.approx(0.5)  # (0.6 + 0.4) / 2
    assert agg["n_tasks/SCaR Overall"] == 2
    assert agg["VQA"] == agg["OOD"] == agg["Overall"] == pytest.approx(0.3)
    assert agg["n_tasks/Overall"] == 1
    assert "Classification" not in agg and "IND" not in agg
    assert list(agg)[:4] == ["VQA", "OOD", "Overall", "SCaR Overall"]  # the paper's column order


def test_aggregate_rejects_unknown_duplicate_and_nan():
    with pytest.raises(ConfigError, match="close matches"):
        aggregate({"RefCOCO++": 0.5})
    with pytest.raises(ConfigError, match="twice"):
        aggregate({"RefCOCO+": 0.5, "refcoco+": 0.4})
    with pytest.raises(ValueError, match="finite"):
        aggregate({"GQA": float("nan")})


def test_aggregate_sizes():
    assert aggregate_sizes() == {
        "Classification": 10, "VQA": 10, "Retrieval": 12, "Grounding": 4,
        "IND": 20, "OOD": 16, "Overall": 36, "SCaR Overall": 5,
    }  # fmt: skip
