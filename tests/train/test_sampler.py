"""The subset batch sampler: one subset per global batch, weighted choice, epochs, exact resume, sharding."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import pytest

from virtue.errors import ConfigError
from virtue.train.sampler import SubsetBatchSampler, shard


def _take(sampler: SubsetBatchSampler, n: int) -> list[list[tuple[str, int]]]:
    return list(itertools.islice(sampler, n))


def test_every_batch_comes_from_one_subset():
    sampler = SubsetBatchSampler({"a": 40, "b": 17, "c": 8}, {"a": 1, "b": 1, "c": 1}, global_batch_size=8, seed=0)
    batches = _take(sampler, 60)
    assert all(len(b) == 8 and len({name for name, _ in b}) == 1 for b in batches)
    assert {b[0][0] for b in batches} == {"a", "b", "c"}
    assert sampler.batches_yielded == 60


def test_weights_are_respected():
    sampler = SubsetBatchSampler({"heavy": 50, "light": 50}, {"heavy": 3, "light": 1}, global_batch_size=5, seed=1)
    counts = Counter(b[0][0] for b in _take(sampler, 400))
    assert 0.65 <= counts["heavy"] / 400 <= 0.85


def test_each_epoch_visits_every_example_once_then_reshuffles():
    sizes = {"a": 12, "b": 20}
    sampler = SubsetBatchSampler(sizes, {"a": 1, "b": 1}, global_batch_size=4, seed=3)
    order: dict[str, list[int]] = {"a": [], "b": []}
    for batch in _take(sampler, 80):
        order[batch[0][0]] += [i for _, i in batch]
    for name, size in sizes.items():
        epochs = [order[name][k : k + size] for k in range(0, len(order[name]) - size + 1, size)]
        assert len(epochs) >= 2
        assert all(sorted(e) == list(range(size)) for e in epochs)
        assert len({tuple(e) for e in epochs}) > 1  # a new permutation each epoch


@pytest.mark.parametrize("drop_last", [True, False])
def test_incomplete_tail(drop_last):
    sampler = SubsetBatchSampler({"a": 10}, {"a": 1}, global_batch_size=4, seed=0, drop_last=drop_last)
    batches = _take(sampler, 6)
    if drop_last:
        assert [len(b) for b in batches] == [4] * 6
        first_epoch = [i for b in batches[:2] for _, i in b]
        assert len(set(first_epoch)) == 8
    else:
        assert [len(b) for b in batches] == [4, 4, 2, 4, 4, 2]
        assert sorted(i for b in batches[:3] for _, i in b) == list(range(10))


def test_seed_fixes_the_stream():
    def make(seed):
        return SubsetBatchSampler({"a": 30, "b": 9}, {"a": 2, "b": 1}, global_batch_size=3, seed=seed)

    assert _take(make(5), 20) == _take(make(5), 20)
    assert _take(make(5), 20) != _take(make(6), 20)


def test_resume_yields_the_same_continuation():
    args = ({"a": 23, "b": 9, "c": 40}, {"a": 1, "b": 2, "c": 1}, 4, 11)
    sampler = SubsetBatchSampler(*args)
    _take(sampler, 7)
    state = json.loads(json.dumps(sampler.state_dict()))  # must survive a JSON round trip
    expected = _take(sampler, 5)
    resumed = SubsetBatchSampler(*args)
    resumed.load_state_dict(state)
    assert _take(resumed, 5) == expected
    assert resumed.batches_yielded == 12


def test_state_from_another_configuration_is_refused():
    state = SubsetBatchSampler({"a": 8}, {"a": 1}, 4, seed=0).state_dict()
    with pytest.raises(ConfigError, match="sizes"):
        SubsetBatchSampler({"a": 9}, {"a": 1}, 4, seed=0).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed"):
        SubsetBatchSampler({"a": 8}, {"a": 1}, 4, seed=1).load_state_dict(state)


def test_bad_construction():
    with pytest.raises(ConfigError, match="'small' has 3 examples"):
        SubsetBatchSampler({"big": 10, "small": 3}, {"big": 1, "small": 1}, global_batch_size=4, seed=0)
    with pytest.raises(ConfigError, match="weights"):
        SubsetBatchSampler({"a": 10, "b": 10}, {"a": 1}, global_batch_size=4, seed=0)
    with pytest.raises(ConfigError, match="weights"):
        SubsetBatchSampler({"a": 10}, {"a": 0}, global_batch_size=4, seed=0)
    with pytest.raises(ConfigError, match="global_batch_size"):
        SubsetBatchSampler({"a": 10}, {"a": 1}, global_batch_size=0, seed=0)


def test_shard_gives_contiguous_slices():
    batch = [("a", i) for i in range(8)]
    slices = [shard(batch, rank, 4) for rank in range(4)]
    assert slices[1] == [("a", 2), ("a", 3)]
    assert [x for s in slices for x in s] == batch
    with pytest.raises(ConfigError, match="divisible by world_size 3"):
        shard(batch, 0, 3)
    with pytest.raises(ConfigError, match="rank"):
        shard(batch, 4, 4)


@pytest.mark.parametrize("drop_last", [True, False])
def test_unshuffled_takes_file_order_and_restarts(drop_last):
    sizes, weights = {"a": 10, "b": 7}, {"a": 1, "b": 2}
    sampler = SubsetBatchSampler(sizes, weights, 4, seed=2, drop_last=drop_last, shuffle=False)
    batches = _take(sampler, 40)
    order: dict[str, list[list[int]]] = {"a": [], "b": []}
    for batch in batches:
        order[batch[0][0]].append([i for _, i in batch])
    # The official stream: each subset read from its first row on, started again once it runs out.
    expected_a = [[0, 1, 2, 3], [4, 5, 6, 7]] + ([] if drop_last else [[8, 9]])
    expected_b = [[0, 1, 2, 3]] + ([] if drop_last else [[4, 5, 6]])
    for name, cycle in (("a", expected_a), ("b", expected_b)):
        assert len(order[name]) > 2 * len(cycle)
        assert order[name] == (cycle * 40)[: len(order[name])]
    # The subset of each batch is drawn as when shuffling (same seed, same weights).
    shuffled = _take(SubsetBatchSampler(sizes, weights, 4, seed=2, drop_last=drop_last), 40)
    assert [b[0][0] for b in batches] == [b[0][0] for b in shuffled]


def test_unshuffled_resume_and_setting_in_state():
    args = ({"a": 9, "b": 13}, {"a": 1, "b": 1}, 4, 0)
    sampler = SubsetBatchSampler(*args, shuffle=False)
    _take(sampler, 5)
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state["shuffle"] is False
    expected = _take(sampler, 6)
    resumed = SubsetBatchSampler(*args, shuffle=False)
    resumed.load_state_dict(state)
    assert _take(resumed, 6) == expected
    with pytest.raises(ConfigError, match="shuffle was False"):
        SubsetBatchSampler(*args).load_state_dict(state)
    assert SubsetBatchSampler(*args).state_dict()["shuffle"] is True
