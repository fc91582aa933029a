"""app.core.preprocessing: the one preprocessing that training and the service share."""

import numpy as np
import pytest

from app.core.preprocessing import mask_to_input_size, preprocess_slice, to_three_channels


def random_slice(height: int = 100, width: int = 80, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(("height", "width", "size"), [(256, 256, 128), (100, 80, 64), (40, 60, 96), (64, 64, 64)])
def test_any_slice_size_becomes_three_planes_at_model_size(height: int, width: int, size: int) -> None:
    out = preprocess_slice(random_slice(height, width), size)
    assert out.shape == (3, size, size) and out.dtype == np.float32


def test_each_channel_is_z_scored() -> None:
    image = random_slice()
    image[..., 1] //= 4  # channels with different ranges come out alike
    out = preprocess_slice(image, 64)
    np.testing.assert_allclose(out.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(1, 2)), 1, atol=1e-4)


def test_channel_order_is_kept() -> None:
    image = np.zeros((32, 32, 3), np.uint8)
    image[:16, :, 1] = 200  # FLAIR bright on top only
    out = preprocess_slice(image, 32)
    assert out[1, :16].mean() > 0 > out[1, 16:].mean()
    assert np.all(out[0] == 0) and np.all(out[2] == 0)  # flat channels


@pytest.mark.parametrize("shape", [(50, 70), (50, 70, 1)])
def test_flair_only_equals_the_replicated_three_channel_slice(shape: tuple[int, ...]) -> None:
    flair = random_slice(50, 70)[..., 1].reshape(shape)
    replicated = np.repeat(flair.reshape(50, 70, 1), 3, axis=2)
    np.testing.assert_array_equal(preprocess_slice(flair, 64), preprocess_slice(replicated, 64))
    np.testing.assert_array_equal(to_three_channels(flair), replicated)


def test_a_flair_only_slice_is_the_full_slices_flair_plane_three_times() -> None:
    """What lets CV predict FLAIR-only input from cached inputs, and augmentation drop sequences after preprocessing."""
    image = random_slice(50, 70)
    image[..., 0] //= 3
    full = preprocess_slice(image, 64)
    np.testing.assert_array_equal(preprocess_slice(image[..., 1], 64), full[[1, 1, 1]])


def test_alpha_channel_is_dropped() -> None:
    rgb = random_slice(40, 40)
    rgba = np.concatenate([rgb, np.full((40, 40, 1), 255, np.uint8)], axis=2)
    np.testing.assert_array_equal(preprocess_slice(rgba, 32), preprocess_slice(rgb, 32))


@pytest.mark.parametrize("value", [0, 37, 255])
def test_flat_slice_stays_finite_and_zero(value: int) -> None:
    out = preprocess_slice(np.full((64, 64, 3), value, np.uint8), 32)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, 0, atol=1e-5)


def test_nearly_flat_slice_is_not_amplified() -> None:
    # Quantization noise of one gray level: the std floor keeps it below one unit instead of blowing it up.
    image = np.full((64, 64, 3), 100, np.uint8)
    image[::2] = 101
    out = preprocess_slice(image, 64)
    assert np.abs(out).max() <= 0.5 + 1e-6


@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.int64, bool])
def test_non_uint8_is_rejected(dtype: type) -> None:
    with pytest.raises(ValueError, match="expected an 8-bit slice"):
        preprocess_slice(np.zeros((32, 32, 3), dtype), 32)


@pytest.mark.parametrize("shape", [(32, 32, 2), (32, 32, 5), (1, 32, 32, 3), (32,)])
def test_wrong_shape_is_rejected(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="expected HxW"):
        preprocess_slice(np.zeros(shape, np.uint8), 32)


def test_mask_to_input_size_returns_the_input_size_and_thresholds() -> None:
    probability = np.zeros((64, 64), np.float32)
    probability[:, :32] = 0.9  # left half
    mask = mask_to_input_size(probability, 100, 80, 0.5)
    assert mask.shape == (100, 80) and mask.dtype == bool
    assert mask[:, :38].all() and not mask[:, 42:].any()
    assert mask_to_input_size(np.full((64, 64), 0.6, np.float32), 30, 50, 0.5).all()
    assert not mask_to_input_size(np.full((64, 64), 0.6, np.float32), 30, 50, 0.7).any()
