"""The architecture the README draws, checked on the code: the layer table of README.md ("Dependency rule") is
parsed, every module of src/virtue is parsed (every import: top-level, inside functions, under TYPE_CHECKING), and
the test fails on an import against the table, an import circle between modules, a private name imported from
another module, the top-level package imported from inside it, or a module over the length budget.

The checker below is exercised on planted violations too (`test_checker_flags_*`), so that a checker that finds
nothing cannot pass for a tree that has nothing to find.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
README = REPO / "README.md"
PACKAGE = "virtue"
MAX_LINES = 600  # physical lines of a module (what `wc -l` counts)


# ----------------------------------------------------------------------------------------- the rule, from README
@dataclass(frozen=True)
class Layer:
    name: str
    prefixes: tuple[str, ...]  # module names of the layer: each prefix and everything under it
    allowed: frozenset[str]  # layers it may import ("*": every layer)


def read_rule(readme: str) -> list[Layer]:
    """The table under the README's "Dependency rule" heading: | layer | modules | may import |."""
    match = re.search(r"^#+ Dependency rule\s*$(.*?)(?=^#)", readme, re.M | re.S)
    assert match, "README.md has no '### Dependency rule' section"
    layers = []
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`") or set(cells[0]) <= set("-: "):
            continue
        name = cells[0].strip("`")
        prefixes = tuple(p.strip().strip("`") for p in cells[1].split(","))
        allowed = frozenset(a.strip().strip("`") for a in cells[2].split(",") if a.strip() not in ("", "—", "-"))
        layers.append(Layer(name, prefixes, allowed))
    assert layers, "the Dependency rule section has no table rows"
    names = {layer.name for layer in layers}
    for layer in layers:
        unknown = layer.allowed - names - {"*"}
        assert not unknown, f"README layer {layer.name!r} may import unknown layers {sorted(unknown)}"
    return layers


def layer_of(module: str, layers: list[Layer]) -> Layer | None:
    """The layer whose longest prefix matches the module. The top-level package (a prefix without a dot) holds
    only itself: its submodules belong to their own layers."""
    best: tuple[int, Layer] | None = None
    for layer in layers:
        for prefix in layer.prefixes:
            matches = module == prefix or ("." in prefix and module.startswith(prefix + "."))
            if matches and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    return None if best is None else best[1]


# ----------------------------------------------------------------------------------------- the code's imports
@dataclass
class Tree:
    """Modules of a source tree: name -> file, and every import edge (module -> imported module, line, name)."""

    files: dict[str, Path]
    edges: dict[str, list[tuple[str, int, str | None]]] = field(default_factory=lambda: defaultdict(list))


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def parse_tree(src: Path, package: str = PACKAGE) -> Tree:
    files = {module_name(p, src): p for p in sorted((src / package).rglob("*.py"))}
    tree = Tree(files)
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == package:
                        tree.edges[module].append((alias.name, node.lineno, None))
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(module, is_package, node)
                if base is None or base.split(".")[0] != package:
                    continue
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in files:  # `from virtue.eval import runner`: the submodule itself
                        tree.edges[module].append((target, node.lineno, None))
                    else:
                        tree.edges[module].append((base, node.lineno, alias.name))
    return tree


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str | None:
    if not node.level:
        return node.module
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


# ----------------------------------------------------------------------------------------- the checks
def check(tree: Tree, layers: list[Layer], package: str = PACKAGE, max_lines: int = MAX_LINES) -> list[str]:
    """Every violation, one line each (file:line: what)."""
    problems = []
    for module, path in tree.files.items():
        if layer_of(module, layers) is None:
            problems.append(f"{path}: module {module} is in no layer of the README's table")
        lines = len(path.read_text().splitlines())
        if lines > max_lines:
            problems.append(f"{path}: {lines} lines, over the budget of {max_lines}")
    for module, edges in tree.edges.items():
        source = layer_of(module, layers)
        path = tree.files[module]
        for target, line, name in edges:
            where = f"{path}:{line}: {module} imports {target}" + (f".{name}" if name else "")
            if target not in tree.files:
                problems.append(f"{where}: no such module in {package}")
                continue
            if target == package and module != package and (source is None or "*" not in source.allowed):
                problems.append(f"{where}: the top-level package is the users' facade; import the defining module")
                continue
            dest = layer_of(target, layers)
            crosses = source is not None and dest is not None and dest.name != source.name
            if crosses and "*" not in source.allowed and dest.name not in source.allowed:
                problems.append(f"{where}: layer {source.name!r} may not import layer {dest.name!r}")
            if name is not None and name.startswith("_") and not name.startswith("__") and target != module:
                problems.append(f"{where}: a private name of another module")
    problems += [f"import circle: {' -> '.join(cycle)}" for cycle in import_cycles(tree)]
    return problems


