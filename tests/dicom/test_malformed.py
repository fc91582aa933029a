"""Malformed input, in process: the generated corpus's crafted cases get their 4xx; the decoder pool survives
native crashes; declared sizes are refused before the work (memory measured with tracemalloc)."""

import tracemalloc

import numpy as np
import pytest
from pydicom.uid import JPEG2000Lossless

from app.core.codecs import decode_image
from app.core.decode_pool import DecoderPool
from app.core.dicom import read_dicom
from app.core.limits import ImageLimits, ImageRejected, PixelBudget
from app.core.series import SeriesLimits, Upload, read_series
from tests.dicom.builders import CANARY_ID, CANARY_NAME, to_bytes
from tests.reliability.malformed import (
    PREDICT,
    base_dataset,
    base_volume,
    big_png,
    crafted_cases,
    deflate_bombs,
    encapsulated,
    jpeg2000,
)

LIMITS = ImageLimits()
SERIES_LIMITS = SeriesLimits(LIMITS, max_slices=256, max_total_bytes=256 << 20, max_member_bytes=20 << 20)
CRAFTED = crafted_cases()


def outcome(case) -> int:
    """The status the case's files get from the decoders the routes call (200 when decoded)."""
    try:
        if case.route == PREDICT:
            _, data, content_type = case.files[0]
            decode_image(data, LIMITS, content_type)
        else:
            read_series([Upload(*f) for f in case.files], SERIES_LIMITS)
    except ImageRejected as error:
        assert CANARY_ID not in error.detail and CANARY_NAME.split("^")[0] not in error.detail
        return error.status_code
    return 200


# pydicom warns while it reads the deliberately broken sequences; the answer (a 400) is what is tested.
@pytest.mark.filterwarnings("ignore:VR lookup failed:UserWarning")
@pytest.mark.parametrize("case", CRAFTED, ids=[f"{c.route[4:]}: {c.name}" for c in CRAFTED])
def test_crafted_malformed_input_gets_its_4xx(case) -> None:
    status = outcome(case)
    assert status < 500
    if case.expect is not None:
        assert status in case.expect


def j2k_dicom() -> tuple[bytes, np.ndarray]:
    """A valid JPEG 2000 lossless DICOM and the values it holds."""
    return jpeg2000(base_dataset()), base_volume()[0]


@pytest.fixture(scope="module")
def pool():
    pool = DecoderPool(workers=1, timeout_s=20, memory_bytes=1 << 30)
    yield pool
    pool.close()


def test_a_decoder_that_aborts_costs_one_decode_not_the_pool(pool: DecoderPool) -> None:
    valid, stored = j2k_dicom()
    np.testing.assert_array_equal(pool.decode(valid, "JPEG 2000"), stored)
    garbage = encapsulated(JPEG2000Lossless, b"\xff\x4f\xff\x51" + bytes(range(256)) * 8)
    for _ in range(2):  # GDCM abort()s its worker: refused, the worker replaced
        replaced = pool.replaced
        with pytest.raises(ImageRejected) as caught:
            pool.decode(garbage, "JPEG 2000")
        assert caught.value.status_code == 400 and "decoder failed" in caught.value.detail
        assert pool.replaced == replaced + 1
    np.testing.assert_array_equal(pool.decode(valid, "JPEG 2000"), stored)  # the fresh worker decodes


def test_a_decode_over_its_time_limit_is_refused_and_its_worker_replaced() -> None:
    valid, _ = j2k_dicom()
    pool = DecoderPool(workers=1, timeout_s=1e-4, memory_bytes=1 << 30)
    try:
        with pytest.raises(ImageRejected) as caught:
            pool.decode(valid, "JPEG 2000")
        assert caught.value.status_code == 400 and "took more than" in caught.value.detail
        assert pool.replaced == 1
    finally:
        pool.close()


def test_compressed_dicom_decodes_through_the_pool_like_uncompressed(patient) -> None:
    valid, stored = j2k_dicom()
    plain = base_dataset()
    plain.PixelData, plain.BitsStored, plain.HighBit = stored.tobytes(), 16, 15
    np.testing.assert_array_equal(
        read_dicom(valid, LIMITS).frames[0].pixels, read_dicom(to_bytes(plain), LIMITS).frames[0].pixels
    )


def peak_allocation_mib(function, *args) -> tuple[int, float]:
    """(status the call is refused with, peak Python allocation during the call in MiB)."""
    tracemalloc.start()
    try:
        with pytest.raises(ImageRejected) as caught:
            function(*args)
        return caught.value.status_code, tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("bomb", [0, 1], ids=["declares 512 MiB", "declares 8 KiB, inflates to 512 MiB"])
def test_deflate_bomb_is_refused_before_it_is_inflated(bomb: int) -> None:
    data = deflate_bombs()[bomb]
    status, peak_mib = peak_allocation_mib(read_dicom, data, LIMITS)
    assert status == 413
    assert peak_mib < 16, f"{peak_mib:.0f} MiB allocated to refuse it"


def test_zip_of_big_pngs_is_refused_by_declared_sizes_before_decoding() -> None:
    from tests.dicom.builders import zip_of

    archive = zip_of({f"s_{n}.png": big_png(4096, 4096) for n in range(15)})
    status, peak_mib = peak_allocation_mib(read_series, [Upload("pngs.zip", archive)], SERIES_LIMITS)
    assert status == 413
    assert peak_mib < 16, f"{peak_mib:.0f} MiB allocated: some PNG was decoded"  # one would be 16 MiB


@pytest.mark.parametrize(("width", "height"), [(262144, 64), (1048576, 16), (16, 1048576), (8193, 1024)])
def test_elongated_or_too_long_slices_are_refused_before_decoding(width: int, height: int) -> None:
    status, peak_mib = peak_allocation_mib(decode_image, big_png(width, height), LIMITS, "image/png")
    assert status == 413 and peak_mib < 4


def test_request_budget_counts_every_file_and_frame() -> None:
    budget = PixelBudget(3 * 64 * 64)
    data = to_bytes(base_dataset())
    for _ in range(3):
        read_dicom(data, LIMITS, budget)
    with pytest.raises(ImageRejected) as caught:
        read_dicom(data, LIMITS, budget)
    assert caught.value.status_code == 413 and str(3 * 64 * 64) in caught.value.detail


def test_every_refusal_names_every_accepted_format() -> None:
    for data, content_type in ((b"not an image", None), (b"%PDF-1.7", "application/pdf")):
        with pytest.raises(ImageRejected) as caught:
            decode_image(data, LIMITS, content_type)
        assert "DICOM, TIFF, PNG, JPEG or WebP" in caught.value.detail


def test_a_decode_over_its_memory_limit_is_refused_and_its_worker_replaced() -> None:
    ds = base_dataset()  # uncompressed: the pool decodes any syntax, and nothing has to be encoded here
    ds.Rows, ds.Columns, ds.NumberOfFrames = 2048, 2048, 12
    ds.PixelData = np.zeros((12, 2048, 2048), np.uint16).tobytes()  # 96 MiB, read, then decoded: past 256 MiB
    pool = DecoderPool(workers=1, timeout_s=30, memory_bytes=256 << 20)
    try:
        with pytest.raises(ImageRejected) as caught:
            pool.decode(to_bytes(ds), "native")
        assert caught.value.status_code in (400, 413) and pool.replaced == 1
    finally:
        pool.close()
