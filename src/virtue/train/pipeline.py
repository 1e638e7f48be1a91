"""The input pipeline: global batches planned in the training process, read and preprocessed by DataLoader
workers ahead of the model, so the training process only runs the model.

    StepPlan (main process)      SubsetBatchSampler -> this process's share of step k's global batch: a key
    PreparedBatches (workers)    key -> images decoded, resized, normalised (`VirtueProcessor.preprocess`),
                                 deferred image checks run; a bad row is replaced by the next good row of its
                                 subset (deterministic, so a resumed run sees the same batches)
    DataLoader                   `num_workers` processes, `prefetch` batches each, pinned memory on CUDA

GradCache embeds every chunk twice; the images of a step are decoded once, here.

The plan runs ahead of training by up to `num_workers * prefetch` batches, so the data position saved in a
checkpoint is the one recorded after the last step taken, not the sampler's current one.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from virtue.data.rows import BadRow, ImageHeaders
from virtue.errors import DataError, InputError
from virtue.processing.batch import VirtueProcessor
from virtue.train.examples import TrainExample
from virtue.train.gradcache import ContrastiveBatch
from virtue.train.sampler import SubsetBatchSampler, shard

logger = logging.getLogger(__name__)

AUTO_EAGER_LIMIT = 20_000  # image_checks: auto checks every image up front up to this many rows
LAZY_SAMPLE = 32  # image_checks: lazy checks the first rows of each subset at start (a wrong image_root fails fast)
MAX_REPLACEMENTS = 1000

Subsets = dict[str, tuple[list[TrainExample], float]]


# ---------------------------------------------------------------------------------------------------------------
# Planning


class StepPlan:
    """Keys of the batches this process takes, step after step, and the data position after each step."""

    def __init__(self, sampler: SubsetBatchSampler, rank: int, world: int, first_step: int, last_step: int):
        self.sampler, self.rank, self.world = sampler, rank, world
        self.first_step, self.last_step = first_step, last_step
        self._states: dict[int, dict] = {first_step: sampler.state_dict()}
        self.taken = first_step

    def __iter__(self) -> Iterator[tuple[int, str, tuple[int, ...]]]:
        for step in range(self.first_step + 1, self.last_step + 1):
            global_batch = next(self.sampler)
            self._states[step] = self.sampler.state_dict()
            local = shard(global_batch, self.rank, self.world)
            yield step, global_batch[0][0], tuple(i for _, i in local)

    def __len__(self) -> int:
        return self.last_step - self.first_step

    def step_taken(self, step: int) -> None:
        self.taken = step
        for old in [s for s in self._states if s < step]:
            del self._states[old]

    # The checkpoint's view: the position after the last step taken.
    def state_dict(self) -> dict:
        return self._states[self.taken]


# ---------------------------------------------------------------------------------------------------------------
# Preparing


@dataclass
class PreparedStep:
    step: int
    subset: str
    batch: ContrastiveBatch
    replaced: list[BadRow] = field(default_factory=list)

    def pin_memory(self) -> PreparedStep:
        """Called by the DataLoader's pinning thread on CUDA: page-locked image tensors copy asynchronously."""
        for side in (self.batch.queries, self.batch.targets, *self.batch.negatives):
            for item in side:
                loaded = getattr(item, "image", None)
                if getattr(loaded, "prepared", None) is not None:
                    loaded.prepared = loaded.prepared.pin_memory()
        return self


class PreparedBatches(Dataset):
    """key (step, subset, example indices) -> PreparedStep. Runs in DataLoader workers."""

    def __init__(self, subsets: Subsets, processor: VirtueProcessor | None, *, hard_negatives: bool,
                 on_bad_row: str, known_bad: dict[str, set[int]] | None = None):
        self.subsets = subsets
        self.processor = processor
        self.hard_negatives = hard_negatives
        self.on_bad_row = on_bad_row
        self.known_bad = {name: set(bad) for name, bad in (known_bad or {}).items()}
        self._sizes = None  # per-worker cache of image headers

    def __len__(self) -> int:  # not used: keys come from StepPlan
        return 0

    def __getitem__(self, key: tuple[int, str, tuple[int, ...]]) -> PreparedStep:
        step, subset, indices = key
        examples, replaced = [], []
        done: dict = {}  # images decoded in this step, by identity: an image shared by rows is decoded once
        for index in indices:
            example, bad = self._good_example(subset, index, done)
            examples.append(example)
            replaced.extend(bad)
        batch = ContrastiveBatch(
            queries=[e.query for e in examples],
            targets=[e.positive for e in examples],
            negatives=[list(e.negatives) if self.hard_negatives else [] for e in examples],
        )
        return PreparedStep(step, subset, batch, replaced)

    def _good_example(self, subset: str, index: int, done: dict) -> tuple[TrainExample, list[BadRow]]:
        examples = self.subsets[subset][0]
        bad_rows: list[BadRow] = []
        known = self.known_bad.setdefault(subset, set())
        for attempt in range(min(MAX_REPLACEMENTS, len(examples))):
            i = (index + attempt) % len(examples)
            if i in known:
                continue
            bad, prepared = self._prepare(examples[i], done)
            if bad is None:
                return prepared, bad_rows
            known.add(i)
            if self.on_bad_row == "error":
                raise DataError(f"{bad} (data.on_bad_row: skip replaces such rows)")
            logger.warning("skipping bad row (replaced by the next row of its subset): %s", bad)
            bad_rows.append(bad)
        raise DataError(f"subset {subset!r}: no usable row found near index {index} after "
                        f"{min(MAX_REPLACEMENTS, len(examples))} tries; check image_root and the data files")

    def _prepare(self, example: TrainExample, done: dict) -> tuple[BadRow | None, TrainExample]:
        from virtue.train.data import run_deferred_checks

        if example.deferred:
            if self._sizes is None:
                self._sizes = ImageHeaders()
            bad = run_deferred_checks(example, self._sizes)
            if bad is not None:
                return bad, example
        if self.processor is None:
            return None, example
        try:
            sides = [self.processor.preprocess(x, f"{example.row_id} {name}", done=done)
                     for name, x in _sides(example, self.hard_negatives)]
        except InputError as exc:  # an image that passed its header check but does not decode
            return BadRow(example.subset, example.row_id, "image", str(exc)), example
        query, positive, *negatives = sides
        if not self.hard_negatives:
            negatives = list(example.negatives)
        return None, TrainExample(query, positive, tuple(negatives), example.subset, example.row_id)


