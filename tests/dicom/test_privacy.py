"""Patient attributes of uploaded DICOM never reach logs, metrics or JSON responses."""

import io
import logging

import highdicom as hd
import pytest
from fastapi.testclient import TestClient

from tests.dicom.builders import CANARY_BIRTH_DATE, CANARY_ID, CANARY_NAME
from tests.dicom.conftest import multipart

CANARIES = (CANARY_NAME, CANARY_NAME.split("^")[0], CANARY_ID, CANARY_BIRTH_DATE, "ACC-CANARY")


def assert_no_canary(text: str, where: str) -> None:
    for canary in CANARIES:
        assert canary not in text, f"{canary!r} leaked into {where}"


def test_no_patient_attribute_in_logs_metrics_or_json(
    dicom_client: TestClient, series_files: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    names = [f"IM{n}.dcm" for n in range(len(series_files))]
    requests = [
        ("/v1/series", {"files": multipart(series_files, names)}, {}),
        ("/v1/series", {"files": multipart(series_files, names)}, {"include_images": "true", "mask_format": "png"}),
        ("/v1/predict", {"files": [("file", ("x.dcm", series_files[6], "application/dicom"))]}, {}),
        ("/v1/predict/batch", {"files": multipart(series_files[:2])}, {}),
        ("/v1/predict/overlay.png", {"files": [("file", ("x.dcm", series_files[6]))]}, {}),
    ]
    for path, files, query in requests:
        response = dicom_client.post(path, params=query, **files)
        assert response.status_code == 200, response.text
        assert_no_canary(response.text if response.headers["content-type"] == "application/json" else "", path)
    broken = series_files[3][: len(series_files[3]) // 2]
    for files in (multipart([broken]), multipart([series_files[0], series_files[0]])):
        response = dicom_client.post("/v1/series", files=files)
        assert response.status_code == 400
        assert_no_canary(response.text, "an error response")
    assert_no_canary(caplog.text, "the logs")
    assert_no_canary(dicom_client.get("/metrics").text, "/metrics")


def test_the_seg_carries_the_patient_module_so_a_pacs_files_it_with_the_images(
    dicom_client: TestClient, series_files: list[bytes], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = dicom_client.post("/v1/series", files=multipart(series_files), params={"output": "seg"})
    seg = hd.seg.segread(io.BytesIO(response.content))
    assert (str(seg.PatientName), seg.PatientID) == (CANARY_NAME, CANARY_ID)  # to the caller only
    assert_no_canary(caplog.text, "the logs")
