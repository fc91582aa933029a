"""POST /v1/series: ordering, volume in mL against a hand computation, zips, multi-frame, PNG slices, errors."""

import base64
import io
from collections.abc import Callable
from copy import deepcopy

import highdicom as hd
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as coco_mask
from pydicom.dataset import Dataset
from scipy import ndimage

from app.core.dicom import decode_dicom_slice
from app.core.limits import ImageLimits
from app.core.postprocessing import keep_largest_component
from tests.dicom.builders import AXIAL, OBLIQUE, changed, mr_series, mr_slice, slice_normal, to_bytes, zip_of
from tests.dicom.conftest import PIXEL_SPACING_MM, SIZE, SLICE_SPACING_MM, SLICES, multipart
from tests.service.conftest import encode


def masks_of(body: dict) -> np.ndarray:
    """The response's masks decoded with pycocotools, (slices, H, W) bool; empty where mask is null."""
    height, width = body["image_size"]
    masks = np.zeros((body["slice_count"], height, width), bool)
    for index, item in enumerate(body["slices"]):
        if item["mask"] is not None:
            masks[index] = coco_mask.decode(coco_mask.frPyObjects(item["mask"], height, width)).astype(bool)
    return masks


def post(client: TestClient, files: list, **query: object) -> dict:
    response = client.post("/v1/series", files=files, params=query)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def in_order(dicom_client: TestClient, series_files: list[bytes]) -> dict:
    return post(dicom_client, multipart(series_files))


def test_shuffled_files_come_back_in_anatomical_order(
    dicom_client: TestClient, series_files: list[bytes], series_datasets: list[Dataset], in_order: dict
) -> None:
    shuffled = np.random.default_rng(3).permutation(SLICES)
    body = post(dicom_client, multipart([series_files[i] for i in shuffled]))
    assert body["ordered_by"] == "position"
    # Positions grow along the slice normal with the instance number: the response follows the positions.
    assert [s["sop_instance_uid"] for s in body["slices"]] == [ds.SOPInstanceUID for ds in series_datasets]
    assert [s["index"] for s in body["slices"]] == list(range(SLICES))
    without_timing = [{k: v for k, v in b.items() if k != "total_ms"} for b in (body, in_order)]
    assert without_timing[0] == without_timing[1]


def test_volume_in_ml_is_voxels_times_voxel_size(in_order: dict) -> None:
    masks = masks_of(in_order)
    voxels = int(masks.sum())
    assert voxels > 0, "the phantom models must find the phantom's tumor"
    assert in_order["tumor_volume_voxels"] == voxels == sum(s["area_pixels"] for s in in_order["slices"])
    # By hand: 0.5 mm x 0.7 mm pixels, slices 3.3 mm apart along an oblique normal -> 1.155 mm^3 per voxel.
    assert in_order["tumor_volume_ml"] == pytest.approx(voxels * 0.5 * 0.7 * 3.3 / 1000, rel=1e-9)
    spacing = in_order["voxel_spacing"]
    assert (spacing["row_mm"], spacing["column_mm"]) == PIXEL_SPACING_MM
    assert spacing["slice_mm"] == pytest.approx(SLICE_SPACING_MM) and spacing["slice_from"] == "positions"
    assert in_order["tumor_slices"] == int(masks.any(axis=(1, 2)).sum())


def test_series_masks_equal_single_slice_predictions(
    dicom_client: TestClient, series_files: list[bytes], in_order: dict
) -> None:
    for index in (0, 5, 6):
        single = dicom_client.post("/v1/predict", files=[("file", ("one.dcm", series_files[index]))]).json()
        assert single["tumor_probability"] == pytest.approx(in_order["slices"][index]["tumor_probability"], abs=1e-6)
        assert single["area_pixels"] == in_order["slices"][index]["area_pixels"]


def test_a_zip_of_the_files_gives_the_same_result(
    dicom_client: TestClient, series_files: list[bytes], in_order: dict
) -> None:
    archive = zip_of({f"study/series/IM{n}": data for n, data in enumerate(series_files[::-1])} | {"DICOMDIR": b"x"})
    body = post(dicom_client, [("files", ("series.zip", archive, "application/zip"))])
    assert masks_of(body).tolist() == masks_of(in_order).tolist()
    assert body["tumor_volume_ml"] == pytest.approx(in_order["tumor_volume_ml"])


def test_one_multi_frame_file_gives_the_same_result(
    dicom_client: TestClient, series_datasets: list[Dataset], in_order: dict
) -> None:
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        series_datasets, series_instance_uid=hd.UID(), series_number=8, sop_instance_uid=hd.UID(), instance_number=1
    )
    buffer = io.BytesIO()
    enhanced.save_as(buffer)
    body = post(dicom_client, multipart([buffer.getvalue()]))
    assert body["slice_count"] == SLICES and body["ordered_by"] == "position"
    assert {s["sop_instance_uid"] for s in body["slices"]} == {enhanced.SOPInstanceUID}
    assert sorted(s["frame_number"] for s in body["slices"]) == list(range(1, SLICES + 1))
    assert masks_of(body).tolist() == masks_of(in_order).tolist()
    assert body["tumor_volume_ml"] == pytest.approx(in_order["tumor_volume_ml"])