def _sides(example: TrainExample, with_negatives: bool) -> list[tuple[str, Any]]:
    sides = [("query", example.query), ("positive", example.positive)]
    if with_negatives:
        sides += [(f"negatives[{k}]", n) for k, n in enumerate(example.negatives)]
    return sides


def make_loader(dataset: PreparedBatches, plan: StepPlan, *, num_workers: int, prefetch: int,
                pin_memory: bool) -> DataLoader:
    return DataLoader(
        dataset,
        sampler=plan,  # yields keys; batch_size=None hands each key to __getitem__ as is
        batch_size=None,
        num_workers=num_workers,
        prefetch_factor=prefetch if num_workers else None,
        pin_memory=pin_memory,
        persistent_workers=False,
        # Its own generator: creating the iterator draws a worker seed, which from the global generator would
        # shift the dropout stream of a resumed run against an uninterrupted one.
        generator=torch.Generator().manual_seed(0),
    )


# ---------------------------------------------------------------------------------------------------------------
# Image checks before training


@dataclass
class ImageCheckResult:
    """What the up-front image checks found: `eager` (every row checked) or not (the first rows of each
    subset), and the bad rows by subset, as (index, reason). Small and picklable: rank 0 checks, the other
    processes receive it."""

    eager: bool
    checked: dict[str, int]  # subset -> rows checked (the first n; all when eager)
    bad: dict[str, list[tuple[int, BadRow]]]


def find_bad_images(subsets: Subsets, mode: str, *, on_bad_row: str, show_progress_bar: bool = True,
                    threads: int = 16) -> ImageCheckResult:
    """Run the deferred image checks up front: all of them (`eager`) or the first LAZY_SAMPLE rows of each subset
    (`lazy`: the workers check the rest when drawn). `auto`: eager up to AUTO_EAGER_LIMIT rows."""
    from virtue.train.data import run_deferred_checks

    total = sum(len(ex) for ex, _ in subsets.values())
    eager = mode == "eager" or (mode == "auto" and total <= AUTO_EAGER_LIMIT)
    checked = {name: len(ex) if eager else min(LAZY_SAMPLE, len(ex)) for name, (ex, _) in subsets.items()}
    todo = [(name, i) for name, n in checked.items() for i in range(n) if subsets[name][0][i].deferred]
    headers = ImageHeaders()
    bad: dict[str, list[tuple[int, BadRow]]] = {}
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # header reads wait on the disk, not the CPU
        results = pool.map(lambda key: (key, run_deferred_checks(subsets[key[0]][0][key[1]], headers)), todo)
        for (name, i), row in tqdm(results, total=len(todo), desc="checking images", unit="row",
                                   disable=not show_progress_bar or len(todo) < 1000):
            if row is not None:
                if on_bad_row == "error":
                    raise DataError(f"{row} (data.on_bad_row: skip drops such rows)")
                bad.setdefault(name, []).append((i, row))
    for name, rows in bad.items():
        first = "; ".join(str(b) for _, b in rows[:5])
        logger.warning("%s: %d bad row(s) %s; first: %s", name, len(rows),
                       "skipped" if eager else "among the first rows, replaced when drawn", first)
        if not eager and len(rows) == checked[name]:
            raise DataError(f"subset {name!r}: all of the first {checked[name]} rows are bad, e.g. {rows[0][1]}; "
                            "check image_root")
    return ImageCheckResult(eager, checked, bad)


def apply_image_checks(subsets: Subsets, result: ImageCheckResult) -> tuple[Subsets, dict[str, set[int]]]:
    """Rows found bad are dropped (eager) or remembered so that workers skip them (lazy); rows checked good
    are not checked again. Returns (subsets, known bad indices per subset)."""
    kept: Subsets = {}
    known: dict[str, set[int]] = {}
    for name, (examples, weight) in subsets.items():
        bad = {i for i, _ in result.bad.get(name, [])}
        n = result.checked.get(name, 0)
        fresh = [dataclasses.replace(e, deferred=()) if i < n and e.deferred else e for i, e in enumerate(examples)]
        if result.eager:
            fresh = [e for i, e in enumerate(fresh) if i not in bad]
            if not fresh:
                raise DataError(f"subset {name!r} has no usable row; first problem: {result.bad[name][0][1]}")
        else:
            known[name] = bad
        kept[name] = (fresh, weight)
    return kept, known
