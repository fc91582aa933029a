"""How slices reach the pipeline: gathered into batches (DynamicBatcher) or one request at a time (DirectRunner).

Both runners cost a request the same single trip to the thread pool: there the request prepares its slices,
(batching) hands them to the inference threads and blocks until its outputs are back, then resizes its masks.
The event loop never takes part in a batch. The first design ran the batcher as an asyncio task that
handed each batch to an executor and back, three loop <-> thread trips per request and two per batch; under
load every trip waits for the GIL and the busy event loop, so batches stayed at ~2 slices and throughput
fell below running without batching (docs/benchmarks.md has the measurement).

DynamicBatcher works like Triton's dynamic batcher with an instance count: `concurrency` inference threads
take up to max_batch_size queued slices per network call each, waiting at most max_wait_ms (counted from
the oldest slice's arrival) for a batch to fill. Slices that arrive while every thread runs a batch form
the next one, so a busy service batches without waiting.
"""

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from starlette.concurrency import run_in_threadpool

from app.core.config import Settings
from app.core.deadline import UNLIMITED, Deadline
from app.core.pipeline import ModelOutput, Pipeline, PreparedSlice, SlicePrediction


class ShuttingDown(RuntimeError):
    """The service stopped before this slice was processed."""


def batch_concurrency(settings: Settings, providers: list[str]) -> int:
    """LGG_BATCH_CONCURRENCY, or the default for where the networks run (providers: the classifier's session's).

    On the CPU, two batches per core ONNX Runtime is given (LGG_INTRA_OP_THREADS, or all cores): the kernel
    shares a busy CPU per runnable thread, and a batcher with fewer threads in the networks than the requests
    it serves got a smaller share than no batching (one thread: 0.40-0.94x of it with two busy processes on
    2 cores; two per core: 0.86-1.24x; docs/benchmarks.md). On an accelerator or Triton, where large batches
    are what is cheap, two: one batch's host work overlaps the other's compute (not measured).
    """
    if settings.batch_concurrency:
        return settings.batch_concurrency
    if providers[0] != "CPUExecutionProvider":
        return 2
    return 2 * (settings.intra_op_threads or len(os.sched_getaffinity(0)))


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


@dataclass(eq=False)  # hashed by identity: in_flight is a set of them
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
        concurrency: int = 1,
        on_queue_wait: Callable[[float], None] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.on_queue_wait = on_queue_wait
        self.pending: deque[_Pending] = deque()
        self.in_flight: set[_Pending] = set()
        self.stopping = False
        self.changed = threading.Condition()  # guards pending, in_flight and stopping
        self.workers = [
            threading.Thread(target=self._work, name=f"dynamic-batcher-{i}", daemon=True) for i in range(concurrency)
        ]
        for worker in self.workers:
            worker.start()

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
        """Fail what waits (the batches in the networks too) with ShuttingDown; each thread ends after its batch."""
        with self.changed:
            self.stopping = True
            waiting, self.pending, self.in_flight = [*self.in_flight, *self.pending], deque(), set()
            self.changed.notify_all()
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
            batch = [self.pending.popleft() for _ in range(min(self.max_batch_size, len(self.pending)))]
            self.in_flight.update(batch)
            if self.pending:  # one request may queue more than a batch: an idle thread can take the rest
                self.changed.notify()
            return batch

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
            self.in_flight.difference_update(batch)
        for pending, result in zip(batch, results, strict=True):
            if isinstance(result, Exception):
                pending.future.set_exception(result)
            else:
                pending.future.set_result(result)
