"""No test passes in CI by not running: a test that needs an optional package asks `tests.conftest.require`, which
skips outside CI but fails under CI=true; skipping is otherwise allowed only for GPU-only tests. The test extra
installs every package the tests require, and `.ci/run` runs the suite with CI=true."""

from __future__ import annotations

import ast
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO, require

TESTS = REPO / "tests"
# Names that skip a test, whatever object they are reached through (pytest, pytest.mark, unittest, self).
SKIPPERS = {"importorskip", "skip", "skipif", "skipTest", "SkipTest"}
GPU_REASON = re.compile(r"\b(cuda|gpu)\b", re.IGNORECASE)


def skip_uses(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, what) for every way `source` skips a test outside the policy: `pytest.importorskip` anywhere but
    `require` in tests/conftest.py; `pytest.skip`, `pytest.mark.skip(if)`, unittest's skips without a reason
    mentioning CUDA or a GPU; skip names imported from pytest or unittest. `pytest.skip.Exception` inside
    `pytest.raises(...)` (asserting that something skips) is not a skip."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def enclosing_function(node: ast.AST) -> str | None:
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return None

    def in_pytest_raises(node: ast.AST) -> bool:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "raises":
                return True
        return False

    def strings_of(node: ast.AST) -> str:
        return " ".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))

    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in {"pytest", "unittest", "_pytest.outcomes"}:
            found += [(node.lineno, f"from {node.module} import {a.name}") for a in node.names if a.name in SKIPPERS]
        if not (isinstance(node, ast.Attribute) and node.attr in SKIPPERS):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.Attribute) and parent.attr == "Exception" and in_pytest_raises(parent):
            continue  # pytest.raises(pytest.skip.Exception): a test of something that skips
        if node.attr == "importorskip":
            if not (Path(filename).resolve() == TESTS / "conftest.py" and enclosing_function(node) == "require"):
                found.append((node.lineno, "pytest.importorskip (use tests.conftest.require)"))
            continue
        call = parent if isinstance(parent, ast.Call) and parent.func is node else None
        if call is None or not GPU_REASON.search(strings_of(call)):
            found.append((node.lineno, f"{node.attr} without a reason naming CUDA or a GPU"))
    return sorted(found)


def test_the_scan_finds_each_kind_of_skip():
    # The scan must be able to fail: every form below is a violation, except the GPU-only skips.
    bad = """
import pytest, unittest
from pytest import importorskip
x = pytest.importorskip("foo")
pytest.skip("later")
pytestmark = pytest.mark.skipif(True, reason="flaky")
@pytest.mark.skip
def test_a(): pass
@unittest.skip("no reason")
def test_b(): pass
def test_c(self): self.skipTest("slow")
raise pytest.skip.Exception("manual")
"""
    assert [line for line, _ in skip_uses(bad)] == [3, 4, 5, 6, 7, 9, 11, 12]
    allowed = """
import pytest, torch
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_d():
    if not torch.cuda.is_available():
        pytest.skip(f"GPU only ({torch.__version__})")
    with pytest.raises(pytest.skip.Exception):
        pass
"""
    assert skip_uses(allowed) == []


def test_tests_skip_only_through_require_or_for_a_gpu():
    files = sorted(TESTS.rglob("*.py"))
    assert len(files) > 30  # the scan sees the suite
    found = {str(f.relative_to(REPO)): skip_uses(f.read_text(), str(f)) for f in files}
    assert {name: uses for name, uses in found.items() if uses} == {}
    # The helper's own importorskip is seen (and allowed): the scan reads conftest.py where it is.
    assert "pytest.importorskip" in (TESTS / "conftest.py").read_text()


def test_require_fails_under_ci_and_skips_outside(monkeypatch):
    missing = "virtue_test_no_such_module_xyz"
    for value in ("true", "1", "True"):
        monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.fail.Exception, match=f"CI is set, so the optional package {missing} is "
                                                          "required \\(the reason\\)"):
            require(missing, "the reason")
        assert require("json") is json
    for value in (None, "", "false", "0"):
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="the reason"):
            require(missing, "the reason")
        assert require("json") is json


def extra_requirements(extra: str = "test") -> set[str]:
    """The distributions pyproject's `extra` installs, its references to this project's other extras expanded."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names, todo, seen = set(), [extra], set()
    while todo:
        for spec in project["optional-dependencies"][todo.pop()]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == canonicalize_name(project["name"]):
                todo += [e for e in req.extras if e not in seen]
                seen |= req.extras
            else:
                names.add(canonicalize_name(req.name))
    return names


def required_modules() -> dict[str, str]:
    """Third-party module -> the test file that `require`s it (the standard library's, as this file's, left out)."""
    modules = {}
    for f in sorted(TESTS.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "require"
                    and node.args and isinstance(node.args[0], ast.Constant)
                    and node.args[0].value.split(".")[0] not in sys.stdlib_module_names):
                modules[node.args[0].value] = str(f.relative_to(REPO))
    return modules


def test_the_test_extra_installs_what_the_tests_require():
    modules = required_modules()
    assert {"sentence_transformers", "mteb", "datasets", "ray.data"} <= set(modules)
    installed = extra_requirements()
    # An import name maps to its distribution by the usual spelling (sentence_transformers: sentence-transformers).
    missing = {m: f for m, f in modules.items() if canonicalize_name(m.split(".")[0]) not in installed}
    assert missing == {}, f"add to pyproject's test extra: {missing}"


def test_ci_script_runs_the_suite_with_ci_set_and_every_extra():
    lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    install = next(i for i, line in enumerate(lines) if line.startswith("pip install"))
    pytest_run = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert '-e ".[test]"' in lines[install]
    assert "export CI=true" in lines[:pytest_run], "the CI script must export CI=true before it runs pytest"
