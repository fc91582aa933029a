"""Real kaggle_3m slices wrapped in DICOM: same predictions as the WebP files, volume in mL by hand.

Runs on the phantom models always and on the bundled models in models/ when they are there.
"""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.uid import RLELossless

from tests.dicom.builders import AXIAL, mr_series, to_bytes
from tests.dicom.conftest import multipart
from tests.dicom.test_series import masks_of, post

pytestmark = pytest.mark.real_data
PATIENT = "TCGA_CS_4941_19960909"
SLICE_NUMBERS = range(8, 20)  # around the tumor of this patient
PIXEL_SPACING_MM, SLICE_SPACING_MM = (0.9375, 0.9375), 2.5


@pytest.fixture(scope="module", params=["phantom", "bundled"])
def client(
    request: pytest.FixtureRequest,
    dicom_client: TestClient,
    make_dicom_client: Callable[..., TestClient],
    bundled_models_dir: Path,
) -> TestClient:
    if request.param == "phantom":
        return dicom_client
    if not (bundled_models_dir / "model_card.json").is_file():
        pytest.skip("no bundled models in models/")
    return make_dicom_client(model_dir=bundled_models_dir)


@pytest.fixture(scope="module")
def real_slices(real_data_dir: Path) -> tuple[list[Path], np.ndarray]:
    paths = [real_data_dir / PATIENT / f"{PATIENT}_{n}.webp" for n in SLICE_NUMBERS]
    return paths, np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths])


def test_rgb_dicom_predicts_exactly_what_the_webp_does(client: TestClient, real_slices) -> None:
    paths, images = real_slices
    datasets = mr_series(images, pixel_spacing=PIXEL_SPACING_MM, slice_spacing=SLICE_SPACING_MM, orientation=AXIAL)
    for path, ds in zip(paths[3:6], datasets[3:6], strict=True):
        from_webp = client.post("/v1/predict", files=[("file", (path.name, path.read_bytes(), "image/webp"))]).json()
        ds.compress(RLELossless)  # a compressed transfer syntax on the way
        from_dicom = client.post("/v1/predict", files=[("file", ("x.dcm", to_bytes(ds), "application/dicom"))]).json()
        for key in ("tumor_detected", "tumor_probability", "mask", "area_pixels", "bbox"):
            assert from_dicom[key] == from_webp[key], key


def test_flair_series_volume_in_ml_by_hand(
    client: TestClient, real_slices, real_data_dir: Path, request: pytest.FixtureRequest
) -> None:
    _, images = real_slices
    flair = images[..., 1].astype(np.uint16) * 8  # 11-bit stored values, windowed back by the percentile rule
    datasets = mr_series(flair, pixel_spacing=PIXEL_SPACING_MM, slice_spacing=SLICE_SPACING_MM, bits_stored=11)
    body = post(client, multipart([to_bytes(ds) for ds in datasets[::-1]]))
    assert [s["sop_instance_uid"] for s in body["slices"]] == [ds.SOPInstanceUID for ds in datasets]
    voxels = int(masks_of(body).sum())  # counted here from the masks, decoded by pycocotools
    assert voxels > 0, "these slices hold a tumor: an empty prediction would make the volume check hollow"
    assert body["tumor_volume_voxels"] == voxels
    # By hand: 0.9375 mm x 0.9375 mm pixels, slices 2.5 mm apart -> 2.197265625 mm^3 = 0.002197265625 mL per voxel.
    assert body["tumor_volume_ml"] == pytest.approx(voxels * 0.002197265625, rel=1e-9)
    truth_ml = (
        sum(
            int((np.asarray(Image.open(real_data_dir / PATIENT / f"{PATIENT}_{n}_mask.png")) > 0).sum())
            for n in SLICE_NUMBERS
        )
        * 0.002197265625
    )
    assert truth_ml > 1.0  # this patient's tumor over these slices: several mL
    if request.node.callspec.params["client"] == "bundled":  # the trained models find about the true volume
        assert body["tumor_volume_ml"] == pytest.approx(truth_ml, rel=0.5), (body["tumor_volume_ml"], truth_ml)