@pytest.mark.parametrize(
    ("geometry", "slice_from", "slice_mm"),
    [
        ({"spacing_between_slices": 4.0, "slice_thickness": 3.0}, "SpacingBetweenSlices", 4.0),
        ({"slice_thickness": 2.5}, "SliceThickness", 2.5),
    ],
)
def test_without_positions_instance_numbers_order_and_spacing_falls_back(
    dicom_client: TestClient, flair_volume: np.ndarray, in_order: dict, geometry: dict, slice_from: str, slice_mm: float
) -> None:
    datasets = mr_series(flair_volume, bits_stored=12, **geometry)
    for ds in datasets:
        del ds.ImagePositionPatient
    body = post(dicom_client, multipart([to_bytes(ds) for ds in datasets[::-1]]))
    assert body["ordered_by"] == "instance_number"
    assert [s["sop_instance_uid"] for s in body["slices"]] == [ds.SOPInstanceUID for ds in datasets]
    assert body["voxel_spacing"]["slice_from"] == slice_from and body["voxel_spacing"]["slice_mm"] == slice_mm
    voxels = body["tumor_volume_voxels"]
    assert voxels == in_order["tumor_volume_voxels"]
    assert body["tumor_volume_ml"] == pytest.approx(voxels * 0.5 * 0.7 * slice_mm / 1000)


def test_without_pixel_spacing_there_is_no_volume_in_ml(dicom_client: TestClient, flair_volume: np.ndarray) -> None:
    datasets = mr_series(flair_volume[:4], bits_stored=12)
    for ds in datasets:
        del ds.PixelSpacing
    body = post(dicom_client, multipart([to_bytes(ds) for ds in datasets]))
    assert body["tumor_volume_ml"] is None and body["voxel_spacing"] is None
    assert body["tumor_volume_voxels"] == int(masks_of(body).sum())


def test_png_slices_are_ordered_by_the_number_in_their_names(dicom_client: TestClient, patient) -> None:
    names = [f"TCGA_XX_0001_20000101_{n + 1}.png" for n in range(SLICES)]  # 1..12, not zero-padded
    order = np.random.default_rng(1).permutation(SLICES)
    files = [("files", (names[i], encode(patient.images[i]), "image/png")) for i in order]
    body = post(dicom_client, files)
    assert body["ordered_by"] == "filename"
    assert [s["filename"] for s in body["slices"]] == names
    assert body["tumor_volume_ml"] is None and body["voxel_spacing"] is None
    assert all(s["sop_instance_uid"] is None for s in body["slices"])
    assert body["tumor_volume_voxels"] > 0


def test_largest_component_keeps_the_largest_3d_region_only(
    dicom_client: TestClient, series_files: list[bytes], in_order: dict
) -> None:
    raw = masks_of(in_order)
    labels, count = ndimage.label(raw, structure=np.ones((3, 3, 3)))
    assert count > 1, "the phantom models leave several regions: the cleanup has something to remove"
    body = post(dicom_client, multipart(series_files), largest_component="true")
    cleaned = masks_of(body)
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    assert cleaned.tolist() == (labels == largest).tolist()
    assert body["largest_component"] is True and body["tumor_volume_voxels"] == int(cleaned.sum())
    # The classifier's per-slice answers are not changed by the 3-D cleanup.
    assert [s["tumor_probability"] for s in body["slices"]] == [s["tumor_probability"] for s in in_order["slices"]]


def test_keep_largest_component_counts_diagonal_neighbours() -> None:
    volume = np.zeros((3, 6, 6), bool)
    volume[0, 0, 0] = volume[1, 1, 1] = volume[2, 2, 2] = True  # 3 voxels touching only at corners
    volume[0, 4:6, 4:6] = True  # 4 voxels, apart
    kept = keep_largest_component(volume)
    assert kept.sum() == 4 and kept[0, 4:6, 4:6].all()
    volume[1, 5, 5] = volume[2, 5, 5] = True  # now the second region has 6 voxels; the diagonal chain 3
    volume[1, 2, 2] = volume[2, 3, 3] = volume[2, 1, 1] = volume[0, 1, 0] = True  # chain grows to 7
    kept = keep_largest_component(volume)
    assert kept.sum() == 7 and kept[2, 2, 2] and not kept[0, 4, 4]
    assert keep_largest_component(np.zeros((2, 3, 3), bool)).sum() == 0


def test_include_images_returns_the_8bit_flair_the_models_saw(
    dicom_client: TestClient, series_files: list[bytes]
) -> None:
    body = post(dicom_client, multipart(series_files[:2]), include_images="true", mask_format="none")
    for data, item in zip(series_files[:2], body["slices"], strict=True):
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["image"]))))
        np.testing.assert_array_equal(shown, decode_dicom_slice(data, ImageLimits()))
        assert item["mask"] is None


