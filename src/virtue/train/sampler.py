"""Global batches drawn from one subset at a time (virtue-spec §4.3), reproducible and resumable.

The official mix interleaves the subsets with `batch_size` = the global batch and `all_exhausted`: each global
batch comes from one subset, chosen with probability proportional to its weight, and a subset that runs out is
started again (so small subsets are oversampled). `SubsetBatchSampler` does the same without materialising the
interleaved dataset, and `shard` gives each rank its contiguous slice of a global batch.

Randomness is counter-based: the subset of batch `k` and the permutation of a subset's epoch `e` are drawn from
generators seeded with (seed, k) and (seed, subset name, e). The whole RNG state is therefore a few counters, the
state dict is small JSON, and a resumed sampler yields exactly the batches the original would have.

Row order within a subset. The official recipe interleaves the subsets' `IterableDataset`s without shuffling them
(VLM2Vec's `interleave_datasets` over unshuffled datasets), so each subset's rows arrive in file order, starting
again at the first row when a subset runs out. `shuffle=False` reproduces that: the identity permutation every
epoch, while the subset of each batch is still drawn with probability proportional to its weight. Shuffling
(`shuffle=True`, a new permutation per subset and epoch) is the default here, because file order puts similar rows
(one image's several regions, one class's images) into the same batch, where they become each other's negatives.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np

from virtue.errors import ConfigError

T = TypeVar("T")
STATE_VERSION = 1
# Distinct first words keep the subset-choice and permutation streams independent for the same seed.
_CHOICE_STREAM = 0
_PERMUTATION_STREAM = 1


class SubsetBatchSampler(Iterator[list[tuple[str, int]]]):
    """An endless stream of global batches, each a list of (subset name, example index) from a single subset.

    sizes: number of examples of each subset.
    weights: relative probability of drawing each subset (the official recipe uses 1 for all).
    global_batch_size: examples per global batch, over all ranks.
    seed: a non-negative integer; the same seed, sizes and weights give the same stream.
    drop_last: when a subset's permutation has fewer than `global_batch_size` examples left, True starts the next
        permutation (the rest is skipped this epoch; every batch is full); False yields the short batch first.
    shuffle: True takes each subset's examples in a new random order every epoch; False in file order (index 0, 1,
        ...), the official behaviour (module docstring).
    """

    def __init__(
        self,
        sizes: Mapping[str, int],
        weights: Mapping[str, float],
        global_batch_size: int,
        seed: int,
        drop_last: bool = True,
        shuffle: bool = True,
    ):
        _check_int(global_batch_size, "global_batch_size", 1)
        _check_int(seed, "seed", 0)
        self.sizes = _checked_sizes(sizes, global_batch_size)
        self.weights = _checked_weights(weights, self.sizes)
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.shuffle = bool(shuffle)
        # Sorted, so that the stream does not depend on the order the subsets were listed in.
        self._names = sorted(self.sizes)
        total = sum(self.weights.values())
        self._probabilities = np.array([self.weights[n] / total for n in self._names])
        self._batches = 0
        self._cursors = {name: (0, 0) for name in self._names}  # (epoch, position in that epoch's permutation)
        self._permutations: dict[str, tuple[int, np.ndarray]] = {}

    @property
    def batches_yielded(self) -> int:
        return self._batches

    def __iter__(self) -> SubsetBatchSampler:
        return self

    def __next__(self) -> list[tuple[str, int]]:
        name = self._choose(self._batches)
        indices = self._take(name)
        self._batches += 1
        return [(name, int(i)) for i in indices]

    def _choose(self, step: int) -> str:
        rng = np.random.default_rng([_CHOICE_STREAM, self.seed, step])
        return self._names[int(rng.choice(len(self._names), p=self._probabilities))]

    def _take(self, name: str) -> np.ndarray:
        epoch, position = self._cursors[name]
        size, batch = self.sizes[name], self.global_batch_size
        if position >= size or (self.drop_last and position + batch > size):
            epoch, position = epoch + 1, 0
        indices = self._permutation(name, epoch)[position : position + batch]
        self._cursors[name] = (epoch, position + len(indices))
        return indices

    def _permutation(self, name: str, epoch: int) -> np.ndarray:
        cached = self._permutations.get(name)
        if cached is None or cached[0] != epoch:
            if self.shuffle:
                rng = np.random.default_rng([_PERMUTATION_STREAM, self.seed, _name_key(name), epoch])
                order = rng.permutation(self.sizes[name])
            else:
                order = np.arange(self.sizes[name])  # file order, as the official unshuffled interleave
            cached = (epoch, order)
            self._permutations[name] = cached
        return cached[1]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the stream, plus the settings it is only valid for."""
        return {
            "version": STATE_VERSION,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
            "drop_last": self.drop_last,
            "shuffle": self.shuffle,
            "sizes": dict(self.sizes),
            "weights": dict(self.weights),
            "batches_yielded": self._batches,
            "subsets": {n: {"epoch": e, "position": p} for n, (e, p) in self._cursors.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()`; the settings must match, else the continuation would differ silently."""
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"sampler state: version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, value in self.state_dict().items():
            if key not in ("batches_yielded", "subsets") and state.get(key) != value:
                raise ConfigError(f"sampler state: {key} was {state.get(key)!r}, this sampler has {value!r}")
        try:
            saved = state["subsets"]
            cursors = {n: (int(saved[n]["epoch"]), int(saved[n]["position"])) for n in self._names}
            batches = int(state["batches_yielded"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"sampler state: malformed or missing entry ({exc!r})") from None
        self._cursors = cursors
        self._batches = batches


def shard(batch: Sequence[T], rank: int, world_size: int) -> list[T]:
    """The contiguous slice of a global batch that `rank` (of `world_size`) processes."""
    _check_int(world_size, "world_size", 1)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ConfigError(f"rank: expected an integer in [0, {world_size}), got {rank!r}")
    if len(batch) % world_size:
        raise ConfigError(f"global_batch_size {len(batch)} must be divisible by world_size {world_size}")
    per_rank = len(batch) // world_size
    return list(batch[rank * per_rank : (rank + 1) * per_rank])


def _name_key(name: str) -> int:
    # A stable hash: Python's hash() of a str changes between processes.
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _check_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: expected an integer >= {minimum}, got {value!r}")


def _checked_sizes(sizes: Mapping[str, int], global_batch_size: int) -> dict[str, int]:
    if not sizes:
        raise ConfigError("sizes: expected at least one subset")
    for name, size in sizes.items():
        _check_int(size, f"sizes[{name!r}]", 0)
        if size < global_batch_size:
            raise ConfigError(
                f"subset {name!r} has {size} examples, fewer than global_batch_size {global_batch_size}; "
                "every global batch comes from one subset"
            )
    return dict(sizes)


def _checked_weights(weights: Mapping[str, float], sizes: Mapping[str, int]) -> dict[str, float]:
    missing = sorted(set(sizes) - set(weights))
    unknown = sorted(set(weights) - set(sizes))
    if missing or unknown:
        raise ConfigError(f"weights: missing subset(s) {missing}, unknown subset(s) {unknown}")
    for name, weight in weights.items():
        ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)
        if not ok or weight <= 0:
            raise ConfigError(f"weights[{name!r}]: expected a finite number > 0, got {weight!r}")
    return {name: float(weights[name]) for name in sizes}
