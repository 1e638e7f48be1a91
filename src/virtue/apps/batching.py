"""Request batching for the HTTP service, and the service's settings (`ServeConfig`).

Kept free of web-framework imports so `virtue serve --help` (and `import virtue`) never pull in FastAPI.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

import numpy as np

from virtue.errors import ConfigError

logger = logging.getLogger(__name__)

T = TypeVar("T")
# encode(items, **options) -> [len(items), D]; options are per request (e.g. `image_resize` of a search index).
EncodeFn = Callable[..., np.ndarray]


@dataclass(frozen=True)
class ServeConfig:
    """Limits and batching settings of `virtue serve` / `create_app`.

    Size limits answer 413, malformed content 422, a full queue 503 with `Retry-After`.
    """

    model_name: str = "virtue"
    max_request_bytes: int = 32 * 2**20  # whole HTTP body (JSON with base64 images, or multipart)
    max_image_bytes: int = 16 * 2**20  # one encoded image or mask, after base64 decoding
    max_image_pixels: int = 25_000_000  # width x height, checked from the header before decoding
    max_batch_size: int = 64  # items in one request
    max_text_chars: int = 8192  # characters of one item's text
    queue_size: int = 256  # requests waiting for the model; one more gets 503
    max_batch_items: int = 32  # items handed to one `model.encode` call (a larger single request runs alone)
    max_wait_ms: float = 5.0  # how long the first waiting request waits for others to join its batch
    encode_batch_size: int = 8  # `model.encode(batch_size=...)`: rows per forward pass
    retry_after_s: int = 1  # `Retry-After` header of 503 answers

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "model_name":
                if not isinstance(value, str) or not value:
                    raise ConfigError(f"ServeConfig.model_name: expected a non-empty string, got {value!r}")
            elif f.name == "max_wait_ms":
                if not value >= 0:  # also rejects NaN
                    raise ConfigError(f"ServeConfig.max_wait_ms: expected >= 0, got {value!r}")
            elif f.name == "retry_after_s":
                if not isinstance(value, int) or value < 0:
                    raise ConfigError(f"ServeConfig.retry_after_s: expected an integer >= 0, got {value!r}")
            elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ServeConfig.{f.name}: expected a positive integer, got {value!r}")


class QueueFullError(RuntimeError):
    """The batcher's queue is full: the caller should retry later (HTTP 503)."""


class BatcherClosedError(RuntimeError):
    """The batcher is not running (not started yet, or shutting down)."""


@dataclass
class BatchStats:
    """Counters shown by `GET /health`; they also let tests see that batching happened."""

    requests: int = 0  # requests answered by the worker (with rows or an error)
    items: int = 0  # items encoded
    batches: int = 0  # `encode` calls on a merged batch
    largest_batch: int = 0  # most items in one merged batch
    retried_batches: int = 0  # merged batches that failed and were re-run request by request
    rejected: int = 0  # requests refused because the queue was full


@dataclass(eq=False)
class _Job:
    items: list[Any]
    options: dict[str, Any]
    future: asyncio.Future[np.ndarray] = field(repr=False)


