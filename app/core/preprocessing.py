"""The one preprocessing (and its inverse) shared by training and the service.

Works on one slice at a time because the service sees one slice at a time: no
per-volume statistics. Input is an 8-bit slice in the kaggle_3m channel order
(R = pre-contrast, G = FLAIR, B = post-contrast) or a single FLAIR channel;
decoders window anything wider (16-bit PNG/TIFF, DICOM) to 8 bits first.
"""

import numpy as np
from PIL import Image

CHANNEL_ORDER = ("pre-contrast", "FLAIR", "post-contrast")
# Flat slices (blank ends of a volume) have std ~0: the floor keeps them at ~0
# instead of amplifying quantization noise.
STD_FLOOR = 1.0
NORMALIZATION = "per-slice, per-channel z-score after resize: (x - mean) / max(std, 1.0), x in 0..255"


def to_three_channels(image: np.ndarray) -> np.ndarray:
    """HxW (FLAIR only), HxWx1, HxWx3 or HxWx4 (alpha dropped) -> HxWx3 uint8.

    A lone FLAIR channel is replicated, the dataset's own convention for a missing sequence.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit slice, got dtype {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected HxW, HxWx1, HxWx3 or HxWx4, got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    return image[..., :3]


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear (antialiased when shrinking) resize of one float plane."""
    if plane.shape == (height, width):
        return plane.astype(np.float32, copy=False)
    resized = Image.fromarray(plane.astype(np.float32, copy=False), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    return np.asarray(resized, dtype=np.float32)


def preprocess_slice(image: np.ndarray, size: int) -> np.ndarray:
    """8-bit slice of any size -> float32 array (3, size, size) for the networks."""
    rgb = to_three_channels(image)
    # One channel in float at a time: a 4096 x 4096 slice needs 64 MiB of float, not 192.
    planes = np.stack([resize_plane(rgb[..., c].astype(np.float32), size, size) for c in range(3)])
    mean = planes.mean(axis=(1, 2), keepdims=True)
    std = planes.std(axis=(1, 2), keepdims=True)
    return ((planes - mean) / np.maximum(std, STD_FLOOR)).astype(np.float32)


def mask_to_input_size(tumor_probability_map: np.ndarray, height: int, width: int, threshold: float) -> np.ndarray:
    """Segmenter probabilities at model size -> boolean mask at the input slice's size."""
    return resize_plane(tumor_probability_map, height, width) >= threshold
