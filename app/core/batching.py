"""How slices reach the pipeline: gathered into batches (DynamicBatcher) or one request at a time (DirectRunner).

Both runners cost a request the same single trip to the thread pool: there the request prepares its slices,
(batching) hands them to the inference thread and blocks until its outputs are back, then resizes its masks.
The event loop never takes part in a batch. The first design ran the batcher as an asyncio task that
handed each batch to an executor and back, three loop <-> thread trips per request and two per batch; under
load every trip waits for the GIL and the busy event loop, so batches stayed at ~2 slices and throughput
fell below running without batching (docs/benchmarks.md has the measurement).

DynamicBatcher works like Triton's dynamic batcher: one inference thread takes up to max_batch_size queued
slices per network call, waiting at most max_wait_ms (counted from the oldest slice's arrival) for a batch
to fill. Slices that arrive while a batch runs form the next one, so a busy service batches without waiting.
"""

import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from app.core.deadline import UNLIMITED, Deadline
from app.core.pipeline import ModelOutput, Pipeline, PreparedSlice, SlicePrediction


class ShuttingDown(RuntimeError):
    """The service stopped before this slice was processed."""


class InferenceRunner(Protocol):
    async def predict(self, slices: list[np.ndarray], deadline: Deadline = UNLIMITED) -> list[SlicePrediction]: ...

    async def stop(self) -> None: ...


class DirectRunner:
    """No batching: each request runs its own slices in Starlette's thread pool."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def predict(self, slices: list[np.ndarray], deadline: Deadline = UNLIMITED) -> list[SlicePrediction]:
        return await run_in_threadpool(self.pipeline.predict_batch, slices, deadline)

    async def stop(self) -> None:
        pass


@dataclass
class _Pending:
    prepared: PreparedSlice
    deadline: Deadline
    future: Future[ModelOutput] = field(default_factory=Future)
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
        self.changed = threading.Condition()  # guards pending, in_flight and stopping
        # One thread: ONNX Runtime already spreads one call over all cores.
        self.worker = threading.Thread(target=self._work, name="dynamic-batcher", daemon=True)
        self.worker.start()

    async def predict(self, slices: list[np.ndarray], deadline: Deadline = UNLIMITED) -> list[SlicePrediction]:
        return await run_in_threadpool(self._predict, slices, deadline)

    def _predict(self, slices: list[np.ndarray], deadline: Deadline) -> list[SlicePrediction]:
        prepared = self.pipeline.prepare_all(slices, deadline)
        pending = [_Pending(p, deadline) for p in prepared]
        with self.changed:
            if self.stopping:  # nobody would take these slices any more
                raise ShuttingDown("the service is shutting down")
            self.pending.extend(pending)
            self.changed.notify()
        wait([p.future for p in pending])  # each slice computed or dropped: only then has this request's work ended
        outputs = [p.future.result() for p in pending]
        return self.pipeline.finish_all(prepared, outputs, deadline)

    async def stop(self) -> None:
        """Fail what waits (the batch in the networks too) with ShuttingDown; the thread ends after that batch."""
        with self.changed:
            self.stopping = True
            waiting, self.pending = [*self.in_flight, *self.pending], deque()
            self.changed.notify()
        for pending in waiting:
            pending.future.set_exception(ShuttingDown("the service is shutting down"))

    def _next_batch(self) -> list[_Pending]:
        """Up to max_batch_size slices, once the batch is full or the oldest has waited max_wait; [] when stopping."""
        with self.changed:
            self._drop_expired()
            while not self.pending and not self.stopping:
                self.changed.wait()
                self._drop_expired()
            if self.pending:
                deadline = self.pending[0].enqueued + self.max_wait_s
                while (
                    len(self.pending) < self.max_batch_size
                    and not self.stopping
                    and (remaining := deadline - time.monotonic()) > 0
                ):
                    self.changed.wait(remaining)
            if self.stopping:
                return []
            self.in_flight = [self.pending.popleft() for _ in range(min(self.max_batch_size, len(self.pending)))]
            return self.in_flight

    def _drop_expired(self) -> None:
        """Slices whose request ran out of time are not computed: their requests end with DeadlineExceeded."""
        expired = [p for p in self.pending if p.deadline.remaining() <= 0]
        for pending in expired:
            self.pending.remove(pending)
            pending.future.set_exception(pending.deadline.exceeded())

    def _work(self) -> None:
        while batch := self._next_batch():
            started = time.monotonic()
            if self.on_queue_wait is not None:
                for pending in batch:
                    self.on_queue_wait(started - pending.enqueued)
            try:
                outputs = self.pipeline.run_models([p.prepared for p in batch])
            except Exception as error:  # handed to the waiting requests, which report it; the worker lives on
                self._resolve(batch, [error] * len(batch))
                continue
            self._resolve(batch, outputs)

    def _resolve(self, batch: list[_Pending], results: list[ModelOutput] | list[Exception]) -> None:
        """Each future is resolved once: here, or by stop() if it took in_flight first."""
        with self.changed:
            if self.stopping:
                return
            self.in_flight = []
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
