"""Shared fixtures: the official-parity fixture directory and models loaded from it once per run; `require`, the
one way a test may depend on an optional package."""

from __future__ import annotations

import copy
import importlib
import json
import os
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(os.environ.get("VIRTUE_PARITY_FIXTURE", REPO.parent / "shared/fixtures/virtue-official-tiny"))
MINI_SCAR = REPO.parent / "shared/data/mini-scar"


def in_ci() -> bool:
    """CI runners set CI=true (GitHub, GitLab; `.ci/run` exports it too); unset, empty, 0, false, no, off: not CI."""
    return os.environ.get("CI", "").strip().lower() not in {"", "0", "false", "no", "off"}


def require(module: str, reason: str | None = None) -> ModuleType:
    """Import an optional package a test needs. Outside CI a missing one skips the test (module-level use: the
    file) with `reason`; under CI it fails, because a CI without the extra would otherwise pass by not running
    the test. tests/test_ci_policy.py allows `pytest.importorskip` here only."""
    if not in_ci():
        return pytest.importorskip(module, reason=reason)
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # absent, or present but broken: either way the test cannot run
        why = f" ({reason})" if reason else ""
        pytest.fail(f"CI is set, so the optional package {module} is required{why}: {exc!r}; install the "
                    "test extra: pip install -e \".[test]\"", pytrace=False)


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
