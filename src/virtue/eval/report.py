"""Evaluation reports: every number as JSON, a Markdown table beside the paper's numbers, and a bar chart.

Units: an `EvalReport` holds metrics as fractions in [0, 1] (as `metrics.ranking_metrics` returns them); the paper's
numbers (`paper_results.json`) are ×100, as printed. Markdown and the chart show both ×100, to one decimal.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

from virtue.errors import ConfigError, DataError
from virtue.eval.tasks import N_TASKS_PREFIX, aggregate, aggregate_sizes, find_task

PRIMARY_METRIC = "hit@1"  # = Precision@1 with one positive: the paper's reported number
PAPER_RESULTS_FILE = "paper_results.json"
DEFAULT_PAPER_SETTING = "base"
_MISSING = "–"
SHOWN_ROWS = 10  # row ids listed in results.md per subset (results.json lists them all)
# Metrics that are fractions in [0, 1]; "n" (a count) and unknown extra metrics are not range-checked.
_FRACTION_METRIC = re.compile(r"^(?:(?:hit|recall|ndcg|precision)@\d+|mrr)$")


@dataclass
class EvalReport:
    """The outcome of one evaluation run.

    Attributes:
        model: model name or path, e.g. "Sony/VIRTUE-2B-SCaR".
        fingerprint: the model fingerprint that keys the embedding cache (None if unknown).
        settings: the eval settings (JSON-serialisable): compat flags, batch size, query limit, ...
        tasks: task name -> `ranking_metrics` dict (fractions in [0, 1], plus "n" queries).
        aggregates: `tasks.aggregate` of the per-task hit@1 (fractions, plus "n_tasks/<aggregate>").
        baselines: baseline name -> task name -> metrics dict (same units as ``tasks``).
        timings: name -> number; the name carries the unit, e.g. {"embed_s": 12.5, "encoded_inputs": 900}. The
            only part that differs between a one-process and a multi-process run.
        boxes_outside_image: SCaR task -> {"count": n, "rows": [row ids]}: rows whose box crosses the image
            border, scored with the box as given (as the official code scores them); every SCaR task is listed.

    Raises:
        ValueError: a hit@k / recall@k / nDCG@k / precision@k / MRR or an aggregate outside [0, 1] (percentages
            passed by mistake would print as 5600.0) or NaN.
    """

    model: str
    fingerprint: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    tasks: dict[str, dict[str, float]] = field(default_factory=dict)
    aggregates: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    boxes_outside_image: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks = [(f"tasks[{t!r}]", m) for t, m in self.tasks.items()]
        checks += [(f"baselines[{b!r}][{t!r}]", m) for b, per in self.baselines.items() for t, m in per.items()]
        for where, metrics in checks:
            for key, value in metrics.items():
                if _FRACTION_METRIC.match(key):
                    _check_fraction(f"{where}[{key!r}]", value)
        for key, value in self.aggregates.items():
            if not key.startswith(N_TASKS_PREFIX):
                _check_fraction(f"aggregates[{key!r}]", value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EvalReport:
        """Inverse of `to_dict`; extra keys (such as the "paper" block of results.json) are ignored.

        Raises:
            DataError: "model" is missing.
        """
        if "model" not in data:
            raise DataError(f"eval report: missing key 'model'; found {sorted(data)}")
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})


def _check_fraction(where: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{where} = {value!r}: expected a fraction in [0, 1] (metrics are not stored x100)")


def paper_results() -> dict[str, Any]:
    """The paper's tables as shipped in `virtue/eval/paper_results.json` (schema in that file's header keys)."""
    text = resources.files("virtue.eval").joinpath(PAPER_RESULTS_FILE).read_text(encoding="utf-8")
    return json.loads(text)


def _find_entry(results: dict[str, Any], model: str, benchmark: str, setting: str) -> dict[str, Any] | None:
    models = {name.lower(): rows for name, rows in results["models"].items()}
    return models.get(model.lower(), {}).get(benchmark.lower(), {}).get(setting)


def paper_entry(model: str, benchmark: str, setting: str = DEFAULT_PAPER_SETTING) -> dict[str, Any]:
    """One row of the paper: {"scores": {key: value ×100}, "source": str, optional "note", ...}.

    Args:
        model: the row's model name as printed, case-insensitive ("VIRTUE-2B", "UniME-7B", "CLIP").
        benchmark: "mmeb" or "scar".
        setting: "base", "+MMEB-train", "+Crop" or "+SCaR-train".

    Raises:
        ConfigError: no such row; the message lists the rows that exist for the model.
    """
    results = paper_results()
    entry = _find_entry(results, model, benchmark, setting)
    if entry is None:
        rows = {m: {b: sorted(s) for b, s in bs.items()} for m, bs in results["models"].items()}
        same = [r for m, r in rows.items() if m.lower() == model.lower()]
        have = f"rows of {model}: {same[0]}" if same else f"models: {sorted(rows)}"
        raise ConfigError(f"no paper row for model={model!r} benchmark={benchmark!r} setting={setting!r}; {have}")
    return entry


def paper_row(model: str, benchmark: str, setting: str = DEFAULT_PAPER_SETTING) -> dict[str, float]:
    """The paper's numbers (×100) for one row: SCaR subsets + "SCaR Overall", or the MMEB aggregates.

    Keys match `tasks.aggregate` and the task names, so they line up with an `EvalReport`. Raises like `paper_entry`.
    """
    return dict(paper_entry(model, benchmark, setting)["scores"])


@dataclass(frozen=True)
class PaperColumn:
    """The paper's numbers (×100) to print beside ours, merged over the benchmarks the report covers."""

    model: str
    setting: str
    scores: dict[str, float]
    sources: tuple[str, ...]
    notes: tuple[str, ...]


