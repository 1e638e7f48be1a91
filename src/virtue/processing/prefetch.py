"""Image preprocessing that runs ahead of the model: while batch k is on the device, threads decode, resize and
normalise the images of batches k+1 .. k+depth (PIL, NumPy and torch release the GIL for the heavy parts).

Bounded: at most `depth` batches wait, prepared, in memory. On CUDA the prepared tensors are pinned so that the
model's copies are asynchronous. An image shared by consecutive rows (several prompts on one photo) is decoded
once: prepared images are kept in a small LRU keyed by the image's identity (path or object).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from virtue.inputs import EmbedInput
from virtue.processing.batch import LoadedImage, VirtueProcessor


class _SharedImages:
    """identity -> LoadedImage, bounded, safe to use from several threads."""

    def __init__(self, capacity: int):
        self.capacity = max(1, capacity)
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key) -> LoadedImage | None:
        with self._lock:
            item = self._items.get(key)
            if item is not None:
                self._items.move_to_end(key)
            return item

    def __setitem__(self, key, value: LoadedImage) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)


class Prefetcher:
    """Iterates over `batches` (lists of indices into `items`), yielding (indices, inputs with their images
    prepared). `workers=0` prepares each batch in the caller's thread when it is needed (no overlap)."""

    def __init__(
        self,
        processor: VirtueProcessor,
        items: Sequence[EmbedInput],
        batches: Sequence[list[int]],
        *,
        resize_to: tuple[int, int] | None,
        workers: int = 1,
        depth: int = 2,
        pin_memory: bool = False,
        share_images: bool = True,
        shared_capacity: int = 32,
    ):
        self.processor, self.items, self.batches = processor, items, batches
        self.resize_to, self.workers, self.depth = resize_to, workers, max(1, depth)
        self.pin_memory = pin_memory
        self.shared = _SharedImages(shared_capacity) if share_images else None
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="virtue-preprocess") if workers > 0 else None

    def _prepare(self, batch: list[int]) -> list[EmbedInput]:
        out = []
        for i in batch:
            item = self.items[i]
            if item.image is not None and not isinstance(item.image, LoadedImage):
                item = self.processor.preprocess(item, f"input {i}", self.resize_to, done=self.shared)
                prepared = item.image.prepared
                if self.pin_memory and prepared is not None and not prepared.qwen.normalized.is_pinned():
                    item.image.prepared = prepared.pin_memory()
            out.append(item)
        return out

    def __iter__(self) -> Iterator[tuple[list[int], list[EmbedInput]]]:
        if self._pool is None:
            for batch in self.batches:
                yield batch, self._prepare(batch)
            return
        pending: deque[tuple[list[int], Future]] = deque()
        upcoming = iter(self.batches)

        def refill() -> None:
            while len(pending) < self.depth:
                batch = next(upcoming, None)
                if batch is None:
                    return
                pending.append((batch, self._pool.submit(self._prepare, batch)))

        refill()
        while pending:
            batch, future = pending.popleft()
            refill()  # keep `depth` batches in preparation while this one runs on the model
            yield batch, future.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

