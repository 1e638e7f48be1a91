"""`run_eval(model, EvalConfig) -> EvalReport`: load each task, embed what the cache lacks (batched by
modality, progress bar), score every query against its own candidates, rank with ties against the
positive, aggregate, and run the baselines through the same path."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from virtue.errors import ConfigError
from virtue.eval.embed_cache import EmbeddingCache, InputKeys, model_fingerprint
from virtue.eval.metrics import ranking_metrics, scores_to_ranks
from virtue.eval.tasks import TaskSpec, aggregate, get_tasks
from virtue.inputs import EmbedInput
from virtue.model.embedder import VirtueModel

logger = logging.getLogger(__name__)

MODEL_BASELINES = ("text_only", "no_box", "crop")  # the same model, the query stripped of parts
# SCaR query protocols (`eval.datasets` variants): the paper's box, or box + mask for models trained with masks.
SCAR_PROMPTS = ("box", "box_mask")
FREE_BASELINES = ("random", "consensus")  # no model at all


@dataclass(frozen=True)
class EvalConfig:
    """Attributes:
    benchmark: "scar" or "mmeb".
    data_root: folder with the evaluation parquet files; image_root: their images.
    tasks: task names (None: every task of the benchmark found under data_root).
    limit: first N queries per task (quick runs).
    image_resize: (W, H) pre-resize; None takes the model's `compat.eval_image_resize` (1344x1344 for the
        official checkpoints, as the official eval); [] or "native" keeps the native size.
    baselines: any of text_only, no_box, crop (model-based) and random, consensus (model-free).
    scar_variant: the SCaR query protocol: "box" (the paper's: box prompt and bbox in the text) or "box_mask"
        (the same plus the `segmentation` polygon as a mask prompt, for models trained with `masks: true`).
        Ignored for MMEB.
    """

    benchmark: str
    data_root: str
    image_root: str | None = None
    tasks: tuple[str, ...] | None = None
    limit: int | None = None
    batch_size: int = 16
    image_resize: tuple[int, int] | None | str = None
    baselines: tuple[str, ...] = ()
    scar_variant: str = "box"
    cache_dir: str | None = ".virtue-cache"
    out_dir: str = "outputs/eval"
    seed: int = 0
    show_progress_bar: bool = True

    def __post_init__(self):
        if self.benchmark not in ("scar", "mmeb"):
            raise ConfigError(f"benchmark: expected 'scar' or 'mmeb', got {self.benchmark!r}")
        unknown = sorted(set(self.baselines) - set(MODEL_BASELINES) - set(FREE_BASELINES))
        if unknown:
            raise ConfigError(f"baselines: unknown {unknown}; allowed: {list(MODEL_BASELINES + FREE_BASELINES)}")
        if self.scar_variant not in SCAR_PROMPTS:
            raise ConfigError(f"scar_variant: expected one of {list(SCAR_PROMPTS)}, got {self.scar_variant!r}")


@dataclass
class TaskRun:
    task: str
    metrics: dict[str, float]
    ranks: list[int] = field(default_factory=list)


def _resize(cfg: EvalConfig, model: VirtueModel) -> tuple[int, int] | None:
    if cfg.image_resize in ("native", []):
        return None
    if cfg.image_resize is None:
        return model.config.compat.eval_image_resize
    return tuple(cfg.image_resize)


class Embedder:
    """encode() through the on-disk cache: only inputs never seen by this model and settings are run."""

    def __init__(self, model: VirtueModel, cfg: EvalConfig):
        self.model, self.cfg = model, cfg
        self.resize = _resize(cfg, model)
        self.keys = InputKeys({"image_resize": self.resize})
        self.fingerprint = model_fingerprint(model, json.dumps(model.config.to_dict(), sort_keys=True))
        self.cache = EmbeddingCache(cfg.cache_dir, self.fingerprint) if cfg.cache_dir else None
        self.encoded = 0

    def embed(self, items: list[EmbedInput], desc: str) -> np.ndarray:
        keys = [self.keys.key(x) for x in items]
        unique = dict.fromkeys(keys)
        found = self.cache.get_many(list(unique)) if self.cache is not None else {}
        missing = [k for k in unique if k not in found]
        first = {k: items[i] for i, k in reversed(list(enumerate(keys)))}
        chunk = max(self.cfg.batch_size * 8, 64)  # commit often enough that an interruption loses little
        bar = tqdm(total=len(missing), desc=desc, unit="input", disable=not self.cfg.show_progress_bar or not missing)
        for start in range(0, len(missing), chunk):
            part = missing[start : start + chunk]
            vecs = self.model.encode([first[k] for k in part], batch_size=self.cfg.batch_size,
                                     image_resize=self.resize, show_progress_bar=False)
            new = dict(zip(part, vecs, strict=True))
            found.update(new)
            if self.cache is not None:
                self.cache.put_many(new)
            self.encoded += len(part)
            bar.update(len(part))
        bar.close()
        return np.stack([found[k] for k in keys])


def _load(task: TaskSpec, cfg: EvalConfig, variant: str):
    from virtue.eval import datasets

    root = Path(cfg.data_root)
    image_root = Path(cfg.image_root) if cfg.image_root else root
    if task.benchmark == "scar":
        files = datasets.find_scar_files(root)
        if task.file_stem not in files:
            raise ConfigError(f"{root}: no file for task {task.name} (expected {task.file_stem}.parquet)")
        return datasets.load_scar_eval(files[task.file_stem], image_root, task=task.name, variant=variant,
                                       limit=cfg.limit)
    path = root / f"{task.file_stem}.parquet"
    if not path.is_file():
        raise ConfigError(f"{root}: no file for task {task.name} (expected {path.name})")
    return datasets.load_mmeb_eval(path, image_root, task=task.name, family=task.meta, limit=cfg.limit)


def score_queries(embedder: Embedder, queries, desc: str) -> np.ndarray:
    """Ranks of the positives: every query against its own candidates only."""
    q = embedder.embed([x.query for x in queries], f"{desc} queries")
    flat = [c for x in queries for c in x.candidates]
    c = embedder.embed(flat, f"{desc} candidates")
    scores, start = [], 0
    for row, x in zip(q, queries, strict=True):
        scores.append(c[start : start + len(x.candidates)] @ row)
        start += len(x.candidates)
    return _ranks(scores, [x.positive for x in queries])


def _ranks(scores: list[np.ndarray], positives: list[int]) -> np.ndarray:
    width = max(len(s) for s in scores)
    if all(len(s) == width for s in scores):
        return scores_to_ranks(np.stack(scores), positives)
    from virtue.eval.metrics import rank_of_positive

    return np.array([rank_of_positive(s, p) for s, p in zip(scores, positives, strict=True)])


def _free_baseline(name: str, queries, seed: int) -> np.ndarray:
    from virtue.eval import baselines

    scores = baselines.random_scores(queries, seed) if name == "random" else baselines.consensus_scores(queries)
    return _ranks(list(scores), [x.positive for x in queries])


def available_tasks(cfg: EvalConfig) -> list[TaskSpec]:
    tasks = get_tasks(list(cfg.tasks) if cfg.tasks else None, benchmark=cfg.benchmark)
    if cfg.tasks or cfg.benchmark != "scar":
        return tasks
    from virtue.eval.datasets import find_scar_files

    present = find_scar_files(Path(cfg.data_root))
    found = [t for t in tasks if t.file_stem in present]
    if not found:
        raise ConfigError(f"{cfg.data_root}: no SCaR-Eval parquet files (SCaR_eval_<subset>.parquet) found")
    return found


def run_eval(model: VirtueModel, cfg: EvalConfig, model_name: str = "model", paper_model: str | None = None):
    """Evaluate, write results.json / results.md / results.png under cfg.out_dir, return the report.

    paper_model: the paper row to compare with (e.g. "Sony/VIRTUE-2B-SCaR" or "VIRTUE-2B"); default: the
    row of `model_name` when it names a released checkpoint.
    """
    from virtue.eval.report import EvalReport, write_report

    start = time.perf_counter()
    embedder = Embedder(model, cfg)
    per_task: dict[str, dict[str, float]] = {}
    base: dict[str, dict[str, dict[str, float]]] = {}
    for task in available_tasks(cfg):
        queries = _load(task, cfg, cfg.scar_variant)
        per_task[task.name] = ranking_metrics(score_queries(embedder, queries, task.name))
        for name in cfg.baselines:
            if name in FREE_BASELINES:
                ranks = _free_baseline(name, queries, cfg.seed)
            else:
                if task.benchmark != "scar":
                    continue  # region baselines only make sense where there is a region
                ranks = score_queries(embedder, _load(task, cfg, name), f"{task.name}/{name}")
            base.setdefault(name, {})[task.name] = ranking_metrics(ranks)
    hit1 = {t: m["hit@1"] for t, m in per_task.items()}
    report = EvalReport(
        model=model_name,
        fingerprint=embedder.fingerprint,
        settings={"benchmark": cfg.benchmark, "limit": cfg.limit, "image_resize": embedder.resize,
                  "compat": model.config.compat.__dict__, "data_root": cfg.data_root,
                  **({"scar_variant": cfg.scar_variant} if cfg.benchmark == "scar" else {})},
        tasks=per_task,
        aggregates=aggregate(hit1),
        baselines=base,
        timings={"total_s": round(time.perf_counter() - start, 2), "encoded_inputs": embedder.encoded},
    )
    if embedder.cache is not None:
        embedder.cache.close()
    write_report(report, Path(cfg.out_dir), paper_model=paper_model or _released_row(model_name))
    return report


def _released_row(model_name: str) -> str | None:
    """A released checkpoint's id (or its paper model name) selects its paper row; anything else none."""
    from virtue.eval.report import paper_results

    results = paper_results()
    known = set(results["released_checkpoints"]) | set(results["models"])
    return model_name if model_name in known else None
