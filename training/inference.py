"""Batched PyTorch inference for evaluation and export checks, optionally with horizontal-flip averaging."""

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 64, flip: bool = False) -> np.ndarray:
    """Sigmoid outputs for model inputs (N, 3, S, S), in eval mode, in batches.

    With `flip`, the mean of the outputs for the slice and its left-right mirror (maps mirrored back): the
    test-time augmentation that matches the training's horizontal flips.
    """
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size].astype(np.float32)).to(device)
        probability = torch.sigmoid(model(x))
        if flip:
            mirrored = torch.sigmoid(model(torch.flip(x, dims=[-1])))
            probability = (probability + (torch.flip(mirrored, dims=[-1]) if mirrored.ndim == 4 else mirrored)) / 2
        outputs.append(probability.float().cpu().numpy())
    return np.concatenate(outputs)
