"""The engine: a bounded request queue, a batcher, and one worker thread that runs the backend.

Requests (one image, its tasks, its options) wait in an asyncio queue bounded in images (`max_queue`; a full queue
is refused at once with a retry hint). The batcher takes the first waiting request, then whatever else arrives
within `max_wait_ms`, up to `max_batch` images, and hands the batch to the worker thread: every image runs only
the tasks it asked for, in one forward pass (shared backbone prefix, segmented adapters), and the results are
split back per request. Forward passes and changes to the model (adapter store) run on that one worker thread,
one at a time, so the event loop stays free to accept and answer requests meanwhile.

A batch that fails is retried request by request, so one bad request fails alone. A request that waits past its
timeout is answered 504 and skipped if its batch has not started. `stop()` stops taking requests (503) and drains
the queue, bounded by `drain_timeout_s`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import NotFound, QueueFull, RequestTimeout, ServingError, ShuttingDown
from .images import PredictOptions, to_json
from .metrics import Metrics

log = logging.getLogger("multitask_peft.serving")


@dataclass(frozen=True)
class EngineConfig:
    """Batching and queueing.

    Attributes:
        max_batch: Most images per forward pass.
        max_wait_ms: How long the batcher waits for more requests after the first one of a batch.
        max_queue: Most images waiting; past it requests are refused (429 with Retry-After).
        timeout_s: Default time a request may take in all (queue + forward), unless it asks for less or more.
        drain_timeout_s: On stop, how long queued requests may still take.
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    max_queue: int = 256
    timeout_s: float = 30.0
    drain_timeout_s: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be a positive integer, got {value!r}")
        for name in ("max_wait_ms", "timeout_s", "drain_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"EngineConfig.{name} must be a finite number >= 0, got {value!r}")


@dataclass(eq=False)
class _Request:
    image: torch.Tensor  # (3, H, W) normalised
    original: tuple[int, int]  # (height, width) of the image the client sent
    tasks: list[str]
    heads: dict[str, tuple[str, list[str] | None]]  # task -> (head type, class names)
    options: PredictOptions
    future: asyncio.Future
    arrived: float
    deadline: float
    entries: list[Any] = field(default_factory=list)  # store entries held while pending


class Engine:
    """Serves predict requests with a backend (`TorchBackend` or `OnnxBackend`).

    Use it from a running event loop: `await engine.start()`, `await engine.predict(...)`, `await engine.stop()`.
    """

    def __init__(self, backend: Any, config: EngineConfig | None = None, metrics: Metrics | None = None) -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.store = getattr(backend, "store", None)
        self.preprocess = backend.preprocess
        self.closing = False
        self.ready = False
        self._queue: asyncio.Queue[_Request | None] | None = None
        self._carry: collections.deque[_Request] = collections.deque()  # taken but left for the next batch
        self._queued_images = 0
        self._running = 0  # images in the batch being run
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtp-worker")
        self._loop_task: asyncio.Task | None = None
        self._throughput = 0.0  # images/s, exponential moving average (for Retry-After)
        self.batches = 0
        if self.store is not None:
            self.store.run_in_worker = self.run_in_worker
            self.store.on_load = self._count_load
            self.store.on_evict = self.metrics.task_evictions.inc

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._loop_task = asyncio.create_task(self._batcher(), name="mtp-batcher")
        if self.store is not None:
            self.metrics.tasks_resident.set(self.store.resident_count())
        self.ready = True

    async def stop(self) -> None:
        """Refuse new requests, let queued ones finish (at most `drain_timeout_s`), then stop the worker."""
        self.closing = True
        self.ready = False
        if self._queue is None:
            self._worker.shutdown(wait=False)
            return
        deadline = time.monotonic() + self.config.drain_timeout_s
        while (self._queued_images or self._running or self._carry) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._queue.put(None)
        if self._loop_task is not None:
            try:
                await asyncio.wait_for(self._loop_task, max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                self._loop_task.cancel()
        for req in [*self._carry, *self._drain_queue()]:
            if not req.future.done():
                req.future.set_exception(ShuttingDown("the server stopped before this request ran"))
        self._worker.shutdown(wait=True)

    def _drain_queue(self) -> list[_Request]:
        items = []
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                items.append(item)
        return items

    async def run_in_worker(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the worker thread (after the forward pass in progress, if any)."""
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # --- requests ------------------------------------------------------------------------------------------
    def served_tasks(self) -> dict[str, dict[str, Any]]:
        if self.store is not None:
            return {n: e.info() for n, e in self.store.entries.items() if not e.unloading}
        return {n: {"name": n, "head": h, "class_names": c, "version": 1} for n, (h, c) in self.backend.tasks.items()}

    async def predict(
        self, image: torch.Tensor, original: tuple[int, int], tasks: list[str], options: PredictOptions
    ) -> dict[str, dict[str, Any]]:
        """Results of `tasks` for one preprocessed image, as JSON-ready dicts per task."""
        if self.closing or self._queue is None:
            raise ShuttingDown()
        loop = asyncio.get_running_loop()
        now = loop.time()
        if self.store is not None:
            entries = self.store.acquire(tasks)
            heads = {e.name: (e.head, e.class_names) for e in entries}
        else:
            unknown = [t for t in tasks if t not in self.backend.tasks]
            if unknown:
                raise NotFound(f"unknown task(s) {unknown}; served tasks: {list(self.backend.tasks)}")
            entries, heads = [], {t: self.backend.tasks[t] for t in tasks}
        if self._queued_images >= self.config.max_queue:
            if self.store is not None:
                self.store.release(entries)
            wait = self._queued_images / self._throughput if self._throughput > 0 else 1.0
            raise QueueFull(f"the queue is full ({self._queued_images} images waiting)", math.ceil(wait))
        timeout = options.timeout_s if options.timeout_s is not None else self.config.timeout_s
        request = _Request(image, original, tasks, heads, options, loop.create_future(), now, now + timeout, entries)
        self._queued_images += 1
        self.metrics.queue_depth.set(self._queued_images)
        self._queue.put_nowait(request)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except TimeoutError:
            request.future.cancel()
            raise RequestTimeout(f"no result within {timeout:g} s (queue + forward)") from None
        except asyncio.CancelledError:  # the client went away: skip the request if its batch has not started
            request.future.cancel()
            raise
        finally:
            if self.store is not None:
                self.store.release(entries)
            elapsed = loop.time() - now
            for task in tasks:
                self.metrics.task_latency.labels(task).observe(elapsed)

    # --- batching ------------------------------------------------------------------------------------------
    async def _next_batch(self) -> list[_Request] | None:
        """Requests for one forward pass (None: stop). Waits for the first, then up to `max_wait_ms` for more."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = self._carry.popleft() if self._carry else await self._queue.get()
        if first is None:
            return None
        batch, names = [first], set(first.tasks)
        cap = self.store.max_resident if self.store is not None else None
        deadline = loop.time() + self.config.max_wait_ms / 1000
        stop = False
        while len(batch) < self.config.max_batch:
            if self._carry:
                item = self._carry.popleft()
            else:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
            if item is None:
                stop = True
                break
            if cap is not None and len(names | set(item.tasks)) > cap:
                self._carry.appendleft(item)  # its tasks would not fit in the model next to this batch's
                break
            batch.append(item)
            names |= set(item.tasks)
        if stop:
            self._queue.put_nowait(None)
        return batch

    async def _batcher(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch is None:
                return
            self._queued_images -= len(batch)
            self.metrics.queue_depth.set(self._queued_images)
            now = asyncio.get_running_loop().time()
            live = []
            for req in batch:
                if req.future.done():  # timed out or the client went away
                    continue
                if now > req.deadline:
                    req.future.set_exception(RequestTimeout("timed out in the queue"))
                    continue
                live.append(req)
            if live:
                self._running = len(live)
                try:
                    await self._run(live)
                except Exception:  # never let the batcher die
                    log.exception("batch of %d failed outside the forward pass", len(live))
                    for req in live:
                        if not req.future.done():
                            req.future.set_exception(ServingError("internal error while running the batch"))
                finally:
                    self._running = 0

    async def _run(self, batch: list[_Request]) -> None:
        start = time.perf_counter()
        try:
            results = await self._forward(batch)
        except Exception as e:
            if len(batch) == 1:
                log.exception("request failed in the forward pass")
                if not batch[0].future.done():
                    err = e if isinstance(e, ServingError) else ServingError(f"forward pass failed: {type(e).__name__}")
                    batch[0].future.set_exception(err)
                return
            log.warning("batch of %d failed (%s: %s); retrying request by request", len(batch), type(e).__name__, e)
            for req in batch:
                await self._run([req])
            return
        seconds = time.perf_counter() - start
        self.batches += 1
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_rows.observe(sum(len(r.tasks) for r in batch))
        self.metrics.batch_seconds.observe(seconds)
        rate = len(batch) / max(seconds, 1e-6)
        self._throughput = rate if self._throughput == 0 else 0.8 * self._throughput + 0.2 * rate
        for req, result in zip(batch, results, strict=True):
            if not req.future.done():
                req.future.set_result(result)

    async def _forward(self, batch: list[_Request]) -> list[dict[str, dict[str, Any]]]:
        images = torch.stack([r.image for r in batch])
        tasks = [r.tasks for r in batch]
        size = self.preprocess.size
        if self.store is None:
            return await self.run_in_worker(self._run_backend, images, tasks, batch, size)
        async with self.store.lock:
            await self.store.make_resident(t for names in tasks for t in names)
            self.metrics.tasks_resident.set(self.store.resident_count())
            return await self.run_in_worker(self._run_backend, images, tasks, batch, size)

    def _run_backend(
        self, images: torch.Tensor, tasks: list[list[str]], batch: list[_Request], size: tuple[int, int]
    ) -> list[dict[str, dict[str, Any]]]:
        """On the worker: the forward pass and the JSON form of every result."""
        raw = self.backend.run(images, tasks)
        out = []
        for req, per_image in zip(batch, raw, strict=True):
            out.append(
                {
                    t: to_json(req.heads[t][0], per_image[t], size, req.original, req.options, req.heads[t][1])
                    for t in req.tasks
                }
            )
        return out

    def _count_load(self) -> None:
        self.metrics.task_loads.inc()
        if self.store is not None:
            self.metrics.tasks_resident.set(self.store.resident_count())
