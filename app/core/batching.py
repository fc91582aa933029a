"""How slices reach the pipeline: gathered into batches (DynamicBatcher) or one request at a time (DirectRunner).

DynamicBatcher works like Triton's dynamic batcher: each request preprocesses its own slices in the
thread pool, then they wait in one queue; a single inference thread takes up to max_batch_size of them
per network call, waiting at most max_wait_ms (counted from the oldest slice's arrival) for a batch to
fill. Slices that arrive while a batch runs form the next one, so a busy service batches without added
wait. Masks are resized back in the thread pool, beside the next batch.
"""

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from app.core.pipeline import ModelOutput, Pipeline, PreparedSlice, SlicePrediction


class ShuttingDown(RuntimeError):
    """The service stopped before this slice was processed."""


class InferenceRunner(Protocol):
    async def predict(self, slices: list[np.ndarray]) -> list[SlicePrediction]: ...

    async def stop(self) -> None: ...


class DirectRunner:
    """No batching: each request runs its own slices in Starlette's thread pool."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def predict(self, slices: list[np.ndarray]) -> list[SlicePrediction]:
        return await run_in_threadpool(self.pipeline.predict_batch, slices)

    async def stop(self) -> None:
        pass


@dataclass
class _Pending:
    prepared: PreparedSlice
    future: asyncio.Future[ModelOutput]
    enqueued: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    def __init__(
        self,
        pipeline: Pipeline,
        max_batch_size: int,
        max_wait_ms: float,
        on_queue_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_queue_wait = on_queue_wait
        self.pending: deque[_Pending] = deque()
        self.in_flight: list[_Pending] = []
        self.stopping = False
        self.arrived = asyncio.Event()
        # One thread: ONNX Runtime already spreads one call over all cores.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self.worker = asyncio.create_task(self._work(), name="dynamic-batcher")

    async def predict(self, slices: list[np.ndarray]) -> list[SlicePrediction]:
        prepared = await run_in_threadpool(lambda: [self.pipeline.prepare(s) for s in slices])
        outputs = await self._queue(prepared)
        return await run_in_threadpool(
            lambda: [self.pipeline.finish(p, o) for p, o in zip(prepared, outputs, strict=True)]
        )

    async def _queue(self, prepared: list[PreparedSlice]) -> list[ModelOutput]:
        if self.stopping:  # nobody would take these slices any more
            raise ShuttingDown("the service is shutting down")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in prepared]
        self.pending.extend(_Pending(p, f) for p, f in zip(prepared, futures, strict=True))
        self.arrived.set()
        return list(await asyncio.gather(*futures))

    async def stop(self) -> None:
        self.stopping = True
        self.worker.cancel()
        await asyncio.gather(self.worker, return_exceptions=True)
        for pending in [*self.in_flight, *self.pending]:
            if not pending.future.done():
                pending.future.set_exception(ShuttingDown("the service is shutting down"))
        self.pending.clear()
        self.executor.shutdown(wait=False)

    async def _next_batch(self) -> list[_Pending]:
        while not self.pending:
            self.arrived.clear()
            await self.arrived.wait()
        deadline = self.pending[0].enqueued + self.max_wait_s
        while len(self.pending) < self.max_batch_size and (remaining := deadline - time.monotonic()) > 0:
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                break
        batch = [self.pending.popleft() for _ in range(min(self.max_batch_size, len(self.pending)))]
        return [p for p in batch if not p.future.done()]  # a cancelled request no longer needs its slice

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self.in_flight = await self._next_batch()
            if not self.in_flight:
                continue
            started = time.monotonic()
            if self.on_queue_wait is not None:
                for pending in self.in_flight:
                    self.on_queue_wait(started - pending.enqueued)
            prepared = [p.prepared for p in self.in_flight]
            try:
                outputs = await loop.run_in_executor(self.executor, self.pipeline.run_models, prepared)
            except Exception as error:  # handed to the waiting requests, which report it; the worker lives on
                for pending in self.in_flight:
                    if not pending.future.done():
                        pending.future.set_exception(error)
                continue
            for pending, output in zip(self.in_flight, outputs, strict=True):
                if not pending.future.done():
                    pending.future.set_result(output)
