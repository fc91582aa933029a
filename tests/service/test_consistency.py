"""One answer: tumor_detected, the mask, its area and its bbox always agree (app.core.postprocessing's rule).

Every case of classifier yes/no x segmenter mask empty/non-empty, on the bundled models, with thresholds forced so
each case happens whatever the models were trained to.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.onnx_sessions import LoadedModels, load_models, read_model_card
from app.core.pipeline import Pipeline
from app.core.postprocessing import remove_small_components, scaled_min_pixels, slice_mask
from app.core.preprocessing import mask_to_input_size
from tests.service.conftest import encode, models_with_thresholds, segmenter_map, synthetic_slice
from tests.service.test_api import upload

NEVER = 1.01  # a probability threshold no output reaches


@pytest.fixture(scope="module")
def models(bundled_models_dir: Path) -> LoadedModels:
    settings = Settings(model_dir=bundled_models_dir, providers="CPUExecutionProvider", warmup_runs=0)
    return load_models(read_model_card(bundled_models_dir), settings)


@pytest.mark.parametrize(
    ("classifier_says", "segmenter_marks", "min_component_pixels", "detected"),
    [
        ("no", "pixels", 0, False),  # the segmenter never runs where the classifier says no
        ("no", "nothing", 0, False),
        ("yes", "pixels", 0, True),
        ("yes", "nothing", 0, False),  # a classifier yes without one mask pixel is a no
        ("yes", "pixels", 10**9, False),  # every region smaller than the minimum component: no
    ],
)
def test_flag_mask_area_agree(
    models: LoadedModels,
    bundled_models_dir: Path,
    classifier_says: str,
    segmenter_marks: str,
    min_component_pixels: int,
    detected: bool,
) -> None:
    image = synthetic_slice(200, 240)
    pipeline = Pipeline(models)
    pipeline.classifier_threshold = 0.0 if classifier_says == "yes" else NEVER
    median = float(np.median(segmenter_map(bundled_models_dir, image)))
    pipeline.segmenter_threshold = median if segmenter_marks == "pixels" else NEVER
    pipeline.min_component_pixels = min_component_pixels
    [prediction] = pipeline.predict_batch([image])
    assert prediction.tumor_detected is detected
    assert (prediction.mask is not None) is detected
    if prediction.mask is not None:
        assert prediction.mask.shape == image.shape[:2] and prediction.mask.any()


def test_api_answers_no_tumor_when_the_classifier_flags_but_no_pixel_is_marked(
    make_client: Callable[..., TestClient], bundled_models_dir: Path, tmp_path: Path
) -> None:
    client = make_client(model_dir=models_with_thresholds(bundled_models_dir, tmp_path, 0.0, NEVER))
    body = client.post("/v1/predict", files=upload(encode(synthetic_slice()))).json()
    assert body["tumor_probability"] >= 0.0
    assert (body["tumor_detected"], body["mask"], body["area_pixels"], body["bbox"]) == (False, None, 0, None)


def test_small_components_go_and_large_ones_stay() -> None:
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:4] = True  # 4 pixels
    mask[10:16, 10:16] = True  # 36 pixels
    mask[16, 16] = True  # touches the big one diagonally: part of it (8-connected)
    kept = remove_small_components(mask, 5)
    assert not kept[2:4, 2:4].any()
    assert kept[10:16, 10:16].all() and kept[16, 16]
    assert remove_small_components(mask, 0) is mask


def test_min_component_size_scales_with_the_slice_area() -> None:
    assert scaled_min_pixels(16, 128, 256, 256) == 64  # the card counts pixels at the model's input size
    assert scaled_min_pixels(16, 128, 128, 128) == 16
    assert scaled_min_pixels(0, 128, 512, 512) == 0


@pytest.mark.parametrize("size", [(256, 256), (512, 384), (97, 131)])
def test_a_map_below_the_threshold_skips_the_resize_and_answers_what_the_resize_would(size: tuple[int, int]) -> None:
    rng = np.random.default_rng(0)
    for threshold in (0.3, 0.1, 0.55):
        for peak in (np.nextafter(np.float32(threshold), np.float32(0)), np.float32(threshold), threshold + 0.01):
            probability_map = (rng.random((128, 128)) * peak).astype(np.float32)
            row, column = rng.integers(1, 127, 2)
            probability_map[row - 1 : row + 2, column - 1 : column + 2] = peak  # the resize reaches the peak
            full = mask_to_input_size(probability_map, *size, threshold)  # the rule without the shortcut
            np.testing.assert_array_equal(slice_mask(probability_map, *size, threshold, 0), full)
            assert full.any() == (peak >= np.float32(threshold))
