"""decode -> preprocess -> classify -> segment (only where a tumor is detected) -> postprocess -> encode.

`Pipeline.predict_batch` is the whole model path for 8-bit slices, without HTTP: the service,
the benchmarks and other routes call it the same way. It runs in three steps so the dynamic
batcher can keep its one inference thread on the networks alone, while per-slice work runs beside it:
  prepare()     one slice  -> network input (the shared preprocess_slice)
  run_models()  many slices -> classifier on all, segmenter on the flagged ones, in batches; the reported
                tumor_probability (the card's rule: both networks' evidence, or the classifier's alone)
  finish()      one slice  -> boolean mask at the input's own size (app.core.postprocessing's rule:
                tumor_detected exactly when that mask is non-empty)
Each step takes the request's Deadline (app.core.deadline) and checks it between slices and between batches.
Decoding and encoding live in app.core.codecs.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from app.core.deadline import UNLIMITED, Deadline
from app.core.onnx_sessions import LoadedModels
from app.core.postprocessing import BOTH_NETWORKS, slice_mask, tumor_probability
from app.core.preprocessing import preprocess_slice


@dataclass(frozen=True)
class PreparedSlice:
    image: np.ndarray  # (3, S, S) float32 network input
    height: int
    width: int
    preprocess_s: float


@dataclass(frozen=True)
class BatchTimings:
    """One batch: how many slices went through each network and how long each call took."""

    batch_size: int
    segmented: int
    classifier_s: float
    segmenter_s: float


@dataclass(frozen=True)
class ModelOutput:
    tumor_probability: float  # the reported one, under the card's postprocessing.tumor_probability rule
    classifier_probability: float
    tumor_probability_map: np.ndarray | None  # (S, S) at model size; only where the classifier flagged the slice
    batch: BatchTimings


@dataclass(frozen=True)
class SlicePrediction:
    tumor_probability: float
    classifier_probability: float  # the segmenter ran on this slice exactly when it is >= the classifier threshold
    tumor_detected: bool  # exactly when mask is not None (it then has at least one pixel)
    # Boolean mask at the input slice's own size; None when no tumor was found.
    mask: np.ndarray | None
    batch: BatchTimings
    preprocess_s: float
    postprocess_s: float


class Pipeline:
    def __init__(
        self,
        models: LoadedModels,
        max_batch_size: int = 16,
        on_batch: Callable[[BatchTimings], None] | None = None,
    ) -> None:
        self.models = models
        self.max_batch_size = max_batch_size
        self.on_batch = on_batch  # e.g. the service's metrics
        self.input_size = models.card.input_size
        self.classifier_threshold = models.card.classifier.threshold
        self.segmenter_threshold = models.card.segmenter.threshold
        postprocessing = models.card.card.postprocessing
        self.min_component_pixels = (postprocessing and postprocessing.min_component_pixels) or 0
        self.combine_evidence = postprocessing is not None and postprocessing.tumor_probability == BOTH_NETWORKS

    def predict_batch(self, slices: list[np.ndarray], deadline: Deadline = UNLIMITED) -> list[SlicePrediction]:
        """8-bit slices (HxW FLAIR or HxWx3 in dataset channel order, any size) -> one prediction each, in order.

        Runs the networks in batches of at most max_batch_size slices.
        """
        prepared = self.prepare_all(slices, deadline)
        return self.finish_all(prepared, self.run_models(prepared, deadline), deadline)

    def prepare_all(self, slices: list[np.ndarray], deadline: Deadline) -> list[PreparedSlice]:
        return [self.prepare(s) for s in deadline.each(slices, "preprocessing")]

    def prepare(self, slice_: np.ndarray) -> PreparedSlice:
        started = time.perf_counter()
        image = preprocess_slice(slice_, self.input_size)
        height, width = slice_.shape[:2]
        return PreparedSlice(image, height, width, time.perf_counter() - started)

    def run_models(self, prepared: list[PreparedSlice], deadline: Deadline = UNLIMITED) -> list[ModelOutput]:
        outputs: list[ModelOutput] = []
        for start in deadline.each(range(0, len(prepared), self.max_batch_size), "inference"):
            outputs += self._run_batch(np.stack([p.image for p in prepared[start : start + self.max_batch_size]]))
        return outputs

    def _run_batch(self, images: np.ndarray) -> list[ModelOutput]:
        started = time.perf_counter()
        classifier_probabilities = self.models.classifier.run(images)[:, 0]
        detected = classifier_probabilities >= self.classifier_threshold
        classified = time.perf_counter()
        # The segmenter only sees slices the classifier flagged: most slices of a volume are tumor-free.
        maps: list[np.ndarray | None] = [None] * len(images)
        peaks = np.zeros(len(images), dtype=np.float32)
        if detected.any():
            flagged_maps = self.models.segmenter.run(images[detected])[:, 0]
            peaks[detected] = flagged_maps.reshape(len(flagged_maps), -1).max(axis=1)
            for index, probability_map in zip(np.flatnonzero(detected), flagged_maps, strict=True):
                maps[index] = probability_map
        timings = BatchTimings(len(images), int(detected.sum()), classified - started, time.perf_counter() - classified)
        if self.on_batch is not None:
            self.on_batch(timings)
        reported = (
            tumor_probability(classifier_probabilities, peaks, detected)
            if self.combine_evidence
            else classifier_probabilities
        )
        return [
            ModelOutput(float(r), float(c), m, timings)
            for r, c, m in zip(reported, classifier_probabilities, maps, strict=True)
        ]

    def finish_all(
        self, prepared: list[PreparedSlice], outputs: list[ModelOutput], deadline: Deadline
    ) -> list[SlicePrediction]:
        return [self.finish(p, o) for p, o in deadline.each(zip(prepared, outputs, strict=True), "postprocessing")]

    def finish(self, prepared: PreparedSlice, output: ModelOutput) -> SlicePrediction:
        started = time.perf_counter()
        mask = None
        if output.tumor_probability_map is not None:
            mask = slice_mask(
                output.tumor_probability_map,
                prepared.height,
                prepared.width,
                self.segmenter_threshold,
                self.min_component_pixels,
            )
        if mask is not None and not mask.any():
            mask = None  # the classifier's yes without a single mask pixel is a no: flag, mask and area agree
        return SlicePrediction(
            output.tumor_probability,
            output.classifier_probability,
            mask is not None,
            mask,
            output.batch,
            prepared.preprocess_s,
            time.perf_counter() - started,
        )