class EmbedBatcher:
    """Merges concurrent requests into few `encode` calls, one at a time, on one model thread.

    Requests wait in a bounded FIFO (`queue_size` requests). One worker task takes the waiting requests in
    order, up to `max_batch_items` items, waiting at most `max_wait_ms` after the first for more to arrive,
    runs `encode` on all their items in a dedicated single thread (the model is not thread-safe, and the
    event loop must stay free), and hands each request its own rows. If a merged batch fails, each request
    is re-run alone, so one bad request cannot fail the others. Only requests with equal `options` (keyword
    arguments of `encode`) share a batch. Other model work (`run_exclusive`) runs on the same thread, so it
    never overlaps an `encode`.
    """

    def __init__(self, encode: EncodeFn, *, queue_size: int, max_batch_items: int, max_wait_ms: float):
        self._encode = encode
        self.queue_size = queue_size
        self.max_batch_items = max_batch_items
        self.max_wait_s = max_wait_ms / 1000
        self.stats = BatchStats()
        # A deque plus an Event rather than asyncio.Queue: the worker must peek at the next request (it may
        # not fit the current batch) and time out on waits without any risk of losing a dequeued request.
        self._jobs: deque[_Job] = deque()
        self._running: list[_Job] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @classmethod
    def from_config(cls, encode: EncodeFn, config: ServeConfig) -> EmbedBatcher:
        return cls(
            encode, queue_size=config.queue_size, max_batch_items=config.max_batch_items, max_wait_ms=config.max_wait_ms
        )

    # ----------------------------------------------------------------- state
    @property
    def running(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def queue_depth(self) -> int:
        """Requests waiting (not counting the batch being encoded)."""
        return len(self._jobs)

    @property
    def queued_items(self) -> int:
        return sum(len(job.items) for job in self._jobs)

    @property
    def is_full(self) -> bool:
        return len(self._jobs) >= self.queue_size

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        if self.running:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="virtue-model")
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="virtue-batcher")

    async def stop(self) -> None:
        """Stop the worker and fail every request still waiting or running with `BatcherClosedError`."""
        pending = list(self._running) + list(self._jobs)
        self._jobs.clear()
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for job in pending:
            if not job.future.done():
                job.future.set_exception(BatcherClosedError("the server is shutting down"))
        if self._executor is not None:
            # An encode already running cannot be interrupted; let it finish in its thread without blocking
            # the event loop's shutdown.
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ----------------------------------------------------------------- use
    async def submit(self, items: Sequence[Any], **options: Any) -> np.ndarray:
        """Queue one request's items; returns their rows [len(items), D] in order, or raises what `encode`
        raised for them. Raises `QueueFullError` at once if `queue_size` requests are already waiting.

        `options` go to `encode` as keyword arguments."""
        if not self.running or self._wakeup is None:
            raise BatcherClosedError("the embedding worker is not running")
        if not items:
            raise ValueError("submit: no items")
        if self.is_full:
            self.stats.rejected += 1
            raise QueueFullError(f"{len(self._jobs)} requests are already waiting")
        job = _Job(list(items), options, asyncio.get_running_loop().create_future())
        self._jobs.append(job)
        self._wakeup.set()
        # If the caller is cancelled (client gone), awaiting cancels the future and the worker skips the job.
        return await job.future

    async def run_exclusive(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run other model work (e.g. a search) on the model thread, between batches."""
        if not self.running or self._executor is None:
            raise BatcherClosedError("the embedding worker is not running")
        return await self._call(functools.partial(fn, *args, **kwargs))

    async def _call(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    # ----------------------------------------------------------------- worker
    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch(loop)
            if not batch:
                continue
            try:
                await self._process(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug here must not kill the worker: fail this batch, keep serving
                logger.exception("embedding batch failed unexpectedly")
                for job in batch:
                    _fail(job, exc)

    async def _next_batch(self, loop: asyncio.AbstractEventLoop) -> list[_Job]:
        assert self._wakeup is not None
        while not self._jobs:
            self._wakeup.clear()
            await self._wakeup.wait()
        deadline = loop.time() + self.max_wait_s
        batch: list[_Job] = []
        count = 0
        while True:
            while self._jobs:
                job = self._jobs[0]
                if job.future.done():  # its client went away while waiting
                    self._jobs.popleft()
                    continue
                if batch and (count + len(job.items) > self.max_batch_items or job.options != batch[0].options):
                    return batch  # it starts the next batch, keeping FIFO order
                self._jobs.popleft()
                batch.append(job)
                count += len(job.items)
                if count >= self.max_batch_items:
                    return batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return batch
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                return batch

    async def _process(self, batch: list[_Job]) -> None:
        self._running = batch
        try:
            items = [item for job in batch for item in job.items]
            self.stats.batches += 1
            self.stats.largest_batch = max(self.stats.largest_batch, len(items))
            try:
                out = await self._call(functools.partial(self._encode, items, **batch[0].options))
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch[0], exc)
                    return
                # Only the request at fault should see the error, with item indices of its own request.
                self.stats.retried_batches += 1
                for job in batch:
                    if job.future.done():
                        continue
                    try:
                        rows = await self._call(functools.partial(self._encode, job.items, **job.options))
                    except Exception as job_exc:
                        _fail(job, job_exc)
                    else:
                        self._resolve(job, rows)
                return
            start = 0
            for job in batch:
                self._resolve(job, out[start : start + len(job.items)])
                start += len(job.items)
        finally:
            self.stats.requests += len(batch)
            self._running = []

    def _resolve(self, job: _Job, rows: np.ndarray) -> None:
        self.stats.items += len(job.items)
        if not job.future.done():
            job.future.set_result(rows)


def _fail(job: _Job, exc: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(exc)
