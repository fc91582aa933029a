"""Losses fit for the imbalance: tumor pixels are ~1% of a slice, tumor slices ~36%."""

import torch
from torch.nn import functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice over the whole batch, so tumor-free slices do not each count as perfect or as zero."""
    probability = torch.sigmoid(logits)
    intersection = (probability * target).sum()
    return 1 - (2 * intersection + smooth) / (probability.sum() + target.sum() + smooth)


def per_slice_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - mean Dice over the batch's slices that hold tumor: a 100-pixel tumor weighs as much as a
    10,000-pixel one (in the batch Dice, large tumors decide). Tumor-free slices are left to the BCE term."""
    probability, target = torch.sigmoid(logits).flatten(1), target.flatten(1)
    with_tumor = target.sum(dim=1) > 0
    if not with_tumor.any():
        return logits.sum() * 0.0  # no tumor in the batch: no Dice term, and the graph stays connected
    probability, target = probability[with_tumor], target[with_tumor]
    dice = (2 * (probability * target).sum(dim=1) + smooth) / (probability.sum(dim=1) + target.sum(dim=1) + smooth)
    return 1 - dice.mean()


def tversky_loss(
    logits: torch.Tensor, target: torch.Tensor, fp_weight: float = 0.3, fn_weight: float = 0.7, smooth: float = 1.0
) -> torch.Tensor:
    """1 - Tversky index over the batch (Salehi et al. 2017): a missed tumor pixel costs fn_weight / fp_weight
    times a false one (Dice weighs both 0.5), against under-segmented tumors."""
    probability = torch.sigmoid(logits)
    true_positive = (probability * target).sum()
    false_positive = (probability * (1 - target)).sum()
    false_negative = ((1 - probability) * target).sum()
    return 1 - (true_positive + smooth) / (
        true_positive + fp_weight * false_positive + fn_weight * false_negative + smooth
    )


# --mask-loss: the overlap term of a run's segmentation loss, by name (saved in its config and the model card).
MASK_LOSSES = {"batch_dice": soft_dice_loss, "slice_dice": per_slice_dice_loss, "tversky": tversky_loss}


def mask_loss(name: str, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The named overlap term drives overlap on the rare tumor pixels; BCE keeps per-pixel gradients well behaved."""
    return MASK_LOSSES[name](logits, target) + F.binary_cross_entropy_with_logits(logits, target)


def weighted_bce_loss(logits: torch.Tensor, labels: torch.Tensor, positive_weight: float) -> torch.Tensor:
    """Class-weighted BCE for the classifier: a missed tumor slice weighs like `positive_weight` false alarms."""
    weight = torch.tensor(positive_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)
