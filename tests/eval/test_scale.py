"""Evaluation at scale: inputs interned when rows are loaded, scores streamed from the unique embeddings, the
official rule for candidates named like the positive, SCaR boxes crossing the image border, SAM-less models."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.conftest import MINI_SCAR
from virtue.cli.main import main
from virtue.errors import DataError, PromptError
from virtue.eval.datasets import load_mmeb_eval
from virtue.eval.metrics import rank_by_name, rank_of_positive
from virtue.eval.runner import EvalConfig, run_eval, score_task
from virtue.eval.table import EvalQuery, EvalTask, InputTable
from virtue.inputs import EmbedInput
from virtue.prompts import Box

# ---------------------------------------------------------------------------------------------------------------
# Interning and streamed scoring


def test_mmeb_candidates_are_interned_when_rows_are_loaded(tmp_path):
    rng = np.random.default_rng(0)
    pool = [f"caption {i}" for i in range(50)]
    rows = [{"qry_text": f"query {q}", "qry_img_path": "",
             "tgt_text": [pool[q % 50], *(pool[i] for i in rng.choice(50, 19) if i != q % 50)]} for q in range(40)]
    path = tmp_path / "MSCOCO_i2t.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    task = load_mmeb_eval(path, tmp_path, task="MSCOCO_i2t")
    used = {t for r in rows for t in r["tgt_text"]}
    assert len(task.table) == len(used) + 40  # every distinct caption once, plus the 40 queries
    for query, row in zip(task, rows, strict=True):
        assert query.candidate_ids.dtype == np.int32
        assert [c.text for c in query.candidates] == row["tgt_text"] and query.query.text.startswith("query")
    # a caption listed in two rows is one object, keyed (and embedded) once
    first = task[0].candidates[1]
    again = next(c for q in task[1:] for c in q.candidates if c.text == first.text)
    assert again is first


def test_streamed_scores_equal_the_per_pair_scores():
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    table = InputTable()
    items = [EmbedInput(text=f"t{i}") for i in range(30)]
    queries = []
    for n in range(12):
        ids = rng.choice(np.arange(10, 30), 6, replace=False)
        queries.append(EvalQuery.from_inputs("t", f"t:{n}", items[n], [items[i] for i in ids], table=table,
                                             names=[f"t{i}" for i in ids]))
    task = EvalTask.from_queries("t", queries)
    order = np.array([int(x.text[1:]) for x in table.inputs])  # table entry -> row of `vectors`
    ranks = score_task(task, vectors[order])
    for rank, q in zip(ranks, task, strict=True):
        pairs = np.stack([vectors[int(c.text[1:])] for c in q.candidates]) @ vectors[int(q.query.text[1:])]
        assert rank == rank_of_positive(pairs, 0)


# ---------------------------------------------------------------------------------------------------------------
# Candidates named like the positive


def test_rank_by_name_counts_the_positives_name_as_the_positive():
    scores = np.array([0.5, 0.5, 0.9, 0.5])
    assert rank_by_name(scores, 0, np.array(["a", "a", "b", "c"])) == 3  # b beats it; c ties it: both against
    assert rank_by_name(scores, 0, np.array(["a", "b", "a", "c"])) == 1  # its duplicate scores best
    assert rank_by_name(scores, 0, np.array(["a", "a", "c", "a"])) == 2
    assert rank_by_name(scores, 0, np.arange(4)) == rank_of_positive(scores, 0)  # unique names: unchanged
    with pytest.raises(ValueError, match="NaN"):
        rank_by_name(np.array([0.1, np.nan]), 0, np.arange(2))


def _t2i_task(root):
    """MSCOCO_t2i rows in the MMEB-eval (v1) layout: candidates are images, named by their path."""
    for name, colour in (("pos.png", (200, 10, 10)), ("other.png", (10, 10, 200))):
        Image.new("RGB", (32, 24), colour).save(root / name)
    shutil.copy(root / "pos.png", root / "copy.png")  # the same pixels under another name
    inst = "<|image_1|>\nRepresent the given image."
    rows = [
        {"qry_text": "Find me an everyday image that matches the given caption: a red square", "qry_img_path": "",
         "tgt_text": [inst, inst], "tgt_img_path": ["pos.png", "pos.png"]},  # the positive listed twice: a hit
        {"qry_text": "Find me an everyday image that matches the given caption: a red square", "qry_img_path": "",
         "tgt_text": [inst, inst], "tgt_img_path": ["pos.png", "copy.png"]},  # an equal vector, another name: a miss
    ]
    pq.write_table(pa.Table.from_pylist(rows), root / "MSCOCO_t2i.parquet")


def test_duplicated_positive_is_a_hit_and_another_name_with_its_score_is_not(tiny_model, tmp_path):
    _t2i_task(tmp_path)
    cfg = EvalConfig(benchmark="mmeb", data_root=str(tmp_path), tasks=("MSCOCO_t2i",), cache_dir=None,
                     out_dir=str(tmp_path / "out"), show_progress_bar=False)
    report = run_eval(tiny_model, cfg, model_name="tiny")
    # pos.png and copy.png have one content key: 1 image and 1 query text encoded.
    assert report.timings["encoded_inputs"] == 2
    metrics = report.tasks["MSCOCO_t2i"]
    assert metrics["hit@1"] == 0.5 and metrics["mrr"] == 0.75  # row 0 rank 1, row 1 rank 2 (tie against)


# ---------------------------------------------------------------------------------------------------------------
# SCaR boxes crossing the image border


@pytest.fixture
def scar_root(tmp_path):
    """mini-SCaR's first 6 rows; rows 1 and 4 get a box crossing the right and the top border."""
    rows = pq.read_table(MINI_SCAR / "mini_scar.parquet").slice(0, 6).to_pylist()
    for i in (1, 4):
        width, _ = Image.open(MINI_SCAR / rows[i]["qry_image_path"]).size
        rows[i]["bbox"] = [width - 20, 10, 60, 40] if i == 1 else [5, -3, 30, 30]
    root = tmp_path / "scar"
    root.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "SCaR_eval_RefCOCOg.parquet")
    return root


