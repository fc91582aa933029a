"""The hospital-network routes without a PACS: off by default, and the DICOMweb URL allow-list."""

from collections.abc import Callable

from fastapi.testclient import TestClient

REQUEST = {"study_instance_uid": "1.2.3", "series_instance_uid": "1.2.3.4"}


def test_the_dicom_node_is_off_by_default(make_dicom_client: Callable[..., TestClient]) -> None:
    client = make_dicom_client()
    for method, path in (("GET", "/v1/dicom-node"), ("GET", "/v1/dicom-node/failed"),
                         ("POST", "/v1/dicom-node/failed/x/retry")):  # fmt: skip
        response = client.request(method, path)
        assert response.status_code == 404 and "LGG_DICOM_NODE=true" in response.json()["detail"]


def test_dicomweb_urls_outside_the_allow_list_are_refused(make_dicom_client: Callable[..., TestClient]) -> None:
    client = make_dicom_client(dicomweb_allowed_urls="http://pacs.hospital.example/dicom-web")
    response = client.post("/v1/dicomweb/series", json={"dicomweb_url": "http://169.254.169.254/latest", **REQUEST})
    assert response.status_code == 403 and "LGG_DICOMWEB_ALLOWED_URLS" in response.json()["detail"]


def test_dicomweb_request_fields_are_checked(make_dicom_client: Callable[..., TestClient]) -> None:
    client = make_dicom_client()
    bad_uid = {**REQUEST, "series_instance_uid": "1.2.3.4; DROP"}
    response = client.post("/v1/dicomweb/series", json={"dicomweb_url": "http://pacs/dicom-web", **bad_uid})
    assert response.status_code == 422 and "series_instance_uid" in response.json()["detail"]
