"""decode -> preprocess -> classify -> segment (only where a tumor is detected) -> postprocess.

`Pipeline.predict_batch` is the whole model path for 8-bit slices, without HTTP: the service,
the benchmarks and other routes call it the same way. Decoding and encoding live in app.core.codecs.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from app.core.models import LoadedModels
from app.core.preprocessing import mask_to_input_size, preprocess_slice


@dataclass(frozen=True)
class BatchTimings:
    """One ONNX Runtime batch: how many slices went through each model and how long each stage took."""

    batch_size: int
    segmented: int
    preprocess_s: float
    classifier_s: float
    segmenter_s: float
    postprocess_s: float

    @property
    def total_s(self) -> float:
        return self.preprocess_s + self.classifier_s + self.segmenter_s + self.postprocess_s


@dataclass(frozen=True)
class SlicePrediction:
    tumor_probability: float
    tumor_detected: bool
    # Boolean mask at the input slice's own size; None when the classifier found no tumor.
    mask: np.ndarray | None
    batch: BatchTimings


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

    def predict_batch(self, slices: list[np.ndarray]) -> list[SlicePrediction]:
        """8-bit slices (HxW FLAIR or HxWx3 in dataset channel order, any size) -> one prediction each, in order.

        Runs the models in chunks of at most max_batch_size slices.
        """
        predictions: list[SlicePrediction] = []
        for start in range(0, len(slices), self.max_batch_size):
            predictions += self._predict_chunk(slices[start : start + self.max_batch_size])
        return predictions

    def _predict_chunk(self, slices: list[np.ndarray]) -> list[SlicePrediction]:
        t0 = time.perf_counter()
        images = np.stack([preprocess_slice(s, self.input_size) for s in slices])
        t1 = time.perf_counter()
        tumor_probabilities = self.models.classifier.run(images)[:, 0]
        detected = tumor_probabilities >= self.classifier_threshold
        t2 = time.perf_counter()
        # The segmenter only sees slices the classifier flagged: most slices of a volume are tumor-free.
        probability_maps = self.models.segmenter.run(images[detected])[:, 0] if detected.any() else None
        t3 = time.perf_counter()
        masks: list[np.ndarray | None] = [None] * len(slices)
        for map_index, slice_index in enumerate(np.flatnonzero(detected)):
            height, width = slices[slice_index].shape[:2]
            masks[slice_index] = mask_to_input_size(
                probability_maps[map_index], height, width, self.segmenter_threshold
            )
        t4 = time.perf_counter()
        timings = BatchTimings(len(slices), int(detected.sum()), t1 - t0, t2 - t1, t3 - t2, t4 - t3)
        if self.on_batch is not None:
            self.on_batch(timings)
        return [
            SlicePrediction(float(p), bool(d), m, timings)
            for p, d, m in zip(tumor_probabilities, detected, masks, strict=True)
        ]
