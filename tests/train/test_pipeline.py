"""The input pipeline: DataLoader workers prepare batches without changing them, a resumed run sees the same
data although workers read ahead, and images are checked up front or when first drawn."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from tests.conftest import FIXTURE
from virtue.errors import DataError
from virtue.train.config import TrainConfig
from virtue.train.pipeline import LAZY_SAMPLE
from virtue.train.synthetic import write_scar_parquet
from virtue.train.trainer import train


def config(out, source: dict, steps: int = 6, **data) -> TrainConfig:
    return TrainConfig.from_dict({
        "model": {"preset": "tiny", "tokenizer": str(FIXTURE / "checkpoint")},
        "data": {"sources": [source], "global_batch_size": 6, **data},
        "gradcache": {"query_chunk": 3, "target_chunk": 6},
        "trainable": {"lora": True, "lora_dropout": 0.1, "connector": True},
        "optim": {"lr": 1e-3, "warmup_steps": 0, "max_steps": steps},
        "output": {"dir": str(out), "checkpoint_every": 3, "tensorboard": False, "export": False},
    })


@pytest.fixture(scope="module")
def scar_dir(tmp_path_factory):
    """SCaR-train parquet on disk: 40 good rows, then a missing image, a box outside its image, an empty caption."""
    folder = tmp_path_factory.mktemp("scar")
    write_scar_parquet(folder, n=LAZY_SAMPLE + 8, seed=0, with_bad_rows=True)
    return folder


@pytest.fixture(scope="module")
def scar_dir_image_problems_only(scar_dir, tmp_path_factory):
    """The same rows without the empty caption (a problem found at load, whatever the image checks)."""
    import pyarrow.parquet as pq

    folder = tmp_path_factory.mktemp("scar-images-only")
    table = pq.read_table(scar_dir / "synthetic_scar_train.parquet")
    pq.write_table(table.slice(0, table.num_rows - 1), folder / "synthetic_scar_train.parquet")
    (folder / "images").symlink_to(scar_dir / "images")
    return folder


def records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_workers_and_resume_give_the_same_losses(tmp_path, scar_dir):
    source = {"kind": "scar", "path": str(scar_dir)}
    inline = train(config(tmp_path / "w0", source, num_workers=0), show_progress_bar=False).losses
    workers = train(config(tmp_path / "w2", source, num_workers=2, prefetch=2), show_progress_bar=False).losses
    np.testing.assert_allclose(workers, inline, rtol=0, atol=1e-6)
    cfg = config(tmp_path / "resumed", source, num_workers=2, prefetch=3)
    first = train(cfg, stop_at_step=3, show_progress_bar=False).losses  # the workers had read ahead of step 3
    rest = train(cfg, resume=True, show_progress_bar=False).losses
    np.testing.assert_allclose(first + rest, inline, rtol=0, atol=1e-6)
    assert len(set(np.round(inline, 3))) > 1


def test_lazy_checks_replace_bad_rows_when_drawn(tmp_path, scar_dir, caplog):
    """Rows in file order, so the last batch holds the two bad image rows (past the rows checked at start)."""
    source = {"kind": "scar", "path": str(scar_dir)}
    cfg = config(tmp_path / "lazy", source, steps=7, num_workers=0, image_checks="lazy", shuffle=False)
    with caplog.at_level(logging.WARNING):
        train(cfg, show_progress_bar=False)
    replaced = [r for r in records(tmp_path / "lazy") if "replaced_rows" in r]
    assert [r["step"] for r in replaced] == [7]
    assert replaced[0]["replaced_rows"] == ["synthetic_scar_train.parquet:40", "synthetic_scar_train.parquet:41"]
    text = caplog.text
    assert "synthetic_scar_train.parquet:40" in text and "qry_image_path" in text and "image file not found" in text
    assert "synthetic_scar_train.parquet:41" in text and "'bbox'" in text


def test_eager_checks_drop_bad_rows_before_training(tmp_path, scar_dir, caplog):
    source = {"kind": "scar", "path": str(scar_dir)}
    with caplog.at_level(logging.WARNING):
        result = train(config(tmp_path / "eager", source, num_workers=0, image_checks="eager"),
                       show_progress_bar=False)
    assert result.steps == 6
    assert "2 bad row(s) skipped" in caplog.text and "synthetic_scar_train.parquet:41" in caplog.text
    assert not any("replaced_rows" in r for r in records(tmp_path / "eager"))


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_bad_rows_stop_the_run_when_asked(tmp_path, scar_dir_image_problems_only, mode):
    source = {"kind": "scar", "path": str(scar_dir_image_problems_only)}
    cfg = config(tmp_path / mode, source, steps=7, num_workers=0, image_checks=mode, shuffle=False,
                 on_bad_row="error")
    with pytest.raises(DataError, match=r"synthetic_scar_train.parquet:40, column 'qry_image_path': image file not"):
        train(cfg, show_progress_bar=False)


def test_wrong_image_root_fails_at_start(tmp_path, scar_dir):
    source = {"kind": "scar", "path": str(scar_dir), "image_root": str(tmp_path)}  # no images there
    with pytest.raises(DataError, match="all of the first .* rows are bad.*check image_root"):
        train(config(tmp_path / "run", source, num_workers=0, image_checks="lazy"), show_progress_bar=False)


def test_prepared_batches_pin_their_image_tensors(scar_dir, tokenizer, monkeypatch):
    """What the DataLoader's pinning thread calls on CUDA machines; pinning itself needs CUDA, so it is recorded."""
    import torch

    from virtue import VirtueModel
    from virtue.model.presets import tiny_config
    from virtue.train.data import load_sources
    from virtue.train.pipeline import PreparedBatches

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.shape) or t)
    (subset,) = load_sources([{"kind": "scar", "path": str(scar_dir)}], check_images=False)
    model = VirtueModel(tiny_config(), tokenizer)
    dataset = PreparedBatches({subset.name: (subset.examples, 1.0)}, model.processor, hard_negatives=False,
                              on_bad_row="skip")
    step = dataset[(1, subset.name, (0, 1, 2))]
    assert all(x.image.prepared is not None for x in step.batch.queries)
    step.pin_memory()
    assert len(pinned) == 6  # per query image: the normalised image (ViT) and the SAM2 input
    embeddings = model(step.batch.queries)  # prepared inputs embed like the originals
    originals = model([e.query for e in subset.examples[:3]])
    torch.testing.assert_close(embeddings, originals, atol=1e-5, rtol=0)
