"""The SCaR query protocol is selectable: the paper's `box`, or `box_mask` for models trained with SCaR masks,
through `EvalConfig.scar_variant` and `virtue eval --scar-prompt`, on mini-SCaR with a tiny model."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import MINI_SCAR
from virtue.cli.main import main
from virtue.errors import ConfigError
from virtue.eval.runner import EvalConfig, run_eval


@pytest.fixture
def data_root(tmp_path):
    """mini-SCaR's parquet under a released SCaR-Eval name; the photos stay in mini-SCaR's folder."""
    root = tmp_path / "scar"
    root.mkdir()
    shutil.copy(MINI_SCAR / "mini_scar.parquet", root / "SCaR_eval_RefCOCOg.parquet")
    return root


def _config(data_root, tmp_path, **kw) -> EvalConfig:
    base = dict(benchmark="scar", data_root=str(data_root), image_root=str(MINI_SCAR), limit=6, batch_size=3,
                cache_dir=str(tmp_path / "cache"), out_dir=str(tmp_path / "out"), show_progress_bar=False)
    return EvalConfig(**{**base, **kw})


def test_box_mask_queries_differ_from_box_queries_only(tiny_model, data_root, tmp_path):
    boxed = run_eval(tiny_model, _config(data_root, tmp_path), model_name="tiny")
    assert boxed.settings["scar_variant"] == "box"
    masked = run_eval(tiny_model, _config(data_root, tmp_path, scar_variant="box_mask"), model_name="tiny")
    # Same captions (served from the cache), new queries: the mask prompt reached every query.
    assert masked.timings["encoded_inputs"] == 6
    assert masked.settings["scar_variant"] == "box_mask" and masked.tasks["RefCOCOg"]["n"] == 6


def test_unknown_scar_variant_is_refused(data_root, tmp_path):
    with pytest.raises(ConfigError, match="scar_variant"):
        _config(data_root, tmp_path, scar_variant="mask")


def test_cli_scar_prompt_box_mask(tiny_model, data_root, tmp_path, capsys):
    model_dir = tmp_path / "tiny"
    tiny_model.save_pretrained(model_dir)
    out = tmp_path / "out"
    rc = main(["eval", "--model", str(model_dir), "--no-hub", "--device", "cpu", "--data-root", str(data_root),
               "--image-root", str(MINI_SCAR), "--scar-prompt", "box_mask", "--limit", "4", "--batch-size", "4",
               "--cache-dir", "", "--out", str(out)])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["scar_variant"] == "box_mask"
    assert results["tasks"]["RefCOCOg"]["n"] == 4
    assert "RefCOCOg" in capsys.readouterr().out