def test_bad_series_are_refused_with_a_clear_4xx(
    dicom_client: TestClient, series_files: list[bytes], series_datasets: list[Dataset], flair_volume: np.ndarray
) -> None:
    other_series = to_bytes(mr_series(flair_volume[:1], bits_stored=12)[0])
    same_position = [changed(ds, ImagePositionPatient=[0, 0, 0]) for ds in series_datasets[:2]]
    tilted = [changed(series_datasets[0], ImageOrientationPatient=list(AXIAL)), *series_files[1:3]]
    first = series_datasets[0]
    small = to_bytes(
        mr_slice(
            flair_volume[0, :64, :64],
            series_uid=first.SeriesInstanceUID,
            study_uid=first.StudyInstanceUID,
            frame_of_reference_uid=first.FrameOfReferenceUID,
            position=(0.0, 0.0, 99.0),
            orientation=OBLIQUE,
        )
    )
    png = ("files", ("slice_1.png", encode(flair_volume[0].astype(np.uint8)), "image/png"))
    cases = [
        (multipart([series_files[0], other_series]), 400, "different series"),
        (multipart([series_files[0], series_files[0]]), 400, "more than once"),
        (multipart(same_position), 400, "same position"),
        (multipart(tilted), 400, "orientations"),
        ([*multipart(series_files[:1]), png], 400, "mixes"),
        (multipart([series_files[0]]) + multipart([small], ["x.dcm"]), 400, "differ in size"),
        ([("files", ("a.png", encode(flair_volume[0].astype(np.uint8)), "image/png"))] * 2, 400, "no slice number"),
        ([("files", ("s.zip", b"PK\x03\x04 broken", "application/zip"))], 400, "zip"),
        (multipart([series_files[0], series_files[1][:2000]]), 400, "IM0001.dcm"),
        ([("files", ("notes_1.txt", b"hello", "text/plain"))], 415, "notes_1.txt"),
    ]
    for files, status, phrase in cases:
        response = dicom_client.post("/v1/series", files=files)
        assert response.status_code == status, (phrase, response.text)
        assert phrase in response.json()["detail"], (phrase, response.text)


def test_series_limits_are_413(make_dicom_client: Callable[..., TestClient], series_files: list[bytes]) -> None:
    client = make_dicom_client(max_batch_files=3)
    response = client.post("/v1/series", files=multipart(series_files[:4]))
    assert response.status_code == 413 and "more than" in response.json()["detail"]
    archive = zip_of({f"IM{n}": data for n, data in enumerate(series_files[:4])})
    response = client.post("/v1/series", files=[("files", ("s.zip", archive, "application/zip"))])
    assert response.status_code == 413
    assert client.post("/v1/series", files=multipart(series_files[:3])).status_code == 200


def test_series_needs_files(dicom_client: TestClient) -> None:
    assert dicom_client.post("/v1/series").status_code == 422


def test_slice_normal_is_row_cross_column() -> None:
    assert slice_normal(AXIAL).tolist() == [0.0, 0.0, 1.0]


@pytest.mark.parametrize(
    ("keyword", "first", "phrase"),
    [
        ("PatientID", "OTHER-PATIENT", "different patients (PatientID differs)"),
        ("StudyInstanceUID", "1.2.3.4", "different studies (StudyInstanceUID differs)"),
        ("FrameOfReferenceUID", "1.2.3.5", "different frames of reference (FrameOfReferenceUID differs)"),
        ("PixelSpacing", [0.9, 0.9], "different pixel spacings"),
        ("ImageOrientationPatient", None, "ImageOrientationPatient and others not"),
    ],
)
def test_a_series_mixing_patients_studies_or_geometry_is_a_400(
    dicom_client: TestClient, series_datasets: list[Dataset], keyword: str, first: object, phrase: str
) -> None:
    mixed = deepcopy(series_datasets[0])
    if first is None:
        delattr(mixed, keyword)
    else:
        setattr(mixed, keyword, first)
    response = dicom_client.post("/v1/series", files=multipart([to_bytes(mixed), *map(to_bytes, series_datasets[1:4])]))
    assert response.status_code == 400 and phrase in response.json()["detail"], response.text
    assert "OTHER-PATIENT" not in response.text  # identifying values are never quoted


def test_series_pixel_budget_is_the_request_pixel_setting(
    make_dicom_client: Callable[..., TestClient], series_files: list[bytes]
) -> None:
    client = make_dicom_client(max_request_pixels=3 * SIZE * SIZE)  # three 128 x 128 slices
    assert client.post("/v1/series", files=multipart(series_files[:3])).status_code == 200
    response = client.post("/v1/series", files=multipart(series_files[:4]))
    assert response.status_code == 413 and "decoded pixel values" in response.json()["detail"]


def test_batch_pixel_budget_refuses_only_the_files_past_it(
    make_dicom_client: Callable[..., TestClient], series_files: list[bytes]
) -> None:
    client = make_dicom_client(max_request_pixels=2 * SIZE * SIZE)
    files = [("files", (f"IM{n}.dcm", data, "application/dicom")) for n, data in enumerate(series_files[:3])]
    body = client.post("/v1/predict/batch", files=files).json()
    assert [item["status_code"] for item in body["results"]] == [200, 200, 413]
    assert "decoded pixel values" in body["results"][2]["detail"]
