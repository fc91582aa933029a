"""The model path without HTTP: Pipeline.predict_batch and the dynamic batcher."""

import asyncio
import time
from pathlib import Path

import numpy as np
import pytest

from app.core.batching import DirectRunner, DynamicBatcher, ShuttingDown
from app.core.config import Settings
from app.core.deadline import UNLIMITED, Deadline
from app.core.onnx_sessions import LoadedModels, load_models, read_model_card
from app.core.pipeline import BatchTimings, ModelOutput, Pipeline, PreparedSlice, SlicePrediction
from app.core.postprocessing import slice_mask
from tests.service.conftest import segmenter_map, synthetic_slice


@pytest.fixture(scope="module")
def models(bundled_models_dir: Path) -> LoadedModels:
    settings = Settings(model_dir=bundled_models_dir, providers="CPUExecutionProvider", warmup_runs=0)
    return load_models(read_model_card(bundled_models_dir), settings)


def slices_of_many_sizes() -> list[np.ndarray]:
    return [
        synthetic_slice(256, 256, seed=1),
        synthetic_slice(512, 384, seed=2),
        synthetic_slice(97, 140, seed=3)[..., 1],  # single-channel FLAIR
        synthetic_slice(128, 128, seed=4),
        np.zeros((64, 64, 3), np.uint8),  # a blank end-of-volume slice
    ]


def test_batched_results_equal_one_by_one_results(models: LoadedModels) -> None:
    pipeline = Pipeline(models, max_batch_size=8)
    pipeline.classifier_threshold = 0.0  # segment every slice so masks are compared too
    slices = slices_of_many_sizes()
    batched = pipeline.predict_batch(slices)
    assert sum(p.mask is not None for p in batched) >= 3  # most slices get a mask to compare
    for image, together in zip(slices, batched, strict=True):
        [alone] = pipeline.predict_batch([image])
        assert together.tumor_probability == pytest.approx(alone.tumor_probability, abs=1e-5)
        assert (together.mask is None) == (alone.mask is None)  # no pixel: no mask (the consistency rule)
        if together.mask is not None:
            assert together.mask.shape == image.shape[:2] and (together.mask != alone.mask).mean() < 1e-3


def test_mask_is_the_shared_postprocessing_of_the_segmenter_map(models: LoadedModels, bundled_models_dir: Path) -> None:
    pipeline = Pipeline(models)
    pipeline.classifier_threshold = 0.0
    image = synthetic_slice(300, 220)
    probability_map = segmenter_map(bundled_models_dir, image)
    pipeline.segmenter_threshold = float(np.median(probability_map))
    [prediction] = pipeline.predict_batch([image])
    # the card's minimum component size applies too (scaled to the slice's size)
    expected = slice_mask(probability_map, 300, 220, pipeline.segmenter_threshold, pipeline.min_component_pixels)
    assert 0 < expected.sum() < expected.size
    np.testing.assert_array_equal(prediction.mask, expected)


@pytest.mark.parametrize("rule", ["classifier_and_segmenter_peak", "classifier"])
def test_reported_probability_follows_the_cards_rule(models: LoadedModels, bundled_models_dir: Path, rule: str) -> None:
    image = np.zeros((64, 64, 3), np.uint8)  # both networks well below 1, so the two rules differ
    peak = float(segmenter_map(bundled_models_dir, image).max())
    pipeline = Pipeline(models)
    pipeline.combine_evidence = rule == "classifier_and_segmenter_peak"
    pipeline.classifier_threshold = 0.0  # the segmenter runs
    [segmented] = pipeline.predict_batch([image])
    expected = np.sqrt(segmented.classifier_probability * peak) if pipeline.combine_evidence else None
    assert segmented.tumor_probability == pytest.approx(expected or segmented.classifier_probability, rel=1e-5)
    assert expected is None or abs(expected / segmented.classifier_probability - 1) > 0.1
    pipeline.classifier_threshold = 1.01  # the segmenter does not run: the classifier's probability alone
    [not_segmented] = pipeline.predict_batch([image])
    assert not_segmented.tumor_probability == not_segmented.classifier_probability == segmented.classifier_probability


def test_segmenter_runs_only_on_slices_the_classifier_flags(models: LoadedModels) -> None:
    seen: list[int] = []
    run = models.segmenter.run
    slices = slices_of_many_sizes()

    class CountingSegmenter:
        def run(self, images: np.ndarray) -> np.ndarray:
            seen.append(len(images))
            return run(images)

    counting = LoadedModels(models.card, models.classifier, CountingSegmenter())
    pipeline = Pipeline(counting)
    pipeline.classifier_threshold = 1.01  # nothing is a tumor
    predictions = pipeline.predict_batch(slices)
    assert seen == []
    assert all(p.mask is None and not p.tumor_detected for p in predictions)

    probabilities = [p.classifier_probability for p in predictions]
    pipeline.classifier_threshold = float(np.median(probabilities))
    predictions = pipeline.predict_batch(slices)
    flagged = [p.classifier_probability >= pipeline.classifier_threshold for p in predictions]
    assert seen == [sum(flagged)]
    assert [p.mask is not None for p in predictions] == flagged == [p.tumor_detected for p in predictions]