def _scar_config(root, tmp_path, **kw) -> EvalConfig:
    base = dict(benchmark="scar", data_root=str(root), image_root=str(MINI_SCAR), batch_size=4, cache_dir=None,
                out_dir=str(tmp_path / "out"), show_progress_bar=False)
    return EvalConfig(**{**base, **kw})


def test_border_rows_are_scored_counted_and_listed(tiny_model, scar_root, tmp_path):
    report = run_eval(tiny_model, _scar_config(scar_root, tmp_path), model_name="tiny")
    assert report.tasks["RefCOCOg"]["n"] == 6
    listed = {"count": 2, "rows": ["SCaR_eval_RefCOCOg.parquet:1", "SCaR_eval_RefCOCOg.parquet:4"]}
    assert report.boxes_outside_image == {"RefCOCOg": listed}
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert results["boxes_outside_image"]["RefCOCOg"] == listed and results["settings"]["strict_boxes"] is False
    assert "SCaR_eval_RefCOCOg.parquet:1, SCaR_eval_RefCOCOg.parquet:4" in (tmp_path / "out/results.md").read_text()
    with pytest.raises(DataError, match=r"2 bad row\(s\).*RefCOCOg\.parquet:1, column 'bbox'.*outside"):
        run_eval(tiny_model, _scar_config(scar_root, tmp_path, strict_boxes=True), model_name="tiny")


def test_cli_strict_boxes(tiny_model, scar_root, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    args = ["eval", "--model", str(model_dir), "--no-hub", "--device", "cpu", "--data-root", str(scar_root),
            "--image-root", str(MINI_SCAR), "--cache-dir", "", "--out", str(tmp_path / "out")]
    assert main([*args, "--strict-boxes"]) == 2
    assert "RefCOCOg.parquet:1, column 'bbox'" in capsys.readouterr().err


def test_box_opt_in_is_explicit(tiny_model, tmp_path):
    Image.new("RGB", (40, 30), (90, 120, 30)).save(tmp_path / "p.png")
    box = Box.from_xyxy([30, 5, 60, 25])
    with pytest.raises(PromptError, match="outside"):
        box.validate((40, 30))
    with pytest.raises(PromptError, match="outside"):  # a user's box outside the image is still refused
        tiny_model.encode({"image": tmp_path / "p.png", "box": [30, 5, 60, 25]})
    opted = Box.from_xyxy([30, 5, 60, 25], outside_ok=True)
    opted.validate((40, 30))
    assert opted == box and hash(opted) == hash(box) and repr(opted) == repr(box)  # keys do not change
    with pytest.raises(PromptError, match="zero or negative width"):
        Box(50, 5, 50, 25, outside_ok=True).validate((40, 30))
    from virtue.prompts import VisualPrompt

    item = EmbedInput("<|image_pad|> a plant", tmp_path / "p.png", VisualPrompt(box=opted))
    assert tiny_model.processor.load(item, "input 0", None).size_wh == (40, 30)
    assert np.isfinite(tiny_model.encode([item])).all()


# ---------------------------------------------------------------------------------------------------------------
# Models without a SAM branch


def test_samless_model_scores_scar_with_the_box_in_the_text(tokenizer, tmp_path):
    from virtue import VirtueModel
    from virtue.model.presets import tiny_config

    torch.manual_seed(0)
    model = VirtueModel(tiny_config(sam_enabled=False), tokenizer).eval()
    assert model.sam is None
    root = tmp_path / "scar"
    root.mkdir()
    shutil.copy(MINI_SCAR / "mini_scar.parquet", root / "SCaR_eval_RefCOCOg.parquet")
    cfg = _scar_config(root, tmp_path, limit=6, baselines=("no_box", "random"))
    report = run_eval(model, cfg, model_name="no-sam")
    assert report.tasks["RefCOCOg"]["n"] == 6 and "no SAM branch" in report.settings["visual_prompt"]
    assert set(report.baselines) == {"no_box", "random"}
    # The same numbers as the box-in-text queries scored directly.
    from virtue.eval.datasets import load_scar_eval

    task = load_scar_eval(root / "SCaR_eval_RefCOCOg.parquet", MINI_SCAR, task="RefCOCOg", variant="box_text",
                          limit=6)
    assert all("Referring object bbox" in q.query.text and q.query.prompt is None for q in task)
    vectors = model.encode(task.table.inputs, batch_size=4)
    from virtue.eval.metrics import ranking_metrics

    assert ranking_metrics(score_task(task, vectors)) == report.tasks["RefCOCOg"]
    with pytest.raises(PromptError, match="no SAM branch"):  # outside the harness a prompt is still refused
        model.encode({"image": task[0].query.image, "box": [1, 1, 9, 9]})
