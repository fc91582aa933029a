"""Detection and segmentation metrics, computed the way the model card reports them.

Dice convention: 1.0 when prediction and truth are both empty, 0.0 when only one is.
"""

import math
from collections.abc import Callable

import numpy as np


def dice_score(prediction: np.ndarray, truth: np.ndarray) -> float:
    prediction, truth = prediction.astype(bool), truth.astype(bool)
    total = int(prediction.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def per_volume_dice(predictions: np.ndarray, truths: np.ndarray, patients: np.ndarray) -> dict[str, float]:
    """Dice of each patient's whole volume (all its slices together), as Buda et al. 2019 report it."""
    return {p: dice_score(predictions[patients == p], truths[patients == p]) for p in sorted(set(patients.tolist()))}


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half)."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs both positive and negative slices")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    # Average ranks over ties.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        ranks[order[start : start + count]] = start + (count + 1) / 2
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def decision_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity and counts of yes/no decisions per slice."""
    predicted, labels = predicted.astype(bool), labels.astype(bool)
    tp, tn = int((predicted & labels).sum()), int((~predicted & ~labels).sum())
    fp, fn = int((predicted & ~labels).sum()), int((~predicted & labels).sum())
    return {
        "sensitivity": tp / max(tp + fn, 1),
        "specificity": tn / max(tn + fp, 1),
        "accuracy": (tp + tn) / len(labels),
        "true_positives": tp,
        "false_positives": fp,
        "true_negatives": tn,
        "false_negatives": fn,
    }


def threshold_for_sensitivity(scores: np.ndarray, labels: np.ndarray, sensitivity: float) -> float:
    """The highest threshold whose sensitivity on these slices is at least `sensitivity`."""
    positives = np.sort(scores[labels.astype(bool)])
    if len(positives) == 0:
        raise ValueError("no positive slices to choose a threshold on")
    allowed_misses = len(positives) - math.ceil(round(len(positives) * sensitivity, 9))
    return float(positives[allowed_misses])


def segmentation_metrics(masks: np.ndarray, truths: np.ndarray, patients: np.ndarray) -> dict:
    """Per-volume Dice (mean, median, per patient) and mean Dice over the slices that have a tumor."""
    volume = per_volume_dice(masks, truths, patients)
    tumor = truths.reshape(len(truths), -1).any(axis=1)
    tumor_slice_dice = [dice_score(m, t) for m, t in zip(masks[tumor], truths[tumor], strict=True)]
    return {
        "patients": len(volume),
        "volume_dice_mean": float(np.mean(list(volume.values()))),
        "volume_dice_median": float(np.median(list(volume.values()))),
        "volume_dice_by_patient": volume,
        "tumor_slices": int(tumor.sum()),
        "tumor_slice_dice_mean": float(np.mean(tumor_slice_dice)),
    }


def bootstrap_interval(
    patients: list[str], statistic: Callable[[list[str]], float], samples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of statistic(patients) over resamples of the patients with replacement.

    Patients, not slices, are resampled: slices of one patient are not independent.
    """
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(samples):
        drawn = [patients[i] for i in rng.integers(0, len(patients), len(patients))]
        try:
            values.append(statistic(drawn))
        except ValueError:  # e.g. a resample with no tumor-free slice has no ROC AUC
            continue
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)
