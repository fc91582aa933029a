"""Patient attributes of uploaded DICOM never reach logs, metrics or JSON responses."""

import io
import logging
import warnings

import highdicom as hd
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from tests.dicom.builders import CANARY_BIRTH_DATE, CANARY_ID, CANARY_NAME, changed
from tests.dicom.conftest import multipart

CANARY_SEX, CANARY_TIME = "canary sex", "25:99:99canary"
CANARIES = (CANARY_NAME, CANARY_NAME.split("^")[0], CANARY_ID, CANARY_BIRTH_DATE, "ACC-CANARY", CANARY_SEX, "canary")


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


def test_malformed_patient_values_are_not_quoted_in_warnings_or_logs(
    dicom_client: TestClient, series_datasets: list[Dataset], caplog: pytest.LogCaptureFixture
) -> None:
    """pydicom's validation quotes bad values in warnings and logs; the service must not let it."""
    caplog.set_level(logging.DEBUG)
    malformed = {
        "PatientBirthDate": f"{CANARY_BIRTH_DATE}-not-a-date",
        "PatientName": CANARY_NAME * 4,  # PN components have at most 64 characters
        "PatientSex": CANARY_SEX,  # not one of the CS characters
        "StudyTime": CANARY_TIME,
    }
    files = [changed(ds, **malformed) for ds in series_datasets[:3]]
    caplog.clear()  # only what the service does counts, not what building the test files did
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dicom_client.post("/v1/series", files=multipart(files)).status_code == 200
        # A SEG copies the birth date as a DA and cannot: highdicom's message quotes the value, the service not.
        response = dicom_client.post("/v1/series", files=multipart(files), params={"output": "seg"})
    assert response.status_code == 400 and "<redacted>" in response.json()["detail"]
    assert_no_canary(response.text, "the SEG error")
    assert_no_canary("\n".join(str(w.message) for w in caught), "warnings")
    assert_no_canary(caplog.text, "the logs")
