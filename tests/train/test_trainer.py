"""The training loop end to end on the tiny preset: exact resume, export, CLI, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from tests.conftest import FIXTURE
from virtue import VirtueModel
from virtue.cli.main import main
from virtue.errors import ConfigError
from virtue.train.config import TrainConfig
from virtue.train.trainer import train


def config_dict(out, **optim) -> dict:
    return {
        "model": {"preset": "tiny", "tokenizer": str(FIXTURE / "checkpoint")},
        "data": {"sources": [{"kind": "synthetic", "n": 24, "seed": 0, "hard_negatives": 2}],
                 "global_batch_size": 6},
        "gradcache": {"enabled": True, "query_chunk": 4, "target_chunk": 4},
        "loss": {"temperature": 0.05, "use_hard_negatives": True},
        "trainable": {"lora": True, "lora_dropout": 0.1, "connector": True},
        "optim": {"lr": 1e-3, "warmup_steps": 2, "max_steps": 6, **optim},
        "output": {"dir": str(out), "checkpoint_every": 2, "tensorboard": False},
    }


def test_resume_gives_the_same_losses(tmp_path):
    straight = train(TrainConfig.from_dict(config_dict(tmp_path / "a")), show_progress_bar=False)
    cfg = TrainConfig.from_dict(config_dict(tmp_path / "b"))
    first = train(cfg, stop_at_step=3, show_progress_bar=False)
    assert first.export_dir is None and first.steps == 3
    rest = train(cfg, resume=True, show_progress_bar=False)
    assert rest.steps == 6
    np.testing.assert_allclose(first.losses + rest.losses, straight.losses, rtol=0, atol=1e-6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert len(set(np.round(straight.losses, 4))) > 1  # the loss moves, so equality means something


def test_export_is_the_trained_model(tmp_path, fixture_images):
    result = train(TrainConfig.from_dict(config_dict(tmp_path, max_steps=2)), show_progress_bar=False)
    exported = VirtueModel.from_pretrained(result.export_dir, allow_hub=False)
    inputs = [{"image": fixture_images["rocket.png"], "box": [10, 10, 100, 100], "text": "x"}, "a red circle"]
    np.testing.assert_allclose(exported.encode(inputs), result.model.encode(inputs), atol=1e-6)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert {"loss", "lr", "grad_norm", "samples_per_s", "subset"} <= set(records[0])


def test_cli_train_with_overrides(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(config_dict(tmp_path / "run")))
    assert main(["train", "--config", str(path), "optim.max_steps=1", "output.export=false", "--no-progress"]) == 0
    assert (tmp_path / "run" / "checkpoint-1" / "trainable.safetensors").is_file()


def test_bad_config_values_are_named(tmp_path):
    data = config_dict(tmp_path)
    data["optim"]["lrate"] = 1
    with pytest.raises(ConfigError, match="lrate"):
        TrainConfig.from_dict(data)
    data = config_dict(tmp_path)
    data["trainable"]["llm"] = True
    with pytest.raises(ConfigError, match="exclude each other"):
        TrainConfig.from_dict(data)