def import_cycles(tree: Tree) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each as a cycle through its members."""
    graph = {m: sorted({t for t, _, _ in tree.edges.get(m, ()) if t in tree.files and t != m}) for m in tree.files}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return [_cycle_through(group, graph) for group in groups]


def _cycle_through(group: list[str], graph: dict[str, list[str]]) -> list[str]:
    """One concrete cycle inside a strongly connected group, for the message (shortest path back to its start)."""
    start, members = group[0], set(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return group


# ----------------------------------------------------------------------------------------- the tests
def test_the_package_follows_the_readme_rule():
    layers = read_rule(README.read_text())
    tree = parse_tree(SRC)
    assert len(tree.files) > 50 and sum(len(e) for e in tree.edges.values()) > 200  # the parse found the code
    problems = check(tree, layers)
    assert not problems, "\n".join(problems)


def test_every_readme_layer_holds_modules():
    """A table row naming no module (a typo, a renamed package) would allow nothing and check nothing."""
    layers = read_rule(README.read_text())
    tree = parse_tree(SRC)
    empty = [layer.name for layer in layers if not any(layer_of(m, layers) is layer for m in tree.files)]
    assert not empty, f"README layers without modules: {empty}"


RULE = """
### Dependency rule

| layer | modules | may import |
|---|---|---|
| `low` | `virtue.low` | — |
| `mid` | `virtue.mid` | `low` |
| `top` | `virtue.top` | `low`, `mid` |
| `cli` | `virtue.cli` | * |
| `facade` | `virtue` | `low` |

## Next
"""


def _plant(tmp_path: Path, files: dict[str, str]) -> Path:
    src = tmp_path / "src"
    for name, text in {"virtue/__init__.py": "", "virtue/cli/__init__.py": "", **files}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    return src


def test_checker_accepts_a_clean_tree(tmp_path):
    src = _plant(tmp_path, {
        "virtue/low.py": "X = 1\n",
        "virtue/mid.py": "from virtue.low import X\n",
        "virtue/top/__init__.py": "",
        "virtue/top/a.py": "from virtue import mid\nfrom . import b\n",
        "virtue/top/b.py": "def f():\n    from virtue.low import X\n",
        "virtue/cli/main.py": "import virtue\nfrom virtue.top.a import f\n",
    })
    assert check(parse_tree(src), read_rule(RULE)) == []


@pytest.mark.parametrize(("files", "expected"), [
    ({"virtue/low.py": "def f():\n    from virtue.mid import Y\n", "virtue/mid.py": "Y = 1\n"},
     "layer 'low' may not import layer 'mid'"),  # a lazy wrong-way import
    ({"virtue/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from virtue.top import T\n",
      "virtue/top.py": "T = 1\n"}, "layer 'low' may not import layer 'top'"),  # under TYPE_CHECKING
    ({"virtue/mid.py": "from virtue.low import _hidden\n", "virtue/low.py": "_hidden = 1\n"},
     "a private name of another module"),
    ({"virtue/top/__init__.py": "", "virtue/top/a.py": "from virtue.top.b import g\n",
      "virtue/top/b.py": "def g():\n    from virtue.top import a\n"}, "import circle: virtue.top.a -> virtue.top.b"),
    ({"virtue/mid.py": "from virtue import low\n", "virtue/low.py": ""}, None),  # a submodule, not the facade
    ({"virtue/mid.py": "import virtue\n"}, "the top-level package is the users' facade"),
    ({"virtue/extra.py": ""}, "module virtue.extra is in no layer"),
    ({"virtue/mid.py": "from virtue.gone import Z\n"}, "no such module"),
    ({"virtue/low.py": "x = 1\n" * 601}, "601 lines, over the budget of 600"),
])
def test_checker_flags_planted_violations(tmp_path, files, expected):
    problems = check(parse_tree(_plant(tmp_path, files)), read_rule(RULE))
    if expected is None:
        assert problems == []
    else:
        assert any(expected in p for p in problems), problems
