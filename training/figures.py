"""Figure pieces shared by the `evaluate` and `cv` reports."""

import numpy as np
from matplotlib.axes import Axes

from app.core.preprocessing import resize_plane
from training.dataset import SliceCache


def overlay_panel(ax: Axes, cache: SliceCache, index: int, predicted: np.ndarray, title: str) -> None:
    """Slice `index` of the cache (its FLAIR channel at source size) with the truth in green, the prediction in red."""
    ax.imshow(resize_plane(cache.images[index][1].astype(np.float32), *cache.masks.shape[1:]), cmap="gray")
    ax.contour(cache.masks[index], levels=[0.5], colors="lime", linewidths=1)
    if predicted.any():
        ax.contour(predicted, levels=[0.5], colors="red", linewidths=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
