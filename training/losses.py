"""Losses fit for the imbalance: tumor pixels are ~1% of a slice, tumor slices ~36%."""

import torch
from torch.nn import functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - Dice over the whole batch, so tumor-free slices do not each count as perfect or as zero."""
    probability = torch.sigmoid(logits)
    intersection = (probability * target).sum()
    return 1 - (2 * intersection + smooth) / (probability.sum() + target.sum() + smooth)


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice drives overlap on the rare tumor pixels; BCE keeps per-pixel gradients well behaved."""
    return soft_dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits, target)


def weighted_bce_loss(logits: torch.Tensor, labels: torch.Tensor, positive_weight: float) -> torch.Tensor:
    """Class-weighted BCE for the classifier: a missed tumor slice weighs like `positive_weight` false alarms."""
    weight = torch.tensor(positive_weight, dtype=logits.dtype, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, labels, pos_weight=weight)
