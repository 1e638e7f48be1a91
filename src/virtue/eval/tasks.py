"""The evaluation task table as data: 5 SCaR subsets and the 36 MMEB tasks (virtue-spec §8.1), and aggregates.

Aggregates follow the paper: dataset-level (unweighted) means per MMEB meta-task, over IND (the 20 datasets of
MMEB-train, §5.1), OOD (the other 16) and all 36 ("Overall"); "SCaR Overall" is the plain mean of the SCaR subsets.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from virtue.errors import ConfigError

Benchmark = Literal["scar", "mmeb"]
Split = Literal["IND", "OOD"]

# (task name as in the paper's table, suffix of the released parquet `SCaR_eval_<suffix>.parquet`), §5.3 / §8.3.
SCAR_SUBSETS: tuple[tuple[str, str], ...] = (
    ("RefCOCO+", "RefCOCO_plus"),
    ("RefCOCOg", "RefCOCOg"),
    ("VisualGenome", "VisualGenome"),
    ("COCO-Stuff", "COCO_Stuff"),
    ("ADE20K", "ADE20K"),
)

# The 36 tasks of `eval_mmeb.yaml` by meta-task, in the paper's order (§8.1). The names are also the
# subset names of `ziyjiang/MMEB_Test_Instruct`, hence the file stems.
MMEB_META_TASKS: dict[str, tuple[str, ...]] = {
    "Classification": (
        "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397",
        "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211",
    ),
    "VQA": (
        "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA",
        "Visual7W", "ScienceQA", "VizWiz", "GQA", "TextVQA",
    ),
    "Retrieval": (
        "MSCOCO_i2t", "VisualNews_i2t", "VisDial", "MSCOCO_t2i", "VisualNews_t2i", "WebQA",
        "EDIS", "Wiki-SS-NQ", "CIRR", "NIGHTS", "OVEN", "FashionIQ",
    ),
    "Grounding": ("MSCOCO", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
}  # fmt: skip

# MMEB-train subsets as spelled in §5.1; "MSCOCO" there is the grounding task. A task is IND iff listed here.
MMEB_TRAIN_SUBSETS: tuple[str, ...] = (
    "ImageNet_1K", "N24News", "HatefulMemes", "VOC2007", "SUN397", "OK-VQA", "A-OKVQA", "DocVQA",
    "InfographicsVQA", "ChartQA", "Visual7W", "VisDial", "CIRR", "VisualNews_t2i", "VisualNews_i2t",
    "MSCOCO_t2i", "MSCOCO_i2t", "NIGHTS", "WebQA", "MSCOCO",
)  # fmt: skip

SCAR_OVERALL = "SCaR Overall"
MMEB_OVERALL = "Overall"
N_TASKS_PREFIX = "n_tasks/"
# Output order of `aggregate`: the paper's column order.
AGGREGATE_KEYS: tuple[str, ...] = (*MMEB_META_TASKS, "IND", "OOD", MMEB_OVERALL, SCAR_OVERALL)


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    Attributes:
        name: the task's name in the paper's tables (e.g. "RefCOCO+", "ImageNet-1K").
        benchmark: "scar" or "mmeb".
        meta: "SCaR", or the MMEB meta-task ("Classification", "VQA", "Retrieval", "Grounding").
        split: "IND" (in MMEB-train) or "OOD" for MMEB; None for SCaR.
        file_stem: released data file stem (`SCaR_eval_RefCOCO_plus`) or the MMEB_Test_Instruct subset name.
    """

    name: str
    benchmark: Benchmark
    meta: str
    split: Split | None
    file_stem: str


def _norm(name: str) -> str:
    # MMEB-train spells "ImageNet_1K" where the eval set spells "ImageNet-1K".
    return re.sub(r"[-_\s]", "", name).lower()


def _build_tasks() -> tuple[TaskSpec, ...]:
    scar = [TaskSpec(name, "scar", "SCaR", None, f"SCaR_eval_{stem}") for name, stem in SCAR_SUBSETS]
    train = {_norm(n) for n in MMEB_TRAIN_SUBSETS}
    mmeb = [
        TaskSpec(name, "mmeb", meta, "IND" if _norm(name) in train else "OOD", name)
        for meta, names in MMEB_META_TASKS.items()
        for name in names
    ]
    return (*scar, *mmeb)


TASKS: tuple[TaskSpec, ...] = _build_tasks()


def _groups() -> dict[str, tuple[TaskSpec, ...]]:
    """Group name (lower case) -> its tasks: benchmarks, meta-tasks and the MMEB splits."""
    groups: dict[str, tuple[TaskSpec, ...]] = {"mmeb": tuple(t for t in TASKS if t.benchmark == "mmeb")}
    for key in ("SCaR", *MMEB_META_TASKS):
        groups[key.lower()] = tuple(t for t in TASKS if t.meta == key)
    for split in ("IND", "OOD"):
        groups[split.lower()] = tuple(t for t in TASKS if t.split == split)
    return groups


