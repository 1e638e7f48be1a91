"""Every shipped training config loads, and the paper's two stages fit together."""

from __future__ import annotations

from pathlib import Path

import pytest

from virtue.train.config import TrainConfig
from virtue.train.data import MMEB_TRAIN_SUBSETS, DataSource

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_configs_are_shipped():
    names = {p.name for p in CONFIGS}
    assert {"stage1_mmeb.yaml", "stage2_scar.yaml", "continue_jsonl.yaml", "train_tiny_synthetic.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = TrainConfig.load(path)
    for i, source in enumerate(cfg.data.sources):
        if source.get("kind") != "synthetic":
            DataSource.from_dict(source, where=f"{path.name} data[{i}]")
    assert cfg.data.global_batch_size % cfg.gradcache.query_chunk == 0


def test_two_stage_recipe():
    stage1 = TrainConfig.load(CONFIGS[0].parent / "stage1_mmeb.yaml")
    stage2 = TrainConfig.load(CONFIGS[0].parent / "stage2_scar.yaml")
    assert stage1.model.base == "Qwen/Qwen2-VL-2B-Instruct" and stage1.model.dtype == "bfloat16"
    (mmeb,) = stage1.data.sources
    assert mmeb["kind"] == "mmeb" and sorted(mmeb["subsets"]) == sorted(MMEB_TRAIN_SUBSETS)
    assert stage2.model.path == f"{stage1.output.dir}/final"  # stage 2 starts from stage 1's export
    (scar,) = stage2.data.sources
    assert scar["kind"] == "scar" and not scar.get("masks")
    for cfg in (stage1, stage2):  # the official recipe's known values
        assert (cfg.trainable.lora_r, cfg.trainable.lora_alpha, cfg.trainable.use_dora) == (8, 64, True)
        assert cfg.loss.temperature == 0.02 and cfg.optim.lr == 2e-5 and cfg.optim.warmup_steps == 200
        assert (cfg.gradcache.query_chunk, cfg.gradcache.target_chunk) == (2, 2)
    assert stage2.data.global_batch_size == 64 and stage2.optim.max_steps == 1000


def test_overrides_reach_list_items(tmp_path):
    cfg = TrainConfig.load(CONFIGS[0].parent / "continue_jsonl.yaml",
                           ["data.sources.0.path=pairs.jsonl", "optim.max_steps=10"])
    assert cfg.data.sources[0]["path"] == "pairs.jsonl" and cfg.optim.max_steps == 10