def _paper_column(report: EvalReport, model: str | None, setting: str | None) -> PaperColumn | None:
    if model is None:
        if setting is not None:
            raise ConfigError(f"paper_setting={setting!r} was given without paper_model")
        return None
    results = paper_results()
    # A released checkpoint id ("Sony/VIRTUE-2B-SCaR") names its paper row.
    released = results["released_checkpoints"].get(model)
    if released is not None:
        model, setting = released["model"], setting or released["setting"]
    setting = setting or DEFAULT_PAPER_SETTING
    benchmarks = sorted({t.benchmark for name in report.tasks if (t := find_task(name))}) or ["mmeb", "scar"]
    entries = [e for b in benchmarks if (e := _find_entry(results, model, b, setting)) is not None]
    if not entries:
        paper_entry(model, benchmarks[0], setting)  # raises the ConfigError that lists the existing rows
    scores = {k: v for e in entries for k, v in e["scores"].items()}
    notes = tuple(e["note"] for e in entries if "note" in e)
    return PaperColumn(model, setting, scores, tuple(e["source"] for e in entries), notes)


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return _MISSING
    value = round(value, 1) + 0.0  # + 0.0 turns -0.0 into 0.0, so a zero difference never prints as "-0.0"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def _primary(metrics: dict[str, float] | None) -> float | None:
    """hit@1 ×100, or None when the task was not run."""
    return None if metrics is None or PRIMARY_METRIC not in metrics else 100.0 * metrics[PRIMARY_METRIC]


def _aggregate_label(key: str, aggregates: dict[str, float]) -> str:
    n, full = int(aggregates.get(N_TASKS_PREFIX + key, 0)), aggregate_sizes().get(key)
    return f"**{key}** ({n} of {full} tasks)" if full else f"**{key}**"


def _rows(report: EvalReport, paper: PaperColumn | None) -> list[tuple[str, float | None, float | None]]:
    """(label, ours ×100, paper ×100) for every task, then every aggregate."""
    scores = paper.scores if paper else {}
    rows = [(name, _primary(m), scores.get(name)) for name, m in report.tasks.items()]
    for key, value in report.aggregates.items():
        if not key.startswith(N_TASKS_PREFIX):
            rows.append((_aggregate_label(key, report.aggregates), 100.0 * value, scores.get(key)))
    return rows


def _main_table(report: EvalReport, paper: PaperColumn | None) -> list[str]:
    head = f"paper ({paper.model}, {paper.setting})" if paper else "paper"
    lines = [f"| task | ours {PRIMARY_METRIC} (%) | {head} | Δ | queries |", "|---|---:|---:|---:|---:|"]
    for label, ours, theirs in _rows(report, paper):
        delta = None if ours is None or theirs is None else ours - theirs
        n = report.tasks.get(label, {}).get("n")
        lines.append(f"| {label} | {_fmt(ours)} | {_fmt(theirs)} | {_fmt(delta, signed=True)} | {n or ''} |")
    return lines


def _baseline_aggregates(per_task: dict[str, dict[str, float]]) -> dict[str, float]:
    # Tasks outside the table (custom sets) have no aggregate; skip them rather than fail the whole report.
    known = {t: m[PRIMARY_METRIC] for t, m in per_task.items() if find_task(t) and PRIMARY_METRIC in m}
    return aggregate(known) if known else {}


