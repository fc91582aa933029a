"""DICOM bytes -> 8-bit slices: bit depths, windows, rescale, photometric interpretations, compression, bad files."""

import io

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from app.core.codecs import decode_image
from app.core.dicom import decode_dicom_slice, is_dicom, percentile_window, read_dicom
from app.core.limits import ImageLimits, ImageRejected
from tests.dicom.builders import CANARY_ID, CANARY_NAME, mr_slice, to_bytes

MAX_PIXELS = 4096 * 4096
LIMITS = ImageLimits(max_pixels=MAX_PIXELS)


def single(pixels: np.ndarray, **options: object) -> Dataset:
    return mr_slice(
        pixels, series_uid=generate_uid(), study_uid=generate_uid(), frame_of_reference_uid=generate_uid(), **options
    )


def decoded(ds: Dataset) -> np.ndarray:
    return decode_dicom_slice(to_bytes(ds), LIMITS)


def rejected(data: bytes, content_type: str | None = "application/dicom") -> ImageRejected:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, LIMITS, content_type)
    assert CANARY_NAME.split("^")[0] not in caught.value.detail and CANARY_ID not in caught.value.detail
    return caught.value


@pytest.fixture(scope="module")
def ramp12() -> np.ndarray:
    """12-bit values 0..4095 over a 64x64 slice, every value present."""
    return np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)


def test_8bit_monochrome_without_window_is_kept_as_is(patient) -> None:
    flair = patient.images[6, ..., 1]
    np.testing.assert_array_equal(decoded(single(flair)), flair)


def test_8bit_rgb_is_kept_in_dataset_channel_order(patient) -> None:
    image = patient.images[6]
    pixels = decoded(single(image))
    assert pixels.shape == image.shape
    np.testing.assert_array_equal(pixels, image)


def test_dicom_window_follows_the_linear_voi_function(ramp12: np.ndarray) -> None:
    ds = single(ramp12, bits_stored=12)
    ds.WindowCenter, ds.WindowWidth = 2048, 1024
    pixels = decoded(ds).astype(int)
    # PS3.3 C.11.2.1.2.1: below c - 0.5 - (w-1)/2 -> 0, above c - 0.5 + (w-1)/2 -> max, linear between.
    assert (pixels[ramp12 <= 2048 - 0.5 - 1023 / 2] == 0).all()
    assert (pixels[ramp12 > 2048 - 0.5 + 1023 / 2] == 255).all()
    inside = (ramp12 > 1600) & (ramp12 < 2500)
    expected = ((ramp12[inside] - 2047.5) / 1023 + 0.5) * 255
    assert np.abs(pixels[inside] - expected).max() <= 0.5 + 1e-9
    assert (np.diff(pixels.ravel()) >= 0).all()


def test_rescale_is_applied_before_the_window(ramp12: np.ndarray) -> None:
    ds = single(ramp12, bits_stored=12)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000
    ds.WindowCenter, ds.WindowWidth = 2 * 2048 - 1000, 2 * 1024  # the same window in rescaled units
    plain = single(ramp12, bits_stored=12)
    plain.WindowCenter, plain.WindowWidth = 2048, 1024
    assert np.abs(decoded(ds).astype(int) - decoded(plain).astype(int)).max() <= 1


def test_without_a_window_wide_values_get_the_percentile_window(ramp12: np.ndarray) -> None:
    pixels = decoded(single(ramp12, bits_stored=12))
    low, high = np.percentile(ramp12, (0.5, 99.5))
    assert (pixels[ramp12 <= low] == 0).all() and (pixels[ramp12 >= high] == 255).all()
    assert (np.diff(pixels.ravel().astype(int)) >= 0).all()
    np.testing.assert_array_equal(pixels, percentile_window(ramp12.astype(np.float64)))


