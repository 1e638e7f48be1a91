"""The evaluation harness end to end on mini-SCaR (real COCO photos) with a tiny model: reports, the
embedding cache (hits, invalidation on a changed model or file), resume after an interruption, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from tests.conftest import MINI_SCAR
from virtue.errors import DataError
from virtue.eval.runner import EvalConfig, run_eval


@pytest.fixture
def scar_root(tmp_path):
    """mini-SCaR laid out under a released SCaR-Eval file name, images copied so a test may change them."""
    root = tmp_path / "scar"
    root.mkdir()
    shutil.copy(MINI_SCAR / "mini_scar.parquet", root / "SCaR_eval_RefCOCOg.parquet")
    shutil.copytree(MINI_SCAR / "images", root / "images")
    return root


def config(root, tmp_path, **kw) -> EvalConfig:
    base = dict(benchmark="scar", data_root=str(root), limit=8, batch_size=4, cache_dir=str(tmp_path / "cache"),
                out_dir=str(tmp_path / "out"), show_progress_bar=False)
    return EvalConfig(**{**base, **kw})


def test_end_to_end_writes_every_report(tiny_model, scar_root, tmp_path):
    cfg = config(scar_root, tmp_path, baselines=("text_only", "no_box", "crop", "random", "consensus"))
    report = run_eval(tiny_model, cfg, model_name="tiny")
    out = tmp_path / "out"
    data = json.loads((out / "results.json").read_text())
    assert data["tasks"]["RefCOCOg"]["n"] == 8
    assert set(data["baselines"]) == {"text_only", "no_box", "crop", "random", "consensus"}
    assert "| RefCOCOg |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.aggregates["SCaR Overall"] == report.tasks["RefCOCOg"]["hit@1"]


def test_cache_is_reused_and_invalidated(tiny_model, scar_root, tmp_path):
    first = run_eval(tiny_model, config(scar_root, tmp_path), model_name="tiny")
    assert first.timings["encoded_inputs"] > 8
    again = run_eval(tiny_model, config(scar_root, tmp_path), model_name="tiny")
    assert again.timings["encoded_inputs"] == 0 and again.tasks == first.tasks

    # a changed data file: only the queries on the edited photo are embedded again
    table = pq.read_table(scar_root / "SCaR_eval_RefCOCOg.parquet").slice(0, 8).to_pylist()
    photo = table[0]["qry_image_path"]
    edited = Image.open(scar_root / photo).convert("RGB")
    edited.putpixel((0, 0), (255 - edited.getpixel((0, 0))[0], 0, 0))
    edited.save(scar_root / photo, quality=95)
    changed = run_eval(tiny_model, config(scar_root, tmp_path), model_name="tiny")
    assert changed.timings["encoded_inputs"] == sum(row["qry_image_path"] == photo for row in table)

    # a changed model: nothing is served from the old model's cache
    with torch.no_grad():
        tiny_model.connector.mlp[2].bias.add_(0.01)
    retrained = run_eval(tiny_model, config(scar_root, tmp_path), model_name="tiny")
    assert retrained.timings["encoded_inputs"] == first.timings["encoded_inputs"]


def test_interrupted_run_resumes(tiny_model, scar_root, tmp_path, monkeypatch):
    reference = run_eval(tiny_model, config(scar_root, tmp_path, cache_dir=str(tmp_path / "ref")), model_name="t")
    calls = {"n": 0}
    encode = tiny_model.encode

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # the user stops the run part-way through the candidates
        return encode(*args, **kwargs)

    monkeypatch.setattr(tiny_model, "encode", flaky)
    cfg = config(scar_root, tmp_path, batch_size=1)
    with pytest.raises(KeyboardInterrupt):
        run_eval(tiny_model, cfg, model_name="t")
    monkeypatch.setattr(tiny_model, "encode", encode)
    resumed = run_eval(tiny_model, cfg, model_name="t")
    total = reference.timings["encoded_inputs"]
    assert 0 < resumed.timings["encoded_inputs"] < total
    for metric in ("hit@1", "mrr", "ndcg@10"):
        assert np.isclose(resumed.tasks["RefCOCOg"][metric], reference.tasks["RefCOCOg"][metric])


def test_missing_image_is_a_named_error(tiny_model, scar_root, tmp_path):
    table = pq.read_table(scar_root / "SCaR_eval_RefCOCOg.parquet").slice(0, 8).to_pylist()
    (scar_root / table[3]["qry_image_path"]).unlink()
    with pytest.raises(DataError, match=r"SCaR_eval_RefCOCOg\.parquet:\d+.*qry_image_path"):
        run_eval(tiny_model, config(scar_root, tmp_path), model_name="tiny")
