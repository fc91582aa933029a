"""Real kaggle_3m slices through the service equal what the training code computes (no train/serve skew)."""

import functools
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.core.onnx_sessions import read_model_card
from app.core.postprocessing import BOTH_NETWORKS
from app.core.preprocessing import preprocess_slice
from tests.service.conftest import coco_decode

pytestmark = pytest.mark.real_data


@functools.cache
def onnx_session(path: Path) -> ort.InferenceSession:
    """One session per network file: the tumor folder's files are symlinks to the bundled ones."""
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def training_reference(model_dir: Path, image_path: Path) -> tuple[float, np.ndarray]:
    """What `python -m training evaluate` and `cv` compute for the slice: its reader, the shared preprocessing,
    the exported ONNX models, `selection.pipeline_masks` with the card's thresholds and the card's
    tumor_probability rule."""
    dataset = pytest.importorskip("training.dataset", reason="training code needs torch")
    selection = pytest.importorskip("training.selection", reason="training code needs torch")
    image = dataset.read_image(image_path)
    card = read_model_card(model_dir)
    batch = preprocess_slice(image, card.input_size)[None]
    outputs = {}
    for spec in (card.classifier, card.segmenter):
        outputs[spec.kind] = onnx_session(spec.path.resolve()).run([spec.output_name], {spec.input_name: batch})[0]
    postprocessing = card.card.postprocessing
    thresholds = selection.Thresholds(
        card.classifier.threshold,
        card.segmenter.threshold,
        (postprocessing and postprocessing.min_component_pixels) or 0,
    )
    slice_outputs = selection.Outputs(np.arange(1), outputs["classifier"][:, 0], outputs["segmenter"][:, 0])
    masks = selection.pipeline_masks(slice_outputs, image.shape[:2], thresholds)
    reported = slice_outputs.classifier_probability
    if postprocessing and postprocessing.tumor_probability == BOTH_NETWORKS:
        reported = selection.reported_probability(slice_outputs, card.classifier.threshold)
    return float(reported[0]), masks[0]


def tumor_slices(folder: Path, count: int) -> list[Path]:
    """The first `count` slices of the first patient whose ground-truth mask is not empty."""
    patient = sorted(p for p in folder.iterdir() if p.is_dir())[0]
    found = []
    for mask_path in sorted(patient.glob("*_mask.*")):
        with Image.open(mask_path) as mask:
            if np.asarray(mask.convert("L")).any():
                stem = mask_path.name.rsplit("_mask", 1)[0]
                found += [p for p in patient.glob(stem + ".*") if p != mask_path]
        if len(found) >= count:
            return found
    return found


@pytest.mark.parametrize("source", ["webp", "tif"])
def test_service_equals_training_on_real_slices(
    source: str,
    client: TestClient,
    tumor_client: TestClient,
    bundled_models_dir: Path,
    tumor_models_dir: Path,
    request: pytest.FixtureRequest,
) -> None:
    folder = request.getfixturevalue("real_data_dir" if source == "webp" else "real_tif_sample_dir")
    paths = tumor_slices(folder, 2)
    assert paths, f"no tumor slices found under {folder}"
    for path in paths:
        # The bundled card's thresholds, then thresholds that force a mask so masks are compared too.
        for service, model_dir in ((client, bundled_models_dir), (tumor_client, tumor_models_dir)):
            response = service.post("/v1/predict", files={"file": (path.name, path.read_bytes())})
            assert response.status_code == 200, response.text
            body = response.json()
            tumor_probability, mask = training_reference(model_dir, path)
            assert body["tumor_probability"] == pytest.approx(tumor_probability, abs=1e-5)
            if body["tumor_detected"]:
                np.testing.assert_array_equal(coco_decode(body["mask"]), mask)
            else:
                assert body["mask"] is None
                assert not mask.any(), "training's pipeline gives a mask where the service gives none"
        assert tumor_client.post("/v1/predict", files={"file": (path.name, path.read_bytes())}).json()["mask"]