def test_a_few_hot_voxels_do_not_darken_the_slice(ramp12: np.ndarray) -> None:
    hot = ramp12.copy()
    hot[0, :3] = 65000  # 3 voxels of 4096: above the 99.5th percentile
    pixels = decoded(single(hot))
    assert np.median(pixels) > 100  # a min-max window would put the median near 8


def test_signed_16bit_values(ramp12: np.ndarray) -> None:
    signed = (ramp12.astype(np.int32) - 2048).astype(np.int16)
    pixels = decoded(single(signed, bits_stored=16, signed=True))
    np.testing.assert_array_equal(pixels, decoded(single(ramp12, bits_stored=12)))


def test_monochrome1_is_inverted(ramp12: np.ndarray) -> None:
    normal = decoded(single(ramp12, bits_stored=12))
    inverted = decoded(single(ramp12, bits_stored=12, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(inverted, 255 - normal)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless])
def test_compressed_pixel_data_decode_to_the_same_slice(flair_volume: np.ndarray, syntax: str) -> None:
    ds = single(flair_volume[6], bits_stored=12)
    expected = decoded(ds)
    ds.compress(syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(decoded(ds), expected)


def test_image_decoder_dispatches_dicom_with_or_without_content_type(patient) -> None:
    data = to_bytes(single(patient.images[5, ..., 1]))
    for content_type in ("application/dicom", "application/octet-stream", None):
        np.testing.assert_array_equal(decode_image(data, LIMITS, content_type), patient.images[5, ..., 1])
    assert is_dicom(data) and is_dicom(data[132:], "application/dicom") and not is_dicom(b"\x89PNG" + data[4:128])


def test_multi_frame_file_on_a_single_slice_route_is_a_400(flair_volume: np.ndarray) -> None:
    ds = single(flair_volume[4:7], bits_stored=12, photometric="MONOCHROME2")  # 3 frames
    assert len(read_dicom(to_bytes(ds), LIMITS).frames) == 3
    error = rejected(to_bytes(ds))
    assert error.status_code == 400 and "/v1/series" in error.detail


def test_no_pixel_data_is_a_400(patient) -> None:
    ds = single(patient.images[5, ..., 1])
    del ds.PixelData
    error = rejected(to_bytes(ds))
    assert error.status_code == 400 and "no pixel data" in error.detail


@pytest.mark.parametrize("keep", [0.3, 0.95])
def test_truncated_file_is_a_400(flair_volume: np.ndarray, keep: float) -> None:
    data = to_bytes(single(flair_volume[6], bits_stored=12))
    error = rejected(data[: int(len(data) * keep)])
    assert error.status_code == 400 and "truncated or corrupt" in error.detail


@pytest.mark.parametrize(
    ("syntax", "named"),
    [
        ("1.2.840.10008.1.2.4.201", "High-Throughput JPEG 2000"),  # a real syntax no installed plugin decodes
        ("1.2.3.4.5.6.7", "unknown transfer syntax"),
    ],
)
def test_undecodable_transfer_syntax_is_a_415(patient, syntax: str, named: str) -> None:
    ds = single(patient.images[5, ..., 1])
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 12])  # opaque: refused before any decoding
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, implicit_vr=False, little_endian=True)
    error = rejected(buffer.getvalue())
    assert error.status_code == 415 and named in error.detail and syntax in error.detail


def test_unsupported_photometric_interpretation_is_a_415(patient) -> None:
    ds = single(patient.images[5, ..., 1])
    ds.PhotometricInterpretation = "PALETTE COLOR"
    error = rejected(to_bytes(ds))
    assert error.status_code == 415 and "PALETTE COLOR" in error.detail


def test_too_many_pixels_is_a_413_before_decoding(patient) -> None:
    data = to_bytes(single(patient.images[5, ..., 1]))
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, ImageLimits(max_pixels=100 * 100), "application/dicom")
    assert caught.value.status_code == 413


def test_pixel_data_shorter_than_declared_is_a_400(patient) -> None:
    ds = single(patient.images[5, ..., 1])
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    assert rejected(to_bytes(ds)).status_code == 400
