"""Shared fixtures: the official-parity fixture directory and models loaded from it once per run."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("VIRTUE_PARITY_FIXTURE", REPO.parent / "shared/fixtures/virtue-official-tiny"))
MINI_SCAR = REPO.parent / "shared/data/mini-scar"


def fixture_cases() -> list[dict]:
    return json.loads((FIXTURE / "cases.json").read_text())["cases"]


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    assert (FIXTURE / "cases.json").is_file(), f"parity fixture not found at {FIXTURE}"
    return FIXTURE


@pytest.fixture(scope="session")
def _official_model(fixture_dir):
    from virtue import VirtueModel

    return VirtueModel.from_pretrained(fixture_dir / "checkpoint", allow_hub=False)


@pytest.fixture
def official_model(_official_model):
    """The fixture checkpoint loaded from the official layout (a fresh copy per test)."""
    return copy.deepcopy(_official_model)


@pytest.fixture(scope="session")
def converted_dir(fixture_dir, tmp_path_factory) -> Path:
    from virtue.model.convert import convert_checkpoint

    return convert_checkpoint(fixture_dir / "checkpoint", tmp_path_factory.mktemp("converted") / "m", allow_hub=False)


@pytest.fixture(scope="session")
def fixture_images(fixture_dir) -> dict[str, Path]:
    return {p.name: p for p in (fixture_dir / "images").iterdir()}


@pytest.fixture(scope="session")
def tokenizer(fixture_dir):
    from transformers import AutoTokenizer

    from virtue.config import quiet_transformers

    with quiet_transformers():
        return AutoTokenizer.from_pretrained(str(fixture_dir / "checkpoint"))


@pytest.fixture
def tiny_model(tokenizer):
    """A tiny random VIRTUE built in code (clean compatibility setting)."""
    import torch

    from virtue import VirtueModel
    from virtue.model.presets import tiny_config

    torch.manual_seed(0)
    return VirtueModel(tiny_config(), tokenizer).eval()
