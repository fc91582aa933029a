"""POST /v1/series?output=seg: a DICOM SEG that highdicom reads back, frames equal to the JSON masks."""

import io
import json
from collections.abc import Callable
from copy import deepcopy
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from tests.dicom.builders import to_bytes
from tests.dicom.conftest import SLICES, multipart
from tests.dicom.test_series import masks_of, post
from tests.service.conftest import encode


def read_seg(client: TestClient, files: list, **query: object) -> hd.seg.Segmentation:
    response = client.post("/v1/series", files=files, params={"output": "seg", **query})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    return hd.seg.segread(io.BytesIO(response.content))


@pytest.mark.parametrize("largest_component", [False, True])
def test_seg_frames_equal_the_json_masks(
    dicom_client: TestClient, series_files: list[bytes], series_datasets: list[Dataset], largest_component: bool
) -> None:
    shuffled = [series_files[i] for i in np.random.default_rng(7).permutation(SLICES)]
    body = post(dicom_client, multipart(shuffled), largest_component=str(largest_component).lower())
    seg = read_seg(dicom_client, multipart(shuffled), largest_component=str(largest_component).lower())
    uids = [s["sop_instance_uid"] for s in body["slices"]]
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    assert frames.shape == (SLICES, *body["image_size"])
    expected = masks_of(body)
    assert expected.any()
    np.testing.assert_array_equal(frames.astype(bool), expected)
    assert {source[2] for source in seg.get_source_image_uids()} == {ds.SOPInstanceUID for ds in series_datasets}


def no_tumor_models(phantom_models_dir: Path) -> Path:
    """The phantom models under a card whose classifier threshold no probability reaches."""
    folder = phantom_models_dir.parent / "no-tumor-phantom"
    if not folder.exists():
        folder.mkdir()
        card = json.loads((phantom_models_dir / "model_card.json").read_text())
        card["models"]["classifier"]["threshold"] = 1.01
        for kind in ("classifier", "segmenter"):
            (folder / card["models"][kind]["file"]).symlink_to(phantom_models_dir / card["models"][kind]["file"])
        (folder / "model_card.json").write_text(json.dumps(card))
    return folder


def test_seg_identifies_the_algorithm_and_is_marked_research_use(
    dicom_client: TestClient, series_files: list[bytes], series_datasets: list[Dataset]
) -> None:
    seg = read_seg(dicom_client, multipart(series_files))
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == series_datasets[0].StudyInstanceUID  # filed with its study
    assert seg.SeriesInstanceUID != series_datasets[0].SeriesInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {ds.SOPInstanceUID for ds in series_datasets}
    segment = seg.get_segment_description(1)
    assert segment.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
    algorithm = segment.algorithm_identification[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("phantom-flair-threshold", "test.1")
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == codes.DCM.ArtificialIntelligence.value
    assert segment.segmented_property_type == codes.SCT.Neoplasm
    assert "RESEARCH USE ONLY" in seg.SeriesDescription and "RESEARCH USE ONLY" in seg.ContentDescription


def test_seg_of_a_multi_frame_source_follows_its_frames(
    dicom_client: TestClient, series_datasets: list[Dataset]
) -> None:
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        series_datasets, series_instance_uid=hd.UID(), series_number=8, sop_instance_uid=hd.UID(), instance_number=1
    )
    buffer = io.BytesIO()
    enhanced.save_as(buffer)
    files = multipart([buffer.getvalue()])
    body = post(dicom_client, files)
    seg = read_seg(dicom_client, files)
    frame_numbers = [s["frame_number"] for s in body["slices"]]
    frames = seg.get_pixels_by_source_frame(
        source_sop_instance_uid=enhanced.SOPInstanceUID, source_frame_numbers=frame_numbers, segment_numbers=[1]
    )[..., 0]
    np.testing.assert_array_equal(frames.astype(bool), masks_of(body))


def test_seg_of_a_tumor_free_series_is_all_empty_frames(
    make_dicom_client: Callable[..., TestClient], series_files: list[bytes], phantom_models_dir: Path
) -> None:
    client = make_dicom_client(model_dir=no_tumor_models(phantom_models_dir))
    seg = read_seg(client, multipart(series_files[:3]))
    assert seg.NumberOfFrames == 3
    assert not seg.pixel_array.any()


def test_seg_needs_dicom_input(dicom_client: TestClient, patient) -> None:
    files = [("files", (f"slice_{n}.png", encode(patient.images[n]), "image/png")) for n in range(2)]
    response = dicom_client.post("/v1/series", files=files, params={"output": "seg"})
    assert response.status_code == 400 and "DICOM" in response.json()["detail"]


TYPE2_DROPPED = ("StudyTime", "StudyDate", "StudyID", "AccessionNumber", "ReferringPhysicianName", "PatientBirthDate")


def without(datasets: list[Dataset], *keywords: str) -> list[bytes]:
    """The files of deep copies of `datasets` lacking `keywords` (the fixtures stay untouched)."""
    files = []
    for ds in datasets:
        copy = deepcopy(ds)
        for keyword in keywords:
            delattr(copy, keyword)
        files.append(to_bytes(copy))
    return files


def test_seg_of_sources_missing_type2_attributes_writes_them_empty(
    dicom_client: TestClient, series_datasets: list[Dataset]
) -> None:
    stripped = without(series_datasets[:3], *TYPE2_DROPPED, "PatientSex", "SeriesNumber")
    seg = read_seg(dicom_client, multipart(stripped))
    for keyword in (*TYPE2_DROPPED, "PatientSex"):
        assert keyword in seg and seg.get(keyword) in (None, ""), keyword
    assert seg.StudyInstanceUID == series_datasets[0].StudyInstanceUID and seg.NumberOfFrames == 3


def test_seg_of_sources_without_usable_geometry_is_a_clear_400(
    dicom_client: TestClient, series_datasets: list[Dataset]
) -> None:
    no_orientation = without(series_datasets[:3], "ImageOrientationPatient", "ImagePositionPatient")
    assert dicom_client.post("/v1/series", files=multipart(no_orientation)).status_code == 200  # JSON needs none
    response = dicom_client.post("/v1/series", files=multipart(no_orientation), params={"output": "seg"})
    assert response.status_code == 400 and "DICOM SEG" in response.json()["detail"], response.text
