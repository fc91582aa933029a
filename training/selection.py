"""Thresholds chosen on validation patients, and the pipeline's masks under those thresholds.

Used by `evaluate` (validation patients of the single split) and by `cv` (inner validation patients inside
each fold's training patients), so out-of-fold or test patients never choose anything.
"""

from dataclasses import dataclass

import numpy as np

from app.core.postprocessing import keep_largest_component, slice_mask, tumor_probability
from training.metrics import per_volume_dice, threshold_for_sensitivity

SEGMENTER_THRESHOLDS = tuple(float(t) for t in np.round(np.arange(0.1, 0.71, 0.05), 2))
MIN_COMPONENT_PIXELS = (0, 4, 8, 16, 32, 64)  # at the model's input size (4x as many source pixels at 128 -> 256)


@dataclass(frozen=True)
class Thresholds:
    classifier: float
    segmenter: float
    min_component_pixels: int


@dataclass(frozen=True)
class Outputs:
    """One model's outputs on some slices of the cache."""

    indices: np.ndarray  # (N,) slice indices into the cache
    classifier_probability: np.ndarray  # (N,)
    probability_maps: np.ndarray  # (N, S, S) segmenter, at model size
    # (N,) each map's highest probability when the maps were stored quantized (cv's outputs.npz): the detection
    # score ranks slices by it down to probabilities far below the quantization step. None: the maps' own maxima.
    stored_peaks: np.ndarray | None = None

    @property
    def segmenter_peak(self) -> np.ndarray:
        if self.stored_peaks is not None:
            return self.stored_peaks.astype(np.float32)
        return self.probability_maps.reshape(len(self.indices), -1).max(axis=1).astype(np.float32)


def largest_component_per_patient(masks: np.ndarray, patients: np.ndarray, numbers: np.ndarray) -> np.ndarray:
    """The series routes' `largest_component` option on pooled slices: each patient's slices stacked in order."""
    kept = masks.copy()
    for patient in np.unique(patients):
        rows = np.flatnonzero(patients == patient)
        rows = rows[np.argsort(numbers[rows])]
        kept[rows] = keep_largest_component(masks[rows])
    return kept


def reported_probability(outputs: Outputs, classifier_threshold: float) -> np.ndarray:
    """The service's tumor_probability under the card's BOTH_NETWORKS rule: the segmenter's evidence
    counts where the service runs it (classifier >= its threshold), though the outputs hold every slice's map."""
    classifier = outputs.classifier_probability.astype(np.float32)
    return tumor_probability(classifier, outputs.segmenter_peak, classifier >= classifier_threshold)


def pipeline_masks(
    outputs: Outputs, shape: tuple[int, int], thresholds: Thresholds, classify: bool = True
) -> np.ndarray:
    """The service's masks at source size (app.core.postprocessing's rule); `classify=False`: segmenter alone."""
    masks = np.zeros((len(outputs.indices), *shape), dtype=bool)
    flagged = outputs.classifier_probability >= thresholds.classifier if classify else np.ones(len(masks), dtype=bool)
    for i in np.flatnonzero(flagged):
        masks[i] = slice_mask(
            outputs.probability_maps[i].astype(np.float32),
            *shape,
            thresholds.segmenter,
            thresholds.min_component_pixels,
        )
    return masks


def mean_volume_dice(masks: np.ndarray, truths: np.ndarray, patients: np.ndarray) -> float:
    return float(np.mean(list(per_volume_dice(masks, truths, patients).values())))


def choose_thresholds(
    outputs: Outputs,
    truths: np.ndarray,
    patients: np.ndarray,
    sensitivity: float,
    component_sizes: tuple[int, ...] = MIN_COMPONENT_PIXELS,
) -> tuple[Thresholds, dict[str, dict[str, float]]]:
    """On validation slices: the classifier's highest threshold with sensitivity >= `sensitivity` (a missed
    tumor costs more than a false alarm), then the segmenter threshold, then the smallest component kept (among
    `component_sizes`; `(0,)` keeps every component), each maximizing mean per-volume Dice of the pipeline.
    Returns the thresholds and both sweeps."""
    labels = truths.reshape(len(truths), -1).any(axis=1)
    classifier = threshold_for_sensitivity(outputs.classifier_probability, labels, sensitivity)
    shape = truths.shape[1:]

    def score(segmenter: float, min_pixels: int) -> float:
        masks = pipeline_masks(outputs, shape, Thresholds(classifier, segmenter, min_pixels))
        return mean_volume_dice(masks, truths, patients)

    segmenter_sweep = {str(t): score(t, 0) for t in SEGMENTER_THRESHOLDS}
    segmenter = float(max(segmenter_sweep, key=segmenter_sweep.get))
    component_sweep = {str(m): score(segmenter, m) for m in component_sizes}
    min_pixels = int(max(component_sweep, key=component_sweep.get))  # first maximum: the smallest size
    sweeps = {"segmenter_threshold": segmenter_sweep, "min_component_pixels": component_sweep}
    return Thresholds(classifier, segmenter, min_pixels), sweeps