def _by_name() -> dict[str, TaskSpec]:
    table = {t.name.lower(): t for t in TASKS}
    table.update({t.file_stem.lower(): t for t in TASKS})
    return table


def find_task(name: str) -> TaskSpec | None:
    """The task called ``name`` (task name or file stem, case-insensitive), or None if it is not in the table."""
    return _by_name().get(name.strip().lower())


def _unknown(name: str, known: Iterable[str]) -> ConfigError:
    display = {k.lower(): k for k in known}
    close = difflib.get_close_matches(name.lower(), list(display), n=5, cutoff=0.6)
    hint = ", ".join(display[c] for c in close) or "none"
    groups = "SCaR, MMEB, " + ", ".join(MMEB_META_TASKS) + ", IND, OOD"
    return ConfigError(f"unknown eval task {name!r}; close matches: {hint}; groups: {groups}")


def get_tasks(names: list[str] | None = None, benchmark: Benchmark | None = None) -> list[TaskSpec]:
    """Resolve task names and group names to `TaskSpec`s, in table order without duplicates.

    Args:
        names: task names or file stems (case-insensitive), or groups: "SCaR", "MMEB", a meta-task
            ("Classification", "VQA", "Retrieval", "Grounding"), "IND", "OOD". None selects every task.
        benchmark: keep only this benchmark's tasks ("scar" or "mmeb"); None keeps both.

    Raises:
        ConfigError: an unknown name (the message lists close matches), an unknown benchmark, or a name that
            belongs to another benchmark than ``benchmark``.
    """
    if benchmark not in (None, "scar", "mmeb"):
        raise ConfigError(f"benchmark: expected 'scar', 'mmeb' or None, got {benchmark!r}")
    if names is None:
        chosen = set(TASKS)
    else:
        groups, by_name = _groups(), _by_name()
        chosen = set()
        for name in names:
            key = name.strip().lower()
            if key in groups:
                chosen.update(groups[key])
            elif key in by_name:
                chosen.add(by_name[key])
            else:
                raise _unknown(name, [t.name for t in TASKS] + [t.file_stem for t in TASKS] + ["SCaR", "MMEB"])
    if benchmark is not None and names is not None:
        foreign = sorted(t.name for t in chosen if t.benchmark != benchmark)
        if foreign:
            raise ConfigError(f"tasks {foreign} are not {benchmark} tasks (benchmark={benchmark!r})")
    return [t for t in TASKS if t in chosen and (benchmark is None or t.benchmark == benchmark)]


def _aggregate_keys(task: TaskSpec) -> tuple[str, ...]:
    if task.benchmark == "scar":
        return (SCAR_OVERALL,)
    assert task.split is not None  # every MMEB task has a split by construction
    return (task.meta, task.split, MMEB_OVERALL)


def aggregate(scores: dict[str, float]) -> dict[str, float]:
    """The paper's aggregates over the tasks present in ``scores``.

    Args:
        scores: task name (case-insensitive, as accepted by `get_tasks`) -> a score in any unit (hit@1 as a
            fraction or ×100); the aggregates are in the same unit.

    Returns:
        For each aggregate with at least one task, in `AGGREGATE_KEYS` order: the unweighted mean over its
        tasks ("Classification", "VQA", "Retrieval", "Grounding", "IND", "OOD", "Overall", "SCaR Overall"),
        followed by ``"n_tasks/<aggregate>"``: the number of tasks behind it (compare with `aggregate_sizes`).

    Raises:
        ConfigError: an unknown task, or the same task given twice.
        ValueError: a score that is not finite.
    """
    buckets: dict[str, list[float]] = {}
    seen: set[TaskSpec] = set()
    for name, value in scores.items():
        task = find_task(name)
        if task is None:
            raise _unknown(name, [t.name for t in TASKS])
        if task in seen:
            raise ConfigError(f"task {task.name!r} is given twice in the scores (as {name!r})")
        if not math.isfinite(value):
            raise ValueError(f"score of task {task.name!r} is not finite: {value!r}")
        seen.add(task)
        for key in _aggregate_keys(task):
            buckets.setdefault(key, []).append(float(value))
    present = [k for k in AGGREGATE_KEYS if k in buckets]
    out: dict[str, float] = {k: math.fsum(buckets[k]) / len(buckets[k]) for k in present}
    out.update({N_TASKS_PREFIX + k: len(buckets[k]) for k in present})
    return out


def aggregate_sizes() -> dict[str, int]:
    """Number of tasks behind each aggregate in the paper's tables, e.g. {"Overall": 36, "IND": 20, ...}."""
    counts: dict[str, int] = {}
    for task in TASKS:
        for key in _aggregate_keys(task):
            counts[key] = counts.get(key, 0) + 1
    return {k: counts[k] for k in AGGREGATE_KEYS}
