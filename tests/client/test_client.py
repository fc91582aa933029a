"""The Python client against real uvicorn processes, and its mask decoders."""

import io
import subprocess
import sys
import time
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from app.api.schemas import PngMask, RleMask, SeriesPrediction
from app.client import (
    ServiceError,
    ServiceUnreachable,
    TumorClient,
    decode_mask,
    mask_array,
    png_to_mask,
    rle_to_mask,
)
from app.core.codecs import bounding_box, mask_to_png_base64, mask_to_rle
from tests.client.conftest import API_KEY
from tests.dicom.builders import mr_series, to_bytes
from tests.live_server import LiveServer, unused_port_url
from tests.service.conftest import encode, synthetic_slice

SLICE = encode(synthetic_slice(240, 200, seed=5))
CORRUPT = b"\x89PNG\r\n\x1a\n broken"


def png_array(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"))


@pytest.fixture
def tumor_client(tumor_server: LiveServer) -> Iterator[TumorClient]:
    with TumorClient(tumor_server.url, api_key=API_KEY) as client:
        yield client


@pytest.fixture
def plain_client(plain_server: LiveServer) -> Iterator[TumorClient]:
    with TumorClient(plain_server.url) as client:
        yield client


# --- decoders, no server --------------------------------------------------------------------------------------


def test_rle_decodes_the_coco_example() -> None:
    # [0 0 1 1 1 0 1] -> [2 3 1 1]: column-major runs starting with background.
    mask = rle_to_mask(RleMask(size=[7, 1], counts=[2, 3, 1, 1]))
    assert mask[:, 0].tolist() == [False, False, True, True, True, False, True]
    assert rle_to_mask(RleMask(size=[1, 3], counts=[0, 2, 1])).tolist() == [[True, True, False]]


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (64, 48)])
def test_rle_round_trips_the_service_encoder_and_matches_pycocotools(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    for density in (0.0, 0.3, 1.0):
        mask = rng.random(shape) < density
        rle = mask_to_rle(mask)
        decoded = rle_to_mask(RleMask.model_validate(rle))
        assert np.array_equal(decoded, mask)
        coco = coco_mask.decode(coco_mask.frPyObjects({"size": rle["size"], "counts": rle["counts"]}, *shape))
        assert np.array_equal(decoded, coco.astype(bool))


@pytest.mark.parametrize("counts", [[2, 3], [2, 3, 1, 2], [-1, 8]])
def test_rle_with_counts_not_covering_the_image_is_refused(counts: list[int]) -> None:
    with pytest.raises(ValueError, match="7 x 1"):
        rle_to_mask(RleMask(size=[7, 1], counts=counts))


def test_png_mask_decodes() -> None:
    mask = np.zeros((9, 4), bool)
    mask[2:5, 1:3] = True
    assert np.array_equal(png_to_mask(PngMask.model_validate(mask_to_png_base64(mask))), mask)


def test_client_module_needs_no_inference_runtime() -> None:
    code = "import sys, app.client, app.cli; assert 'onnxruntime' not in sys.modules, 'onnxruntime imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --- against live services -----------------------------------------------------------------------------------


def test_health_ready_and_models(plain_client: TumorClient) -> None:
    assert plain_client.health().status == "alive"
    assert plain_client.ready() is True
    plain_client.wait_until_ready(timeout_s=1)
    models = plain_client.models()
    assert models.providers["classifier"] == ["CPUExecutionProvider"]
    assert set(models.thresholds) == {"classifier", "segmenter"}
    # The card comes back typed, as the service validated it.
    assert models.card.models.classifier.threshold == models.thresholds["classifier"]
    assert models.card.input.size == models.input_size
    assert "\nlgg_ready 1.0\n" in plain_client.metrics()


def test_rle_png_and_mask_png_agree_on_a_tumor(tumor_client: TumorClient) -> None:
    rle_prediction = tumor_client.predict(SLICE, mask_format="rle")
    mask = mask_array(rle_prediction)
    assert rle_prediction.tumor_detected and mask is not None
    assert mask.shape == (240, 200) and 0 < mask.sum() < mask.size
    assert rle_prediction.area_pixels == mask.sum()
    assert rle_prediction.bbox == bounding_box(mask)
    assert np.array_equal(mask_array(tumor_client.predict(SLICE, mask_format="png")), mask)
    assert np.array_equal(png_array(tumor_client.mask_png(SLICE)) > 0, mask)
    assert tumor_client.predict(SLICE, mask_format="none").mask is None


def test_path_and_bytes_give_the_same_prediction(tumor_client: TumorClient, tmp_path) -> None:
    path = tmp_path / "slice.png"
    path.write_bytes(SLICE)
    from_path, from_bytes = tumor_client.predict(path), tumor_client.predict(SLICE, filename="x.png")
    assert from_path.tumor_probability == from_bytes.tumor_probability
    assert from_path.mask == from_bytes.mask


def test_overlay_is_a_color_png_of_the_slice_size(tumor_client: TumorClient) -> None:
    with Image.open(io.BytesIO(tumor_client.overlay_png(SLICE))) as overlay:
        assert (overlay.format, overlay.mode, overlay.size) == ("PNG", "RGB", (200, 240))


def test_batch_keeps_order_and_isolates_the_corrupt_file(tumor_client: TumorClient) -> None:
    other = encode(synthetic_slice(64, 80, seed=6))
    batch = tumor_client.predict_batch([("a.png", SLICE), ("bad.png", CORRUPT), ("c.png", other)])
    assert [item.filename for item in batch.results] == ["a.png", "bad.png", "c.png"]
    assert [item.status_code for item in batch.results] == [200, 400, 200]
    assert (batch.succeeded, batch.failed) == (2, 1)
    assert "decod" in batch.results[1].detail and batch.results[1].prediction is None
    assert batch.results[2].prediction.image_size == [64, 80]
    assert batch.results[0].prediction.mask == tumor_client.predict(SLICE).mask


def test_service_errors_carry_the_status_and_the_service_message(tumor_client: TumorClient) -> None:
    with pytest.raises(ServiceError) as raised:
        tumor_client.predict(CORRUPT, filename="bad.png")
    assert raised.value.status_code == 400
    assert "decodable" in raised.value.detail and raised.value.detail in str(raised.value)
    with pytest.raises(ServiceError) as raised:
        tumor_client.predict(encode(synthetic_slice(32, 32), "GIF"), filename="x.gif")
    assert raised.value.status_code == 415 and "GIF" in raised.value.detail


def test_api_key_is_sent_and_required(tumor_server: LiveServer) -> None:
    for key in (None, "wrong"):
        with TumorClient(tumor_server.url, api_key=key) as client:
            assert client.health().status == "alive"  # health needs no key
            with pytest.raises(ServiceError) as raised:
                client.models()
            assert raised.value.status_code == 401 and "API key" in raised.value.detail


def test_unreachable_service_raises_promptly() -> None:
    with TumorClient(unused_port_url(), timeout_s=5) as client:
        with pytest.raises(ServiceUnreachable, match=r"GET http://127\.0\.0\.1:\d+/healthz"):
            client.health()
        started = time.monotonic()
        with pytest.raises(ServiceUnreachable):
            client.wait_until_ready(timeout_s=0.5)
        assert time.monotonic() - started < 5


def flair_volume(slices: int, height: int, width: int) -> np.ndarray:
    return np.stack([synthetic_slice(height, width, seed=n)[..., 1] for n in range(slices)])


def test_series_orders_the_slices_and_their_masks_decode(tumor_client: TumorClient) -> None:
    instances = [to_bytes(ds) for ds in mr_series(flair_volume(3, 64, 48))]
    shuffled = [(f"{n}.dcm", instances[n]) for n in (2, 0, 1)]
    series = tumor_client.predict_series(shuffled, mask_format="png")
    assert isinstance(series, SeriesPrediction)
    assert series.slice_count == 3 and series.ordered_by == "position"
    assert [s.frame_number for s in series.slices] == [None] * 3
    masks = [decode_mask(s.mask) for s in series.slices]
    assert all(m is not None and m.shape == (64, 48) for m in masks)
    assert [int(m.sum()) for m in masks] == [s.area_pixels for s in series.slices]
    assert series.tumor_volume_voxels == sum(s.area_pixels for s in series.slices) > 0
    assert series.tumor_volume_ml is not None and series.voxel_spacing is not None
    assert series.models.card_version == tumor_client.models().card.version


def test_series_seg_is_a_dicom_file(tumor_client: TumorClient) -> None:
    instances = [(f"{n}.dcm", to_bytes(ds)) for n, ds in enumerate(mr_series(flair_volume(2, 32, 32)))]
    assert tumor_client.series_seg(instances)[128:132] == b"DICM"
