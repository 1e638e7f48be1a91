"""`run_eval(model, EvalConfig) -> EvalReport`: load each task, embed its unique inputs (through the cache, batched
by modality, split over the processes under torchrun), score every query against its own candidates, aggregate,
and run the baselines through the same path.

Memory grows with a task's unique inputs, not with its (query, candidate) pairs: a loaded task holds each
distinct input once (`eval.table`), only those are embedded into one [U, D] matrix, and queries are scored one at
a time from it.

Scoring rules (virtue-spec §8.1, §5.4):

* **Ties count against the positive**: rank = 1 + the number of other candidates scoring >= it (`eval.metrics`).
  The official scorer sorts stably with the positive first, so a constant model scores 100 % there, 0 here.
* **Candidates named like the positive count as the positive**, as in the official scorer, which ranks candidate
  names (the text for CLS / QA / i2t, the image path for t2i, `path:caption` for i2i / VG, the caption for SCaR)
  and counts a hit when the top name is the positive's. A duplicate of the positive is therefore a hit, not a
  tie lost; a candidate with another name and the same score still counts against the positive.

Several processes: under `torchrun` (or any initialised process group), each rank embeds a contiguous share of
every task's unique inputs; rank 0 gathers them, is the only writer of the embedding cache (the others read it),
scores, and writes results.json / .md / .png, which equal one process's except the timings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from virtue.errors import ConfigError
from virtue.eval.distributed import Ranks
from virtue.eval.embed_cache import EmbeddingCache, InputKeys
from virtue.eval.metrics import rank_by_name, ranking_metrics
from virtue.eval.table import EvalTask
from virtue.eval.tasks import TaskSpec, aggregate, get_tasks
from virtue.hashing import model_fingerprint
from virtue.inputs import EmbedInput
from virtue.model.embedder import VirtueModel

logger = logging.getLogger(__name__)

MODEL_BASELINES = ("text_only", "no_box", "crop")  # the same model, the query stripped of parts
# SCaR query protocols (`eval.datasets` variants): the paper's box, or box + mask for models trained with masks.
SCAR_PROMPTS = ("box", "box_mask")
FREE_BASELINES = ("random", "consensus")  # no model at all
# A model without a SAM branch cannot read a visual prompt: the SCaR box then reaches it through the text only.
SAMLESS_VARIANT = "box_text"
SAMLESS_NOTE = "none: the model has no SAM branch, so the SCaR box is in the query text only"


@dataclass(frozen=True)
class EvalConfig:
    """Attributes:
    benchmark: "scar" or "mmeb".
    data_root: folder with the evaluation parquet files (MMEB: one per task, or the hub snapshot layout, see
        `virtue.data.layouts`).
    image_root: the images' folder (default: SCaR, the data root; MMEB, `<data_root>/eval_images` when present).
    tasks: task names (None: every task of the benchmark found under data_root).
    limit: first N queries per task (quick runs).
    image_resize: (W, H) pre-resize; None takes the model's `compat.eval_image_resize` (1344x1344 for the
        official checkpoints, as the official eval); [] or "native" keeps the native size.
    baselines: any of text_only, no_box, crop (model-based) and random, consensus (model-free).
    scar_variant: the SCaR query protocol: "box" (the paper's: box prompt and bbox in the text) or "box_mask"
        (the same plus the `segmentation` polygon as a mask prompt, for models trained with `masks: true`).
        Ignored for MMEB. A model without a SAM branch gets the box in the text only (`SAMLESS_NOTE`).
    strict_boxes: a SCaR box crossing its image's border is a `DataError` (default: scored as given, as the
        official code does, and listed in the report's `boxes_outside_image`).
    distributed: None (default) splits the work over the ranks when a process group is initialised or torchrun's
        WORLD_SIZE > 1 (every rank must call `run_eval`); False evaluates in this process alone, e.g. when one rank
        of a training job validates while the others wait; True requires several processes.
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
    strict_boxes: bool = False
    distributed: bool | None = None
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


def _resize(cfg: EvalConfig, model: VirtueModel) -> tuple[int, int] | None:
    if cfg.image_resize in ("native", []):
        return None
    if cfg.image_resize is None:
        return model.config.compat.eval_image_resize
    return tuple(cfg.image_resize)


class Embedder:
    """Embeds a task's unique inputs through the on-disk cache: only inputs never seen by this model and settings
    are run, each rank its share (`Ranks.share`)."""

    def __init__(self, model: VirtueModel, cfg: EvalConfig, ranks: Ranks | None = None):
        self.model, self.cfg = model, cfg
        self.ranks = ranks or Ranks()
        self.resize = _resize(cfg, model)
        self.keys = InputKeys({"image_resize": self.resize})
        self.fingerprint = model_fingerprint(model)
        self.cache: EmbeddingCache | None = None
        if cfg.cache_dir:
            # Rank 0 creates the file and is its only writer; the others open it for lookups once it exists.
            if self.ranks.is_main:
                self.cache = EmbeddingCache(cfg.cache_dir, self.fingerprint)
            self.ranks.barrier()
            if not self.ranks.is_main:
                self.cache = EmbeddingCache(cfg.cache_dir, self.fingerprint, readonly=True)
        self.encoded = 0  # inputs this rank ran through the model

    def embed(self, items: list[EmbedInput], desc: str) -> np.ndarray | None:
        """[len(items), D] float32 on rank 0 (None on the other ranks); each rank embeds `share(len(items))`."""
        share = self.ranks.share(len(items))
        vectors = self._embed_share([items[i] for i in share], desc)
        return self.ranks.gather_rows(vectors, len(items))

    def _embed_share(self, items: list[EmbedInput], desc: str) -> np.ndarray:
        out = np.empty((len(items), self.model.config.hidden_size), dtype=np.float32)
        rows: dict[str, list[int]] = {}  # cache key -> rows of `items` (content-equal inputs share one vector)
        for i, item in enumerate(items):
            rows.setdefault(self.keys.key(item), []).append(i)
        missing = self._fill_cached(list(rows), rows, out)
        chunk = max(self.cfg.batch_size * 8, 64)  # commit often enough that an interruption loses little
        rounds = self.ranks.max(-(-len(missing) // chunk))  # every rank takes part in every round's gather
        show = self.cfg.show_progress_bar and self.ranks.is_main and rounds > 0
        with tqdm(total=len(missing), desc=desc, unit="input", disable=not show) as bar:
            for start in range(0, rounds * chunk, chunk):
                part = missing[start : start + chunk]
                vecs = self._encode([items[rows[k][0]] for k in part])
                for key, vec in zip(part, vecs, strict=True):
                    out[rows[key]] = vec
                self._store(dict(zip(part, vecs, strict=True)))
                self.encoded += len(part)
                bar.update(len(part))
        return out

    def _fill_cached(self, keys: list[str], rows: dict[str, list[int]], out: np.ndarray) -> list[str]:
        """Copy cached vectors into `out` (a few hundred at a time, so that they are not all held twice);
        return the keys the cache lacks."""
        if self.cache is None:
            return keys
        missing = []
        for start in range(0, len(keys), 512):
            part = keys[start : start + 512]
            found = self.cache.get_many(part)
            for key in part:
                if key in found:
                    out[rows[key]] = found[key]
                else:
                    missing.append(key)
        return missing

    def _encode(self, items: list[EmbedInput]) -> np.ndarray:
        if not items:
            return np.empty((0, self.model.config.hidden_size), dtype=np.float32)
        return self.model.encode(items, batch_size=self.cfg.batch_size, image_resize=self.resize,
                                 show_progress_bar=False)

    def _store(self, new: dict[str, np.ndarray]) -> None:
        """Rank 0 writes every rank's new vectors (one SQLite writer); each round is committed, so an interrupted
        run resumes from the last round of every rank."""
        if self.cache is None:
            return
        batches = self.ranks.gather_objects(new)
        if batches is not None:
            merged = {k: v for batch in batches for k, v in batch.items()}
            if merged:
                self.cache.put_many(merged)

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()


def task_files(task: TaskSpec, cfg: EvalConfig) -> tuple[list[Path], Path]:
    """The parquet file(s) of `task` under `cfg.data_root` and the image root its rows are relative to
    (`cfg.image_root`, else SCaR: the data root; MMEB: `mmeb_image_root`).

    Raises:
        ConfigError: the task has no file there (or, MMEB, its images are still zipped).
    """
    root = Path(cfg.data_root)
    if task.benchmark == "scar":
        from virtue.data.layouts import find_scar_files

        scar_files = find_scar_files(root)
        if task.file_stem not in scar_files:
            raise ConfigError(f"{root}: no file for task {task.name} (expected {task.file_stem}.parquet)")
        return [scar_files[task.file_stem]], Path(cfg.image_root) if cfg.image_root else root
    from virtue.data.layouts import mmeb_image_root, mmeb_task_files

    files = mmeb_task_files(root, task.file_stem)
    if not files:
        raise ConfigError(f"{root}: no file for task {task.name} (expected {task.file_stem}.parquet or "
                          f"{task.file_stem}/test-*.parquet)")
    return files, Path(cfg.image_root) if cfg.image_root else mmeb_image_root(root)


def _load(task: TaskSpec, cfg: EvalConfig, variant: str) -> EvalTask:
    from virtue.eval import datasets

    files, image_root = task_files(task, cfg)
    if task.benchmark == "scar":
        return datasets.load_scar_eval(files[0], image_root, task=task.name, variant=variant, limit=cfg.limit,
                                       strict_boxes=cfg.strict_boxes)
    return datasets.load_mmeb_eval(files, image_root, task=task.name, family=task.meta, limit=cfg.limit,
                                   root=Path(cfg.data_root))


def score_task(task: EvalTask, vectors: np.ndarray) -> np.ndarray:
    """Ranks of the positives, one query at a time from the task's [U, D] vectors (module docstring's rules)."""
    names = task.table.name_ids
    ranks = np.empty(len(task), dtype=np.int64)
    for n, query in enumerate(task):
        ids = query.candidate_ids
        ranks[n] = rank_by_name(_scores(vectors, query.query_id, ids), query.positive, names[ids])
    return ranks


def _scores(vectors: np.ndarray, query: int, ids: np.ndarray) -> np.ndarray:
    # A candidate listed twice is scored once, so that its copies tie exactly (BLAS need not give two equal rows
    # bit-equal dot products).
    unique, inverse = np.unique(ids, return_inverse=True)
    if len(unique) == len(ids):
        return vectors[ids] @ vectors[query]
    return (vectors[unique] @ vectors[query])[inverse]


def _free_baseline(name: str, task: EvalTask, seed: int) -> np.ndarray:
    from virtue.eval import baselines

    scores = baselines.random_scores(task, seed) if name == "random" else baselines.consensus_scores(task)
    names = task.table.name_ids
    return np.array([rank_by_name(s, q.positive, names[q.candidate_ids]) for s, q in zip(scores, task, strict=True)])


def available_tasks(cfg: EvalConfig) -> list[TaskSpec]:
    """The tasks asked for, or (none asked) every task of the benchmark whose files are under data_root."""
    tasks = get_tasks(list(cfg.tasks) if cfg.tasks else None, benchmark=cfg.benchmark)
    if cfg.tasks:
        return tasks
    root = Path(cfg.data_root)
    if cfg.benchmark == "scar":
        from virtue.data.layouts import find_scar_files

        present = set(find_scar_files(root))
        found = [t for t in tasks if t.file_stem in present]
        if not found:
            raise ConfigError(f"{root}: no SCaR-Eval parquet files (SCaR_eval_<subset>.parquet) found")
        return found
    from virtue.data.layouts import mmeb_task_files

    if not root.is_dir():
        raise ConfigError(f"MMEB root: folder not found: {root}")
    found = [t for t in tasks if mmeb_task_files(root, t.file_stem)]
    if not found:
        raise ConfigError(f"{root}: no MMEB-eval task found (<Task>.parquet, or <Task>/test-*.parquet as the hub "
                          "snapshot holds them)")
    if len(found) < len(tasks):
        logger.warning("%s: %d of %d MMEB tasks found; missing: %s", root, len(found), len(tasks),
                       ", ".join(t.name for t in tasks if t not in found))
    return found


def run_eval(model: VirtueModel, cfg: EvalConfig, model_name: str = "model", paper_model: str | None = None):
    """Evaluate, write results.json / results.md / results.png under cfg.out_dir, return the report.

    Under torchrun (WORLD_SIZE > 1, or an initialised process group; see `EvalConfig.distributed`) every rank calls
    this with its own model copy; the inputs are split over the ranks and rank 0 writes the files. Every rank
    returns the report.

    paper_model: the paper row to compare with (e.g. "Sony/VIRTUE-2B-SCaR" or "VIRTUE-2B"); default: the
    row of `model_name` when it names a released checkpoint.
    """
    start = time.perf_counter()
    ranks = Ranks.setup(model.device, cfg.distributed)
    embedder = None
    try:
        embedder = Embedder(model, cfg, ranks)
        report = _run(model, cfg, embedder, ranks, model_name, start)
        if ranks.is_main:
            from virtue.eval.report import write_report

            write_report(report, Path(cfg.out_dir), paper_model=paper_model or _released_row(model_name))
        ranks.barrier()  # the files exist on every rank's return
        return ranks.broadcast(report)
    finally:
        if embedder is not None:
            embedder.close()
        ranks.close()


def _run(model: VirtueModel, cfg: EvalConfig, embedder: Embedder, ranks: Ranks, model_name: str, start: float):
    from virtue.eval.report import EvalReport

    samless = model.sam is None
    variant = SAMLESS_VARIANT if samless else cfg.scar_variant
    per_task: dict[str, dict[str, float]] = {}
    base: dict[str, dict[str, dict[str, float]]] = {}
    outside: dict[str, dict] = {}
    for spec in available_tasks(cfg):
        task = _load(spec, cfg, variant)
        if spec.benchmark == "scar":
            outside[spec.name] = {"count": len(task.boxes_outside_image), "rows": list(task.boxes_outside_image)}
        per_task[spec.name] = _evaluate(task, embedder, spec.name)
        for name in cfg.baselines:
            if name in FREE_BASELINES:
                metrics = ranking_metrics(_free_baseline(name, task, cfg.seed)) if ranks.is_main else {}
            elif spec.benchmark == "scar":  # region baselines only make sense where there is a region
                metrics = _evaluate(_load(spec, cfg, name), embedder, f"{spec.name}/{name}")
            else:
                continue
            base.setdefault(name, {})[spec.name] = metrics
    encoded = ranks.counts(embedder.encoded)
    settings = {"benchmark": cfg.benchmark, "limit": cfg.limit, "image_resize": embedder.resize,
                "compat": model.config.compat.__dict__, "data_root": cfg.data_root}
    if getattr(model, "sam_source", None) is not None:
        settings["sam2_source"] = model.sam_source  # which SAM2 files, for the record (not the fingerprint)
    if cfg.benchmark == "scar":
        settings.update(scar_variant=cfg.scar_variant, strict_boxes=cfg.strict_boxes)
        if samless:
            settings["visual_prompt"] = SAMLESS_NOTE
    timings: dict[str, float] = {"total_s": round(time.perf_counter() - start, 2), "encoded_inputs": sum(encoded)}
    if ranks.world > 1:
        timings["processes"] = ranks.world
        timings.update({f"encoded_inputs_rank{r}": n for r, n in enumerate(encoded)})
    if not ranks.is_main:
        return None
    return EvalReport(
        model=model_name,
        fingerprint=embedder.fingerprint,
        settings=settings,
        tasks=per_task,
        aggregates=aggregate({t: m["hit@1"] for t, m in per_task.items()}),
        baselines=base,
        timings=timings,
        boxes_outside_image=outside,
    )


def _evaluate(task: EvalTask, embedder: Embedder, desc: str) -> dict[str, float]:
    """The task's metrics on rank 0 ({} on the other ranks, which only embed their share)."""
    vectors = embedder.embed(task.table.inputs, desc)
    if vectors is None:
        return {}
    return ranking_metrics(score_task(task, vectors))


def _released_row(model_name: str) -> str | None:
    """A released checkpoint's id (or its paper model name) selects its paper row; anything else none."""
    from virtue.eval.report import paper_results

    results = paper_results()
    known = set(results["released_checkpoints"]) | set(results["models"])
    return model_name if model_name in known else None
