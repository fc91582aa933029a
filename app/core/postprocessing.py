"""The segmenter's output -> the slice's answer, under one rule that keeps the answer consistent.

The rule: the mask is the segmenter's probability map resized to the slice's own size and thresholded, with
connected components smaller than the card's `min_component_pixels` removed, and it is empty wherever the
classifier is below its threshold (the segmenter does not run there). A slice is `tumor_detected` exactly when
that mask is non-empty, so the flag, the mask, its area and its bounding box always agree. Training's evaluation
and cross-validation apply this same function.

The reported `tumor_probability` weighs both networks' evidence (cards that say `classifier_and_segmenter_peak`):
the geometric mean of the classifier's probability and the segmenter's highest pixel probability where the
segmenter ran; the classifier's probability alone where it did not (that is below the classifier's threshold).
It ranks slices better than the classifier alone (cross-validated ROC AUC in the README).
"""

from typing import Literal

import numpy as np

from app.core.preprocessing import mask_to_input_size

DETECTION_RULE = (
    "tumor_detected = classifier probability >= classifier threshold AND the mask is non-empty, where the mask is "
    "the segmenter's map >= segmenter threshold without components smaller than min_component_pixels"
)
# The card's postprocessing.tumor_probability: which evidence the reported probability holds (null: "classifier").
TumorProbabilityRule = Literal["classifier", "classifier_and_segmenter_peak"]
BOTH_NETWORKS: TumorProbabilityRule = "classifier_and_segmenter_peak"  # tumor_probability() below; export writes it
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
FULL_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)


def tumor_probability(
    classifier_probability: np.ndarray, segmenter_peak: np.ndarray, segmented: np.ndarray
) -> np.ndarray:
    """Per slice: the reported probability under the BOTH_NETWORKS rule."""
    return np.where(segmented, np.sqrt(classifier_probability * segmenter_peak), classifier_probability)


def remove_small_components(mask: np.ndarray, min_pixels: int) -> np.ndarray:
    """A 2-D boolean mask without its 8-connected components of fewer than min_pixels pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    from scipy import ndimage  # imported here: seconds to import, and a mask with pixels is the rare case

    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def scaled_min_pixels(min_component_pixels: int, model_size: int, height: int, width: int) -> int:
    """The card's minimum component size (pixels at the model's input size) at a slice of height x width."""
    return round(min_component_pixels * height * width / model_size**2)


def slice_mask(
    tumor_probability_map: np.ndarray,
    height: int,
    width: int,
    segmenter_threshold: float,
    min_component_pixels: int,
) -> np.ndarray:
    """The mask of one slice the classifier flagged: (S, S) probabilities -> boolean (height, width)."""
    if float(tumor_probability_map.max()) < segmenter_threshold:
        # Bilinear resizing only averages the map's values, so no pixel can reach the threshold: the mask is empty
        # without resizing (most flagged slices are tumor-free; on 298 real slices finish went 0.273 -> 0.236 ms).
        return np.zeros((height, width), dtype=bool)
    mask = mask_to_input_size(tumor_probability_map, height, width, segmenter_threshold)
    min_pixels = scaled_min_pixels(min_component_pixels, tumor_probability_map.shape[-1], height, width)
    return remove_small_components(mask, min_pixels)


def keep_largest_component(masks: np.ndarray) -> np.ndarray:
    """Only the largest 26-connected tumor region across slices (Buda et al.'s 3-D postprocessing)."""
    from scipy import ndimage  # imported here: seconds to import, and only this option needs it

    labels, count = ndimage.label(masks, structure=FULL_CONNECTIVITY)
    if count <= 1:
        return masks
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1
