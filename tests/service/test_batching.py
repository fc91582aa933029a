"""The dynamic batcher's K concurrent batches (LGG_BATCH_CONCURRENCY) and their default."""

import asyncio
import os
import threading

import pytest

from app.core.batching import DynamicBatcher, ShuttingDown, batch_concurrency
from app.core.config import Settings
from app.core.deadline import UNLIMITED, Deadline
from app.core.pipeline import ModelOutput, PreparedSlice
from tests.service.test_pipeline import FakePipeline, one_pixel

CPU = ["CPUExecutionProvider"]


class OverlapCounter(FakePipeline):
    """Counts how many batches are in the networks at once."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.lock = threading.Lock()
        self.running = 0
        self.most_at_once = 0

    def run_models(self, prepared: list[PreparedSlice], deadline: Deadline = UNLIMITED) -> list[ModelOutput]:
        with self.lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return super().run_models(prepared, deadline)
        finally:
            with self.lock:
                self.running -= 1


def run_requests(concurrency: int, requests: list[list[int]], max_batch_size: int) -> OverlapCounter:
    async def scenario() -> OverlapCounter:
        fake = OverlapCounter(seconds=0.2)
        batcher = DynamicBatcher(fake, max_batch_size, max_wait_ms=0, concurrency=concurrency)
        results = await asyncio.gather(*(batcher.predict([one_pixel(v) for v in r]) for r in requests))
        await batcher.stop()
        assert [[p.tumor_probability for p in r] for r in results] == [[float(v) for v in r] for r in requests]
        return fake

    return asyncio.run(scenario())


@pytest.mark.parametrize("concurrency", [1, 2, 3])
def test_up_to_k_batches_run_at_once(concurrency: int) -> None:
    fake = run_requests(concurrency, [[i] for i in range(6)], max_batch_size=1)
    assert fake.most_at_once == concurrency
    assert sorted(fake.batches) == [1] * 6


def test_one_large_request_is_spread_over_idle_threads() -> None:
    """A request queues more slices than one batch holds: a second thread takes the rest at once."""
    fake = run_requests(2, [[1, 2, 3, 4]], max_batch_size=2)
    assert fake.batches == [2, 2] and fake.most_at_once == 2


def test_stopping_fails_every_batch_in_the_networks() -> None:
    async def scenario() -> list[object]:
        fake = OverlapCounter(seconds=0.3)
        batcher = DynamicBatcher(fake, max_batch_size=1, max_wait_ms=0, concurrency=2)
        waiting = [asyncio.ensure_future(batcher.predict([one_pixel(i)])) for i in range(3)]
        while fake.running < 2:
            await asyncio.sleep(0.01)
        await batcher.stop()
        return await asyncio.gather(*waiting, return_exceptions=True)

    assert all(isinstance(o, ShuttingDown) for o in asyncio.run(scenario()))


def test_default_concurrency_two_per_onnx_runtime_core_on_cpu_two_elsewhere() -> None:
    cores = len(os.sched_getaffinity(0))
    assert batch_concurrency(Settings(), CPU) == 2 * cores
    assert batch_concurrency(Settings(intra_op_threads=3), CPU) == 6
    assert batch_concurrency(Settings(), ["CUDAExecutionProvider", "CPUExecutionProvider"]) == 2
    assert batch_concurrency(Settings(), ["triton:localhost:8001/lgg_classifier"]) == 2
    assert batch_concurrency(Settings(batch_concurrency=5), CPU) == 5
