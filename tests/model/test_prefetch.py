"""Preprocessing ahead of the model in `encode`: same vectors whatever the worker count, bounded look-ahead,
each shared image decoded once, batches ordered so that they pad little."""

from __future__ import annotations

import random
import threading
import time

import numpy as np
import torch
from PIL import Image

from tests.model.test_embedder import random_inputs
from virtue.inputs import parse_input
from virtue.processing.prefetch import Prefetcher


def test_workers_do_not_change_the_vectors(_official_model, fixture_images):
    images = [fixture_images[n] for n in ("rocket.png", "astronaut.png", "coffee.png", "chelsea_tiny.png")]
    inputs = random_inputs(images, random.Random(3), 16)
    inputs.append({"image": Image.open(fixture_images["coffee.png"]), "box": [5, 5, 60, 60]})
    inline = _official_model.encode(inputs, batch_size=3, num_workers=0)
    for workers, prefetch in ((1, 1), (2, 3)):
        ahead = _official_model.encode(inputs, batch_size=3, num_workers=workers, prefetch=prefetch)
        np.testing.assert_array_equal(ahead, inline)


def test_look_ahead_is_bounded_and_shared_images_are_read_once(_official_model, fixture_images, monkeypatch):
    proc = _official_model.processor
    items = [parse_input({"image": fixture_images["rocket.png"], "box": [1 + i, 2, 50, 60]}) for i in range(6)]
    items += [parse_input({"image": fixture_images["coffee.png"]}) for _ in range(6)]
    batches = [[i, i + 1] for i in range(0, 12, 2)]
    started, loads = [], []
    real_prepare, real_load = Prefetcher._prepare, type(proc).load

    def prepare(self, batch):
        started.append(batch[0])
        return real_prepare(self, batch)

    def load(self, item, where, resize_to):
        loads.append(threading.current_thread().name)
        return real_load(self, item, where, resize_to)

    monkeypatch.setattr(Prefetcher, "_prepare", prepare)
    monkeypatch.setattr(type(proc), "load", load)
    with Prefetcher(proc, items, batches, resize_to=None, workers=2, depth=2) as prefetcher:
        stream = iter(prefetcher)
        next(stream)
        time.sleep(0.3)  # give the workers every chance to run further ahead than allowed
        assert len(started) <= 1 + 2, f"prepared {len(started)} batches while the first was in use"
        rest = list(stream)
    assert len(rest) == len(batches) - 1 and sorted(started) == [b[0] for b in batches]
    assert all(name.startswith("virtue-preprocess") for name in loads)
    assert len(loads) <= 4  # two distinct images; at most one duplicate read per image while workers race


def test_pinned_on_cuda_machines(_official_model, fixture_images, monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t.dtype) or t)
    monkeypatch.setattr(torch.Tensor, "is_pinned", lambda t, *a, **k: False)
    items = [parse_input({"image": fixture_images["rocket.png"]})]
    with Prefetcher(_official_model.processor, items, [[0]], resize_to=None, workers=1, pin_memory=True) as p:
        (_, rows), = list(p)
    assert rows[0].image.prepared is not None
    assert pinned == [torch.float32]  # the official compat: SAM's input is made from the pinned Qwen image


def test_images_ordered_by_visual_tokens(tiny_model):
    sizes = {"small": (64, 48), "large": (640, 480), "medium": (320, 240)}
    pictures = {name: Image.new("RGB", size, (90, 10, 10)) for name, size in sizes.items()}
    items = [parse_input({"image": pictures[name], "text": f"row {i}"})
             for i, name in enumerate(["small", "large", "medium", "small", "large", "medium"])]
    proc = tiny_model.processor
    order = [i for batch in proc.plan_batches(proc.check_inputs(items), 2) for i in batch]
    assert order == [1, 4, 2, 5, 0, 3]  # largest first, each image's rows together, ties in input order
