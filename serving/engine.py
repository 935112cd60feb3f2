"""The engine: a bounded request queue, a batcher, and one worker thread that runs the backend.

Requests (one image, its tasks, its options) wait in an asyncio queue bounded in images (`max_queue`; a full queue
is refused at once with a retry hint). The batcher groups them (up to `max_batch` images, see below) and hands
each batch to the worker thread: every image runs only the tasks it asked for, in one forward pass (shared
backbone prefix, segmented adapters), and the results are split back per request. Forward passes and changes to
the model (adapter store) run on that one worker thread, one at a time, so the event loop stays free to accept
and answer requests meanwhile.

Every torch op of the server runs on that worker thread, model building included where the server builds the
model (`Worker.call`): PyTorch's OpenMP runtime keeps one thread team per thread that ran parallel ops, and with
two teams on a small machine libgomp throttles its spin-waiting, which made ViT-S forward passes 30-70 % slower
on 2 cores. Images are decoded there too, just before their forward pass (request handlers only check the
header): decoding on request threads while a forward pass ran cost the torch backend 15-20 % of its throughput on
2 cores, as each preempted OpenMP thread stalls the others at the next barrier.

The next batch forms while the current one runs: it takes every request that arrives until the worker is free
(up to `max_batch` images) and starts at once, so the worker does not idle while clients are busy. On an idle
worker the batcher waits (at most `max_wait_ms`) only while the batch is smaller than the number of requests seen
in flight at once during the previous forward pass (clients likely to come back right away): a lone client never
waits.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from multitask_peft.outputs import JsonContext

from .backends import Backend, TaskFormat
from .errors import BadRequest, QueueFull, RequestTimeout, ServingError, ShuttingDown, Unprocessable
from .images import MAX_LIST_MASK_PIXELS, PredictOptions, format_result
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


class Worker:
    """The one thread of a server that runs torch: forward passes, task loads and (ideally) building the model.

    Example:
        worker = Worker()
        backend = worker.call(torch_backend, "runs/demo")   # the model is built on the worker thread
        engine = Engine(backend, worker=worker)
    """

    def __init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mtp-worker")

    def call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Run `fn` on the worker thread and wait for it (outside the event loop)."""
        return self.executor.submit(fn, *args, **kwargs).result()

    async def run(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the worker thread from the event loop (after the work in progress, if any)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def shutdown(self, wait: bool = True) -> None:
        self.executor.shutdown(wait=wait)


#: How a request wants its results (`format_result`): "json" (`/v1/predict`) or "tensors" (OIP v2).
RESULT_FORMS = ("json", "tensors")


@dataclass(eq=False)
class _Request:
    data: bytes | np.ndarray  # the image file (its header checked) or its RGB pixels; decoded on the worker
    tasks: list[str]
    options: PredictOptions
    future: asyncio.Future  # -> (results per task, version per task)
    arrived: float
    deadline: float
    form: str = "json"


class Engine:
    """Serves predict requests with a backend (`TorchBackend`, `OnnxBackend`: any `Backend`).

    Use it from a running event loop: `await engine.start()`, `await engine.predict(...)`, `await engine.stop()`.

    Args:
        backend: The served tasks, admission of requests, and batches (`Backend`); wired to this engine's worker
            and metrics here.
        config: Batching and queueing.
        metrics: Where to count (default: a fresh registry).
        worker: The thread that runs torch (default: a new one); pass the one the model was built on.
    """

    def __init__(
        self,
        backend: Backend,
        config: EngineConfig | None = None,
        metrics: Metrics | None = None,
        worker: Worker | None = None,
    ) -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        self.metrics = metrics or Metrics()
        self.preprocess = backend.preprocess
        self.worker = worker or Worker()
        self.closing = False
        self.ready = False
        self.batches = 0
        self._queue: asyncio.Queue[_Request | None] | None = None
        self._carry: collections.deque[_Request] = collections.deque()  # taken but left for the next batch
        self._queued = 0  # images waiting
        self._pending = 0  # requests accepted and not answered
        self._peak = 1  # most requests pending at once during the last forward pass
        self._current: list[_Request] = []  # the batch being run
        self._forming: list[_Request] = []  # the batch being formed
        self._loop_task: asyncio.Task | None = None
        self._throughput = 0.0  # images/s, exponential moving average (for Retry-After)
        backend.bind(self.run_in_worker, self.metrics)

    # --- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._loop_task = asyncio.create_task(self._batcher(), name="mtp-batcher")
        self.ready = True

    async def stop(self) -> None:
        """Refuse new requests, let accepted ones finish (at most `drain_timeout_s`), then stop the batcher.
        Requests still unanswered then get 503."""
        self.closing = True
        self.ready = False
        if self._queue is not None:
            deadline = time.monotonic() + self.config.drain_timeout_s
            while (self._queued or self._current or self._carry) and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            self._queue.put_nowait(None)
            if self._loop_task is not None:
                try:
                    await asyncio.wait_for(self._loop_task, max(0.1, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    self._loop_task.cancel()
            for req in [*self._current, *self._forming, *self._carry, *self._drain_queue()]:
                if not req.future.done():
                    req.future.set_exception(ShuttingDown("the server stopped before this request was answered"))
        self.worker.shutdown(wait=False)  # a forward pass still running ends on its own; nobody waits for it

    def _drain_queue(self) -> list[_Request]:
        items = []
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None:
                items.append(item)
        return items

    async def run_in_worker(self, fn: Any, *args: Any) -> Any:
        """Run `fn(*args)` on the worker thread (after the forward pass in progress, if any)."""
        return await self.worker.run(fn, *args)

    # --- requests ------------------------------------------------------------------------------------------
    def check_capacity(self) -> None:
        """Raise 503 / 429 now if a request would be refused anyway (before its body is read and decoded)."""
        if self.closing or self._queue is None:
            raise ShuttingDown()
        if self._queued >= self.config.max_queue:
            wait = self._queued / self._throughput if self._throughput > 0 else 1.0
            raise QueueFull(f"the queue is full ({self._queued} images waiting)", math.ceil(wait))

    async def predict(
        self, data: bytes | np.ndarray, tasks: list[str], options: PredictOptions, form: str = "json"
    ) -> tuple[dict[str, dict[str, Any]], dict[str, int], tuple[int, int]]:
        """Results of `tasks` for one image file (or its RGB pixels, (H, W, 3) uint8): (per task its JSON-ready
        dict, or with `form="tensors"` its OIP arrays; task version per task; the image's (height, width)). The
        header is checked here (400 at once); the image is decoded on the worker."""
        if isinstance(data, np.ndarray):
            self.preprocess.check_pixels(data)
        else:
            self.preprocess.check(data)
        if form not in RESULT_FORMS:
            raise ValueError(f"form must be one of {list(RESULT_FORMS)}, got {form!r}")
        self.check_capacity()
        assert self._queue is not None
        if options.alpha is not None and not getattr(self.backend, "wise", False):
            raise Unprocessable(
                f"'alpha' needs the torch backend; the {self.backend.name} backend serves each task at one alpha "
                "(export a fixed alpha with MultiTaskModel.add_wise)"
            )
        held = _held(tasks, options)
        self.backend.acquire(held)
        loop = asyncio.get_running_loop()
        now = loop.time()
        timeout = options.timeout_s if options.timeout_s is not None else self.config.timeout_s
        request = _Request(data, tasks, options, loop.create_future(), now, now + timeout, form)
        self._queued += 1
        self._pending += 1
        self._peak = max(self._peak, self._pending)
        self.metrics.queue_depth.set(self._queued)
        self._queue.put_nowait(request)
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except asyncio.TimeoutError:
            request.future.cancel()
            raise RequestTimeout(f"no result within {timeout:g} s (queue + forward)") from None
        except asyncio.CancelledError:  # the client went away: skip the request if its batch has not started
            request.future.cancel()
            raise
        finally:
            self._pending -= 1
            self.backend.release(held)
            elapsed = loop.time() - now
            for task in tasks:
                self.metrics.task_latency.labels(task).observe(elapsed)

    # --- batching ------------------------------------------------------------------------------------------
    async def _next_batch(self, running: asyncio.Future | None) -> list[_Request] | None:
        """Requests for the next forward pass (None: stop).

        The first request to come, then every request already waiting; while the previous batch still runs
        (`running`), everything that arrives until it ends; on an idle worker, more for at most `max_wait_ms`
        while fewer than the requests seen in flight at once during the last forward pass.
        """
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = self._carry.popleft() if self._carry else await self._queue.get()
        if first is None:
            return None
        target = min(self.config.max_batch, self._peak)
        batch, names = [first], set(first.tasks)
        self._forming = batch
        cap = self.backend.max_tasks
        deadline = loop.time() + self.config.max_wait_ms / 1000
        item: _Request | None
        while len(batch) < self.config.max_batch:
            if self._carry:
                item = self._carry.popleft()
            elif not self._queue.empty():
                item = self._queue.get_nowait()
            elif running is not None and not running.done():  # the worker is busy: collect until it is free
                getter = asyncio.ensure_future(self._queue.get())
                await asyncio.wait({getter, running}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()  # the item, if one arrives now, stays in the queue
                    break
                item = getter.result()
            else:
                remaining = deadline - loop.time()
                if running is not None or remaining <= 0 or len(batch) >= target:
                    break  # (a worker that just finished a batch starts the next one at once)
                try:
                    item = await asyncio.wait_for(self._queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
            if item is None:
                self._queue.put_nowait(None)  # stop after this batch
                break
            if cap is not None and len(self.backend.footprint(names | set(item.tasks))) > cap:
                self._carry.appendleft(item)  # its tasks would not fit in the model next to this batch's
                break
            batch.append(item)
            names |= set(item.tasks)
        return batch

    async def _batcher(self) -> None:
        """Forms the next batch while the current one runs; one forward pass at a time."""
        running: asyncio.Task | None = None
        try:
            while True:
                batch = await self._next_batch(running)
                if running is not None:
                    await running
                    running = None
                if batch is None:
                    return
                self._queued -= len(batch)
                self.metrics.queue_depth.set(self._queued)
                now = asyncio.get_running_loop().time()
                live = []
                for req in batch:
                    if req.future.done():  # timed out or the client went away
                        continue
                    if now > req.deadline:
                        req.future.set_exception(RequestTimeout("timed out in the queue"))
                        continue
                    live.append(req)
                self._forming = []
                if live:
                    self._current = live
                    self._peak = self._pending
                    running = asyncio.create_task(self._run_guarded(live))
        finally:
            if running is not None:
                running.cancel()

    async def _run_guarded(self, batch: list[_Request]) -> None:
        try:
            await self._run(batch)
        except asyncio.CancelledError:
            raise
        except Exception:  # never let the batcher die
            log.exception("batch failed outside the forward pass")
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(ServingError("internal error while running the batch"))
        finally:
            if self._current is batch:
                self._current = []

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
            if req.future.done():
                continue
            if isinstance(result, BaseException):
                req.future.set_exception(result)
            else:
                req.future.set_result(result)

    async def _forward(self, batch: list[_Request]) -> list[Any]:
        async with self.backend.prepare(
            list(dict.fromkeys(t for r in batch for t in _held(r.tasks, r.options)))
        ) as formats:
            return await self.run_in_worker(self._run_backend, batch, formats)

    def _run_backend(self, batch: list[_Request], formats: dict[str, TaskFormat]) -> list[Any]:
        """On the worker (every torch op of the server runs on this one thread): decoding, the forward pass and the
        JSON form of every result; per request its (results, versions, image size), or the error of its image."""
        # decoding here, not on request threads, keeps it from competing with the forward pass for the cores
        decoded: list[tuple[torch.Tensor, tuple[int, int]] | BadRequest] = []
        for req in batch:
            try:
                image, original = self.preprocess.decode(req.data)
                if req.options.mask_format == "list" and original[0] * original[1] > MAX_LIST_MASK_PIXELS:
                    raise BadRequest(
                        f"mask_format 'list' is limited to {MAX_LIST_MASK_PIXELS} pixels (image "
                        f"{original[1]}x{original[0]}); use the default 'png'"
                    )
                decoded.append((image, original))
            except BadRequest as e:  # a truncated or corrupt image: that request alone fails
                decoded.append(e)
        good = [k for k, d in enumerate(decoded) if not isinstance(d, BadRequest)]
        out: list[Any] = list(decoded)
        if not good:
            return out
        images = torch.stack([decoded[k][0] for k in good])
        size = self.preprocess.size
        wise = [(batch[k].options.alpha, batch[k].options.wise_reference) for k in good]
        asked = [batch[k].tasks for k in good]
        if all(a is None for a, _ in wise):  # (backends without WiSE take two arguments)
            raw = self.backend.run(images, asked)
        else:
            raw = self.backend.run(images, asked, wise)
        for k, per_image in zip(good, raw, strict=True):
            req, original = batch[k], decoded[k][1]
            results = {
                t: format_result(
                    req.form,
                    formats[t].kind,
                    per_image[t],
                    JsonContext(size, original, req.options, formats[t].class_names),
                )
                for t in req.tasks
            }
            out[k] = (results, {t: formats[t].version for t in req.tasks}, original)
        return out


def _held(tasks: list[str], options: PredictOptions) -> list[str]:
    """The tasks a request keeps resident: its own and its WiSE reference."""
    ref = options.wise_reference
    return tasks if ref is None or ref in tasks else [*tasks, ref]
