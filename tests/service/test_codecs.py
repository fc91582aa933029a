"""Decoding uploads and encoding masks, without HTTP."""

import base64
import io
import itertools
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from app.core.codecs import (
    ImageRejected,
    bounding_box,
    decode_image,
    mask_to_png,
    mask_to_png_base64,
    mask_to_rle,
    outline,
    overlay_png,
)
from app.core.limits import ImageLimits
from tests.service.conftest import coco_decode, encode, synthetic_slice

MAX_PIXELS = 4096 * 4096
LIMITS = ImageLimits(max_pixels=MAX_PIXELS)


def rejected(data: bytes, content_type: str | None = None, max_pixels: int = MAX_PIXELS) -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, ImageLimits(max_pixels=max_pixels), content_type)
    return caught.value


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels (with a valid CRC) but carries almost no data."""
    data = encode(np.zeros((4, 4), np.uint8))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]


@pytest.mark.parametrize("image_format", ["PNG", "TIFF", "WEBP"])
def test_lossless_rgb_formats_decode_exactly(image_format: str) -> None:
    image = synthetic_slice(200, 300)
    options = {"lossless": True} if image_format == "WEBP" else {}
    decoded = decode_image(encode(image, image_format, **options), LIMITS)
    assert decoded.dtype == np.uint8
    np.testing.assert_array_equal(decoded, image)


def test_jpeg_decodes_to_rgb_close_to_the_original() -> None:
    image = synthetic_slice()
    decoded = decode_image(encode(image, "JPEG", quality=95), LIMITS)
    assert decoded.shape == image.shape
    assert np.abs(decoded.astype(int) - image).mean() < 4


def test_single_channel_flair_stays_single_channel() -> None:
    flair = synthetic_slice()[..., 1]
    decoded = decode_image(encode(flair), LIMITS)
    assert decoded.shape == flair.shape
    np.testing.assert_array_equal(decoded, flair)


@pytest.mark.parametrize("image_format", ["PNG", "TIFF"])
def test_16_bit_is_windowed_from_its_own_range_to_8_bits(image_format: str) -> None:
    wide = np.linspace(1000, 41000, 64 * 64).reshape(64, 64).astype(np.uint16)
    decoded = decode_image(encode(wide, image_format), LIMITS)
    assert decoded.dtype == np.uint8 and decoded.shape == (64, 64)
    assert decoded.min() == 0 and decoded.max() == 255
    expected = np.round((wide.astype(float) - 1000) * 255 / 40000)
    np.testing.assert_array_equal(decoded, expected)


def test_alpha_and_palette_images_become_rgb() -> None:
    rgba = np.dstack([synthetic_slice(), np.full((256, 256), 255, np.uint8)])
    np.testing.assert_array_equal(decode_image(encode(rgba), LIMITS), rgba[..., :3])
    palette = Image.fromarray(synthetic_slice()).convert("P")
    assert decode_image(encode(np.asarray(palette.convert("RGB"))), LIMITS).shape == (256, 256, 3)
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    assert decode_image(buffer.getvalue(), LIMITS).shape == (256, 256, 3)


@pytest.mark.parametrize(
    ("data", "content_type", "status"),
    [
        (b"", "image/png", 400),
        (b"these are not image bytes", "application/octet-stream", 400),
        (b"these are not image bytes", None, 400),
        (b"these are not image bytes", "image/png", 400),
        (b"plain text", "text/plain", 415),
        (b"%PDF-1.7 ...", "application/pdf", 415),
        (b"\0" * 128 + b"DICM" + b"\0" * 64, "application/dicom", 400),  # a DICOM header with no image
    ],
)
def test_bad_bytes_are_refused_with_the_right_status(data: bytes, content_type: str | None, status: int) -> None:
    error = rejected(data, content_type)
    assert error.status_code == status
    assert error.detail


@pytest.mark.parametrize("image_format", ["GIF", "BMP"])
def test_other_image_formats_are_unsupported(image_format: str) -> None:
    error = rejected(encode(synthetic_slice(), image_format), "image/" + image_format.lower())
    assert error.status_code == 415
    assert image_format in error.detail


def test_truncated_png_is_a_400_not_a_crash() -> None:
    data = encode(synthetic_slice())
    error = rejected(data[: len(data) // 2], "image/png")
    assert error.status_code == 400
    assert "PNG" in error.detail


def test_decompression_bomb_is_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    error = rejected(png_claiming(60_000, 60_000), "image/png")
    assert error.status_code == 413
    assert "before decoding" in error.detail
    # Pillow's own bomb check caught that one; a configured limit far below Pillow's is ours.
    error = rejected(png_claiming(101, 100), max_pixels=100 * 100)
    assert error.status_code == 413
    assert "101 x 100" in error.detail


def test_image_at_the_pixel_limit_is_accepted() -> None:
    assert decode_image(encode(np.zeros((100, 100), np.uint8)), ImageLimits(max_pixels=100 * 100)).shape == (100, 100)


def test_rle_matches_the_coco_example() -> None:
    # Column-major over a 7x1 image: [0 0 1 1 1 0 1] -> [2 3 1 1].
    mask = np.array([[0], [0], [1], [1], [1], [0], [1]], bool)
    assert mask_to_rle(mask) == {"format": "rle", "size": [7, 1], "counts": [2, 3, 1, 1]}


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((5, 7), bool),
        np.ones((5, 7), bool),
        np.eye(6, 9, dtype=bool),
        np.random.default_rng(1).random((37, 53)) > 0.6,
        np.pad(np.ones((3, 4), bool), ((0, 5), (2, 0))),  # first pixel is tumor: counts start with 0
    ],
)
def test_rle_round_trips_through_pycocotools(mask: np.ndarray) -> None:
    rle = mask_to_rle(mask)
    assert sum(rle["counts"]) == mask.size
    assert (rle["counts"][0] == 0) == bool(mask.ravel(order="F")[0])
    np.testing.assert_array_equal(coco_decode(rle), mask)


@pytest.mark.parametrize("shape", [(1, 1), (1, 9), (9, 1), (2, 2), (7, 5), (64, 3), (256, 256)])
@pytest.mark.parametrize("density", [0.0, 0.02, 0.5, 0.98, 1.0])
def test_rle_equals_runs_over_the_column_major_pixels(shape: tuple[int, int], density: float) -> None:
    # mask_to_rle finds runs without transposing the mask: check it against the plain column-major definition.
    mask = np.random.default_rng(3).random(shape) < density
    pixels = mask.ravel(order="F")
    runs = [len(list(group)) for _, group in itertools.groupby(pixels)]
    expected = [0, *runs] if pixels[0] else runs
    assert mask_to_rle(mask) == {"format": "rle", "size": list(shape), "counts": expected}


def test_png_mask_is_one_bit_and_exact() -> None:
    mask = np.random.default_rng(2).random((31, 45)) > 0.5
    with Image.open(io.BytesIO(mask_to_png(mask))) as image:
        assert image.mode == "1"
        np.testing.assert_array_equal(np.asarray(image), mask)
    encoded = mask_to_png_base64(mask)
    assert encoded["format"] == "png" and encoded["size"] == [31, 45]
    assert base64.b64decode(encoded["data"]) == mask_to_png(mask)


def test_bounding_box_is_x_y_width_height() -> None:
    mask = np.zeros((50, 80), bool)
    mask[10:20, 30:45] = True
    assert bounding_box(mask) == [30, 10, 15, 10]
    assert bounding_box(np.zeros((5, 5), bool)) is None


def test_outline_keeps_only_the_border_of_the_tumor() -> None:
    mask = np.zeros((10, 10), bool)
    mask[2:8, 2:8] = True
    border = outline(mask, 1)
    assert border.sum() == 6 * 4 - 4
    assert not border[3:7, 3:7].any()
    assert outline(np.ones((4, 4), bool), 1).sum() == 12  # the image edge counts as background


def test_overlay_shows_flair_in_gray_with_a_red_outline() -> None:
    image = synthetic_slice()
    mask = np.zeros((256, 256), bool)
    mask[100:140, 120:170] = True
    with Image.open(io.BytesIO(overlay_png(image, mask))) as overlay:
        pixels = np.asarray(overlay.convert("RGB"))
    assert pixels.shape == (256, 256, 3)
    red = (pixels[..., 0] == 255) & (pixels[..., 1] < 64)
    np.testing.assert_array_equal(red, outline(mask, 1))
    np.testing.assert_array_equal(pixels[0:50, 0:50, 0], image[0:50, 0:50, 1])
    with Image.open(io.BytesIO(overlay_png(image, None))) as plain:
        np.testing.assert_array_equal(np.asarray(plain)[..., 2], image[..., 1])