def _baselines_table(report: EvalReport) -> list[str]:
    names = list(report.baselines)
    columns = [report.tasks, *(report.baselines[b] for b in names)]
    aggs = [report.aggregates, *(_baseline_aggregates(report.baselines[b]) for b in names)]
    lines = ["| task | ours | " + " | ".join(names) + " |", "|---|" + "---:|" * (len(names) + 1)]
    tasks = list(dict.fromkeys(t for col in columns for t in col))
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(_fmt(_primary(col.get(task))) for col in columns) + " |")
    for key in dict.fromkeys(k for a in aggs for k in a if not k.startswith(N_TASKS_PREFIX)):
        cells = " | ".join(_fmt(100.0 * a[key] if key in a else None) for a in aggs)
        lines.append(f"| **{key}** | {cells} |")
    return lines


def render_markdown(report: EvalReport, paper: PaperColumn | None = None) -> str:
    """results.md: our hit@1 beside the paper, aggregates last, then baselines, timings and the paper's source."""
    lines = [f"# Evaluation of `{report.model}`", "", f"- fingerprint: `{report.fingerprint or 'unknown'}`"]
    lines += [f"- {k}: `{v}`" for k, v in report.settings.items()]
    lines += ["", f"Metric: {PRIMARY_METRIC} ×100; ties between the positive and another candidate count against"]
    lines += ["the positive (the official scorer counts them for it); candidates named like the positive count as it,"]
    lines += ["as in the official scorer.", "", *_main_table(report, paper)]
    if report.baselines:
        lines += ["", f"## Baselines ({PRIMARY_METRIC} ×100)", "", *_baselines_table(report)]
    outside = {t: v for t, v in report.boxes_outside_image.items() if v.get("count")}
    if outside:
        lines += ["", "Boxes crossing the image border, scored as given (as the official code scores them):"]
        lines += [f"- {t}: {v['count']} row(s): {', '.join(v['rows'][:SHOWN_ROWS])}"
                  + (" ..." if v["count"] > SHOWN_ROWS else "") for t, v in outside.items()]
    if report.timings:
        lines += ["", "Timings: " + ", ".join(f"{k}={round(v, 2):g}" for k, v in report.timings.items())]
    if paper:
        lines += ["", *(f"Paper source: {s}." for s in paper.sources), *(f"Note: {n}" for n in paper.notes)]
    return "\n".join(lines) + "\n"


def plot_report(report: EvalReport, paper: PaperColumn | None, path: Path) -> Path:
    """Grouped bars, ours vs the paper (hit@1 ×100), per task then per aggregate; written as PNG to ``path``.

    Raises:
        ImportError: matplotlib is not installed (an optional dependency).
    """
    try:  # optional dependency: imported here so that `import virtue` never needs it
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError("the results chart needs matplotlib: pip install matplotlib") from exc
    rows = _rows(report, paper)
    labels = [label.replace("**", "") for label, _, _ in rows]
    ours = [math.nan if v is None else v for _, v, _ in rows]
    theirs = [math.nan if v is None else v for _, _, v in rows]
    # An explicit Agg canvas on a bare Figure: no pyplot, so no global backend or figure state is touched.
    fig = Figure(figsize=(max(6.0, 0.6 * len(rows) + 2.0), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x, width = list(range(len(rows))), 0.4
    ax.bar([i - width / 2 for i in x], ours, width, label=f"ours ({report.model})")
    if paper:
        ax.bar([i + width / 2 for i in x], theirs, width, label=f"paper ({paper.model}, {paper.setting})")
    ax.set_xticks(x, labels, rotation=45, ha="right")
    ax.set_ylabel(f"{PRIMARY_METRIC} (%)")
    ax.set_title(f"{report.model}: {PRIMARY_METRIC} x100 per task, then aggregates")
    ax.set_ylim(0, 100)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    return path


def write_report(
    report: EvalReport, out_dir: str | Path, paper_model: str | None = None, paper_setting: str | None = None
) -> dict[str, Path]:
    """Write results.json (every number), results.md and results.png into ``out_dir``.

    Args:
        paper_model: the paper row to compare with ("VIRTUE-2B"), or a released checkpoint id
            ("Sony/VIRTUE-2B-SCaR") that names its row; None for no comparison.
        paper_setting: "base", "+Crop", "+SCaR-train", ...; default: the checkpoint's setting, else "base".

    Returns:
        {"json": path, "md": path, "png": path}.

    Raises:
        ConfigError: no such paper row, or ``paper_setting`` without ``paper_model``.
        ImportError: matplotlib is missing; results.json and results.md are written before this is raised.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paper = _paper_column(report, paper_model, paper_setting)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    payload = {**report.to_dict(), "paper": asdict(paper) if paper else None}
    # allow_nan=False: a NaN must fail here rather than reach a results file as invalid JSON; default=str writes
    # settings such as paths as text.
    text = json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False, default=str)
    paths["json"].write_text(text + "\n", encoding="utf-8")
    paths["md"].write_text(render_markdown(report, paper), encoding="utf-8")
    plot_report(report, paper, paths["png"])
    return paths
