"""Any `checkpoint-N` of a run is a model: evaluated, exported, and equal to the model at step N; validation
during training logs hit@1."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import FIXTURE, MINI_SCAR
from virtue import VirtueModel
from virtue.cli.main import main
from virtue.errors import CheckpointError
from virtue.eval.runner import EvalConfig, run_eval
from virtue.train.config import TrainConfig
from virtue.train.trainer import train


def config(out, dtype: str = "bfloat16", **extra) -> TrainConfig:
    data = {
        "model": {"preset": "tiny", "tokenizer": str(FIXTURE / "checkpoint"), "dtype": dtype},
        "data": {"sources": [{"kind": "synthetic", "n": 24, "seed": 0}], "global_batch_size": 6, "num_workers": 0},
        "gradcache": {"query_chunk": 3, "target_chunk": 3},
        "trainable": {"lora": True, "lora_dropout": 0.1, "connector": True},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": 4},
        "output": {"dir": str(out), "checkpoint_every": 2, "tensorboard": False},
    }
    data.update(extra)
    return TrainConfig.from_dict(data)


def inputs(images) -> list:
    return [{"image": images["rocket.png"], "box": [10, 10, 100, 100], "text": "find it"},
            {"image": images["coffee.png"]}, "a red circle on a table"]


@pytest.fixture(scope="module")
def at_step_2(tmp_path_factory):
    """The live model of a bf16 run stopped at step 2, and its output folder."""
    out = tmp_path_factory.mktemp("run")
    result = train(config(out), stop_at_step=2, show_progress_bar=False)
    return result.model.eval(), out


def test_checkpoint_is_the_model_at_its_step(at_step_2, fixture_images, tmp_path, monkeypatch):
    model, out = at_step_2
    expected = model.encode(inputs(fixture_images))
    monkeypatch.chdir(tmp_path)  # the checkpoint rebuilds its base from any working directory
    same = VirtueModel.from_pretrained(out / "checkpoint-2", merge_adapters=False, allow_hub=False)
    assert same.autocast_dtype == torch.bfloat16
    np.testing.assert_array_equal(same.encode(inputs(fixture_images)), expected)
    merged = VirtueModel.from_pretrained(out / "checkpoint-2", allow_hub=False)  # float32, adapters folded in
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # bfloat16 autocast vs a float32 merge: bfloat16's rounding, not a different model
    np.testing.assert_allclose(merged.encode(inputs(fixture_images)), expected, atol=2e-2)

    assert main(["export", str(out / "checkpoint-2"), str(tmp_path / "exported"), "--no-hub"]) == 0
    exported = VirtueModel.from_pretrained(tmp_path / "exported", allow_hub=False)
    np.testing.assert_allclose(exported.encode(inputs(fixture_images)), merged.encode(inputs(fixture_images)),
                               atol=1e-6)


def test_checkpoint_evaluates_like_the_model(at_step_2, tmp_path):
    model, out = at_step_2
    cfg = dict(benchmark="scar", data_root=str(MINI_SCAR), limit=6, cache_dir=None, show_progress_bar=False)
    # mini-SCaR is one parquet; the harness reads it as the RefCOCOg task through its file name
    data = tmp_path / "scar"
    data.mkdir()
    (data / "SCaR_eval_RefCOCOg.parquet").symlink_to(MINI_SCAR / "mini_scar.parquet")
    cfg.update(data_root=str(data), image_root=str(MINI_SCAR))
    live = run_eval(model, EvalConfig(**cfg, out_dir=str(tmp_path / "live")))
    assert main(["eval", "--model", str(out / "checkpoint-2"), "--no-hub", "--benchmark", "scar",
                 "--data-root", str(data), "--image-root", str(MINI_SCAR), "--limit", "6", "--cache-dir", "",
                 "--out", str(tmp_path / "cli")]) == 0
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert cli["tasks"]["RefCOCOg"]["hit@1"] == live.tasks["RefCOCOg"]["hit@1"]
    assert cli["tasks"]["RefCOCOg"]["mrr"] == pytest.approx(live.tasks["RefCOCOg"]["mrr"], abs=1e-9)


def test_changed_base_is_refused(tmp_path):
    out = tmp_path / "run"
    train(config(out, seed=1), stop_at_step=2, show_progress_bar=False)
    path = out / "checkpoint-2" / "train_config.json"
    saved = json.loads(path.read_text())
    saved["seed"] = 2  # the preset's random weights are drawn from the run's seed: a different base
    path.write_text(json.dumps(saved))
    with pytest.raises(CheckpointError, match="differ from those the run trained on"):
        VirtueModel.from_pretrained(out / "checkpoint-2", allow_hub=False)


def test_validation_during_training_logs_hit_at_1(tmp_path):
    data = tmp_path / "scar"
    data.mkdir()
    (data / "SCaR_eval_RefCOCOg.parquet").symlink_to(MINI_SCAR / "mini_scar.parquet")
    ev = {"every": 2, "benchmark": "scar", "data_root": str(data), "image_root": str(MINI_SCAR), "limit": 4}
    result = train(config(tmp_path / "run", dtype="float32", eval=ev), show_progress_bar=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert 0.0 <= r["eval"]["hit@1"]["RefCOCOg"] <= 1.0 and "SCaR Overall" in r["eval"]["aggregates"]
    assert (tmp_path / "run" / "eval" / "step-4" / "results.json").is_file()
    assert [r["step"] for r in result.evals] == [2, 4]
