"""Losses and metrics against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from training.losses import mask_loss, per_slice_dice_loss, soft_dice_loss, tversky_loss, weighted_bce_loss
from training.metrics import decision_metrics, dice_score, per_volume_dice, roc_auc, threshold_for_sensitivity


def test_dice_by_hand() -> None:
    # |P| = 2, |T| = 2, |P and T| = 1: 2 * 1 / 4.
    assert dice_score(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    assert dice_score(np.array([[1, 1], [1, 0]]), np.array([[1, 1], [1, 0]])) == 1.0
    assert dice_score(np.array([255, 0, 0]), np.array([True, True, False])) == pytest.approx(2 / 3)


def test_dice_with_empty_masks() -> None:
    empty = np.zeros((4, 4), bool)
    some = empty.copy()
    some[1, 1] = True
    assert dice_score(empty, empty) == 1.0  # both empty: agreement
    assert dice_score(some, empty) == 0.0
    assert dice_score(empty, some) == 0.0


def test_per_volume_dice_pools_all_slices_of_a_patient() -> None:
    predictions = np.zeros((4, 2, 2), bool)
    truths = np.zeros((4, 2, 2), bool)
    # Patient A, slice 0: prediction = truth = 3 pixels. Slice 1: one false-positive pixel, empty truth.
    predictions[0].flat[:3] = truths[0].flat[:3] = True
    predictions[1, 0, 0] = True
    # Patient B: both slices empty in prediction and truth.
    patients = np.array(["A", "A", "B", "B"])
    result = per_volume_dice(predictions, truths, patients)
    assert list(result) == ["A", "B"]
    assert result["A"] == pytest.approx(2 * 3 / (4 + 3))  # not the mean of slice Dice (1 + 0) / 2
    assert result["B"] == 1.0


def test_roc_auc_by_hand() -> None:
    # Pairs (positive, negative): (0.35, 0.1) yes, (0.35, 0.4) no, (0.8, *) yes: 3 of 4.
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert roc_auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0


def test_roc_auc_counts_ties_half() -> None:
    # Positives 0.5, 0.9; negatives 0.5, 0.2: pairs 0.5 vs 0.5 tie (0.5), the other three won: 3.5 / 4.
    assert roc_auc(np.array([0.5, 0.5, 0.2, 0.9]), np.array([1, 0, 0, 1])) == 0.875
    assert roc_auc(np.full(6, 0.3), np.array([1, 0, 1, 0, 0, 1])) == 0.5
    # Positives 0.7, 0.7, 0.1; negatives 0.7, 0.1: (0.7: 0.5 + 1) * 2 + (0.1: 0 + 0.5) = 3.5 of 6.
    assert roc_auc(np.array([0.7, 0.7, 0.1, 0.7, 0.1]), np.array([1, 1, 1, 0, 0])) == pytest.approx(3.5 / 6)


def test_roc_auc_needs_both_classes() -> None:
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(np.array([0.1, 0.9]), np.array([1, 1]))


def test_decision_metrics_counts() -> None:
    predicted = np.array([1, 1, 0, 1, 0, 1])
    labels = np.array([1, 1, 1, 0, 0, 0])
    m = decision_metrics(predicted, labels)
    assert (m["true_positives"], m["false_positives"], m["true_negatives"], m["false_negatives"]) == (2, 2, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 3)
    assert m["accuracy"] == pytest.approx(3 / 6)


@pytest.mark.parametrize(
    ("sensitivity", "expected"),
    [(1.0, 0.2), (0.8, 0.4), (0.6, 0.6), (0.5, 0.6), (0.4, 0.8), (0.2, 1.0)],
)
def test_threshold_for_sensitivity_by_hand(sensitivity: float, expected: float) -> None:
    # Five positives 0.2 .. 1.0 and negatives between: sensitivity s allows floor(5 (1 - s)) misses.
    scores = np.array([0.2, 0.4, 0.6, 0.8, 1.0, 0.1, 0.3, 0.5, 0.7])
    labels = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0])
    assert threshold_for_sensitivity(scores, labels, sensitivity) == expected


@pytest.mark.parametrize("positives", [5, 10, 50, 137])
@pytest.mark.parametrize("sensitivity", [0.8, 0.9, 0.97])
def test_threshold_for_sensitivity_is_the_highest_that_reaches_it(positives: int, sensitivity: float) -> None:
    rng = np.random.default_rng(positives)
    scores = rng.random(positives + 40)
    labels = np.arange(len(scores)) < positives
    threshold = threshold_for_sensitivity(scores, labels, sensitivity)
    assert decision_metrics(scores >= threshold, labels)["sensitivity"] >= sensitivity
    higher = np.min(scores[labels & (scores > threshold)], initial=np.inf)
    if np.isfinite(higher):  # the next positive score up already misses the target
        assert decision_metrics(scores >= higher, labels)["sensitivity"] < sensitivity


def test_threshold_for_sensitivity_needs_positives() -> None:
    with pytest.raises(ValueError, match="no positive slices"):
        threshold_for_sensitivity(np.array([0.1, 0.2]), np.array([0, 0]), 0.9)


def test_soft_dice_loss_by_hand() -> None:
    # Logits 0: probability 0.5 on 4 pixels, one target pixel: 1 - (2 * 0.5 + 1) / (2 + 1 + 1) = 0.5.
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5)
    assert mask_loss("batch_dice", logits, target).item() == pytest.approx(0.5 + math.log(2))
    # Confident and right: loss near 0. Confident and wrong: near 1 for Dice.
    assert soft_dice_loss(torch.where(target > 0, 20.0, -20.0), target).item() == pytest.approx(0, abs=1e-6)
    assert soft_dice_loss(torch.where(target > 0, -20.0, 20.0), target).item() == pytest.approx(1 - 1 / 5, abs=1e-6)


def test_soft_dice_loss_over_the_batch_with_empty_slices() -> None:
    # A correct empty prediction on an empty slice costs nothing (smooth term), not a Dice of 0.
    empty = torch.zeros(2, 1, 4, 4)
    assert soft_dice_loss(torch.full_like(empty, -30.0), empty).item() == pytest.approx(0, abs=1e-6)


def test_tversky_loss_costs_a_missed_tumor_pixel_more_than_a_false_one() -> None:
    # 16 tumor pixels; one prediction misses 8 of them, the other adds 8 false ones: Dice cannot tell them apart.
    target = torch.zeros(1, 1, 8, 8)
    target[0, 0, :4, :4] = 1
    under, over = torch.full_like(target, -30.0), torch.full_like(target, -30.0)
    under[0, 0, :2, :4] = 30.0
    over[0, 0, :6, :4] = 30.0
    assert soft_dice_loss(under, target).item() == pytest.approx(1 - 17 / 25, abs=1e-4)
    assert soft_dice_loss(over, target).item() == pytest.approx(1 - 33 / 41, abs=1e-4)
    # Tversky: TP / (TP + 0.3 FP + 0.7 FN), + 1 smoothing on both sides.
    assert tversky_loss(under, target).item() == pytest.approx(1 - 9 / (9 + 0.7 * 8), abs=1e-4)
    assert tversky_loss(over, target).item() == pytest.approx(1 - 17 / (17 + 0.3 * 8), abs=1e-4)
    assert tversky_loss(under, target).item() > 2 * tversky_loss(over, target).item()
    # With weights of 0.5 and no smoothing it is the Dice loss.
    dice = soft_dice_loss(under, target, smooth=0).item()
    assert tversky_loss(under, target, fp_weight=0.5, fn_weight=0.5, smooth=0).item() == pytest.approx(dice, abs=1e-4)


def test_per_slice_dice_loss_weighs_a_missed_small_tumor_like_a_large_one() -> None:
    # Slice 0: a 100-pixel tumor found exactly; slice 1: a 4-pixel tumor missed; slice 2: tumor-free.
    target = torch.zeros(3, 1, 16, 16)
    target[0, 0, :10, :10] = 1
    target[1, 0, 12:14, 12:14] = 1
    logits = torch.full_like(target, -30.0)
    logits[0] = torch.where(target[0] > 0, 30.0, -30.0)
    per_slice = per_slice_dice_loss(logits, target).item()
    # Slice 0 scores ~1, slice 1 (0 + 1) / (0 + 4 + 1); slice 2 is left to BCE, not counted as a perfect Dice.
    assert per_slice == pytest.approx(1 - (1 + 1 / 5) / 2, abs=1e-4)
    # The batch Dice barely notices the missed small tumor: 1 - (200 + 1) / (100 + 104 + 1).
    assert soft_dice_loss(logits, target).item() == pytest.approx(1 - 201 / 205, abs=1e-4)
    # No tumor in the batch: no Dice term, and backward still works.
    empty_logits = torch.zeros(2, 1, 4, 4, requires_grad=True)
    loss = per_slice_dice_loss(empty_logits, torch.zeros(2, 1, 4, 4))
    loss.backward()
    assert loss.item() == 0 and empty_logits.grad is not None


def test_weighted_bce_loss_by_hand() -> None:
    # Logits 0: each term is ln 2; the positive is weighted 3: (3 ln 2 + ln 2) / 2.
    logits = torch.zeros(2, requires_grad=True)
    loss = weighted_bce_loss(logits, torch.tensor([1.0, 0.0]), positive_weight=3.0)
    assert loss.item() == pytest.approx(2 * math.log(2))
    loss.backward()
    # d/dz: positive -3 * (1 - 0.5) / 2, negative 0.5 / 2.
    np.testing.assert_allclose(logits.grad.numpy(), [-0.75, 0.25])