def test_large_inputs_run_in_chunks_of_max_batch_size(models: LoadedModels) -> None:
    batches: list[BatchTimings] = []
    pipeline = Pipeline(models, max_batch_size=4, on_batch=batches.append)
    predictions = pipeline.predict_batch([synthetic_slice(64, 64, seed=i) for i in range(10)])
    assert len(predictions) == 10
    assert [b.batch_size for b in batches] == [4, 4, 2]
    assert all(b.classifier_s > 0 for b in batches)


class FakePipeline(Pipeline):
    """Records the batches the networks would get; a slice's probability is its own first pixel."""

    def __init__(self, seconds: float = 0.02, fail_on: int | None = None) -> None:  # no models: super() not called
        self.batches: list[int] = []
        self.seconds = seconds
        self.fail_on = fail_on

    def prepare(self, slice_: np.ndarray) -> PreparedSlice:
        return PreparedSlice(slice_, *slice_.shape[:2], preprocess_s=0.0)

    def run_models(self, prepared: list[PreparedSlice], deadline: Deadline = UNLIMITED) -> list[ModelOutput]:
        self.batches.append(len(prepared))
        time.sleep(self.seconds)
        if any(int(p.image.flat[0]) == self.fail_on for p in prepared):
            raise RuntimeError("boom")
        timings = BatchTimings(len(prepared), 0, 0.0, 0.0)
        return [ModelOutput(float(p.image.flat[0]), float(p.image.flat[0]), None, timings) for p in prepared]

    def finish(self, prepared: PreparedSlice, output: ModelOutput) -> SlicePrediction:
        return SlicePrediction(
            output.tumor_probability, output.classifier_probability, False, None, output.batch, 0.0, 0.0
        )


def one_pixel(value: int) -> np.ndarray:
    return np.full((1, 1), value, np.uint8)


def test_dynamic_batcher_gathers_concurrent_requests_in_order() -> None:
    async def scenario() -> tuple[list[list[float]], FakePipeline, list[float]]:
        fake, waits = FakePipeline(), []
        # A wait far longer than the requests' trickle through the thread pool on a loaded machine: batches
        # are cut by size here, not by time.
        batcher = DynamicBatcher(fake, max_batch_size=4, max_wait_ms=500, on_queue_wait=waits.append)
        requests = [batcher.predict([one_pixel(i)]) for i in range(9)]
        requests.append(batcher.predict([one_pixel(9), one_pixel(10)]))
        results = await asyncio.gather(*requests)
        await batcher.stop()
        return [[p.tumor_probability for p in r] for r in results], fake, waits

    results, fake, waits = asyncio.run(scenario())
    assert results == [[float(i)] for i in range(9)] + [[9.0, 10.0]]
    assert sum(fake.batches) == 11
    assert max(fake.batches) == 4 and len(fake.batches) == 3
    assert len(waits) == 11 and all(w >= 0 for w in waits)


def test_dynamic_batcher_waits_max_wait_for_a_lone_request() -> None:
    async def scenario() -> tuple[float, list[int]]:
        fake = FakePipeline(seconds=0)
        batcher = DynamicBatcher(fake, max_batch_size=64, max_wait_ms=30)
        started = time.monotonic()
        await batcher.predict([one_pixel(1)])
        elapsed = time.monotonic() - started
        await batcher.stop()
        return elapsed, fake.batches

    elapsed, batches = asyncio.run(scenario())
    assert elapsed >= 0.025
    assert batches == [1]


def test_a_failing_batch_fails_its_requests_and_the_worker_lives_on() -> None:
    async def scenario() -> tuple[list[object], list[SlicePrediction]]:
        batcher = DynamicBatcher(FakePipeline(fail_on=7), max_batch_size=2, max_wait_ms=5)
        first = await asyncio.gather(batcher.predict([one_pixel(7)]), return_exceptions=True)
        after = await batcher.predict([one_pixel(3)])
        await batcher.stop()
        return first, after

    first, after = asyncio.run(scenario())
    assert isinstance(first[0], RuntimeError)
    assert after[0].tumor_probability == 3.0


def test_stopping_fails_waiting_requests_with_shutting_down() -> None:
    async def scenario() -> list[object]:
        fake = FakePipeline(seconds=0.2)
        batcher = DynamicBatcher(fake, max_batch_size=1, max_wait_ms=0)
        waiting = [asyncio.ensure_future(batcher.predict([one_pixel(i)])) for i in range(3)]
        while not fake.batches:  # the first slice is in the networks, the others queue or are being prepared
            await asyncio.sleep(0.01)
        await batcher.stop()
        outcome = await asyncio.gather(*waiting, return_exceptions=True)
        with pytest.raises(ShuttingDown):
            await batcher.predict([one_pixel(1)])
        return outcome

    assert all(isinstance(o, ShuttingDown) for o in asyncio.run(scenario()))


def test_direct_runner_runs_each_request_alone() -> None:
    async def scenario() -> FakePipeline:
        fake = FakePipeline()
        runner = DirectRunner(fake)
        await asyncio.gather(*(runner.predict([one_pixel(i)]) for i in range(5)))
        return fake

    assert asyncio.run(scenario()).batches == [1] * 5
