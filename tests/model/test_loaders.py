"""Checkpoint layouts owned by other packages reach `VirtueModel.from_pretrained` through entry points, so the
model imports none of their code (the training checkpoint itself is loaded in tests/train/test_checkpoint_model.py)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import subprocess
import sys

import pytest

from virtue import CheckpointError, UnknownLayoutError, VirtueModel
from virtue.model import loaders
from virtue.model.loaders import ENTRY_POINT_GROUP, CheckpointLoader, loader_for, registered_loaders


def test_the_training_layout_is_registered(tmp_path):
    found = {loader.name: loader for loader in registered_loaders()}
    assert "training" in found, "the virtue.checkpoint_loaders entry point of pyproject.toml is not installed"
    from virtue.train.checkpoint_model import TRAINING_CHECKPOINTS
    from virtue.train.state import STATE_FILE, WEIGHTS_FILE

    assert found["training"] is TRAINING_CHECKPOINTS
    (tmp_path / STATE_FILE).write_text("{}")
    assert loader_for(tmp_path) is None  # state alone is not a checkpoint
    (tmp_path / WEIGHTS_FILE).write_bytes(b"")
    assert loader_for(tmp_path) is TRAINING_CHECKPOINTS


def test_a_folder_no_loader_claims_is_an_unknown_layout(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UnknownLayoutError, match="not a VIRTUE checkpoint"):
        VirtueModel.from_pretrained(tmp_path, allow_hub=False)


def _entry(name: str, value: str) -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


def test_a_broken_loader_is_skipped_and_a_wrong_one_refused(monkeypatch, caplog):
    good = _entry("training", "virtue.train.checkpoint_model:TRAINING_CHECKPOINTS")
    broken = _entry("broken", "virtue_no_such_package.loaders:LOADER")
    monkeypatch.setattr(loaders.importlib.metadata, "entry_points", lambda group: [broken, good])
    with caplog.at_level(logging.WARNING, logger="virtue.model.loaders"):
        assert [loader.name for loader in registered_loaders()] == ["training"]
    assert "broken" in caplog.text and "cannot be imported" in caplog.text

    wrong = _entry("wrong", "virtue.errors:VirtueError")
    monkeypatch.setattr(loaders.importlib.metadata, "entry_points", lambda group: [wrong])
    with pytest.raises(CheckpointError, match="is not a virtue.model.loaders.CheckpointLoader"):
        list(registered_loaders())


def test_a_registered_loader_gets_the_loading_options(monkeypatch, tmp_path):
    seen = {}
    custom = CheckpointLoader("custom", lambda path: (path / "custom.txt").is_file(),
                              lambda path, **options: seen.update(path=path, **options) or "the model")
    monkeypatch.setattr(loaders, "registered_loaders", lambda: iter([custom]))
    (tmp_path / "custom.txt").write_text("")
    assert VirtueModel.from_pretrained(tmp_path, allow_hub=False, merge_adapters=False) == "the model"
    assert seen["path"] == tmp_path and seen["merge_adapters"] is False and seen["allow_hub"] is False


def test_loading_the_builtin_layouts_imports_no_training_code(fixture_dir):
    code = ("import sys; from virtue.model.embedder import VirtueModel; "
            f"VirtueModel.from_pretrained({str(fixture_dir / 'checkpoint')!r}, allow_hub=False); "
            "print(sorted(m for m in sys.modules if m.startswith(('virtue.train', 'peft'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
