"""The hospital-network routes and the node without a PACS: off by default, the DICOMweb URL allow-list, a SEG
nobody takes, a full spool."""

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage

from tests.dicom.builders import AXIAL, mr_series
from tests.pacs.orthanc import free_port

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


def node_client(make_dicom_client: Callable[..., TestClient], tmp_path: Path, **settings: object) -> TestClient:
    """An in-process app with the node on a free port, sending to an AE where nobody listens."""
    node = {
        "dicom_node": True,
        "dicom_host": "127.0.0.1",
        "dicom_port": 0,
        "dicom_destination": f"NOBODY@127.0.0.1:{free_port()}",
        "dicom_quiet_s": 0.2,
        "dicom_spool_dir": tmp_path / "spool",
    }
    return make_dicom_client(**(node | settings))


def c_store(client: TestClient, datasets: list) -> list[int]:
    ae = AE(ae_title="TEST-SCU")
    ae.add_requested_context(MRImageStorage)
    port = client.get("/v1/dicom-node").json()["port"]
    association = ae.associate("127.0.0.1", port, ae_title="LGG-TUMOR")
    assert association.is_established
    try:
        return [association.send_c_store(ds).Status for ds in datasets]
    finally:
        association.release()


def test_a_seg_the_destination_does_not_take_stays_in_the_spool(
    make_dicom_client: Callable[..., TestClient], tmp_path: Path
) -> None:
    client = node_client(make_dicom_client, tmp_path)
    datasets = mr_series(np.full((3, 32, 32), 200, np.uint8), orientation=AXIAL)
    assert c_store(client, datasets) == [0x0000] * 3
    deadline = time.monotonic() + 60
    while not (failed := client.get("/v1/dicom-node/failed").json()):
        assert time.monotonic() < deadline, "the series never failed"
        time.sleep(0.05)
    assert failed[0]["instances"] == 3 and "no association with NOBODY" in failed[0]["error"]
    assert len(list((tmp_path / "spool" / "failed").rglob("*.dcm"))) == 3


def test_a_full_spool_answers_out_of_resources(make_dicom_client: Callable[..., TestClient], tmp_path: Path) -> None:
    client = node_client(make_dicom_client, tmp_path, dicom_spool_max_bytes=5000, dicom_quiet_s=3600)
    datasets = mr_series(np.zeros((3, 32, 32), np.uint8), orientation=AXIAL)  # about 2 kB each
    assert c_store(client, datasets) == [0x0000, 0x0000, 0xA700]
    metrics = client.get("/metrics").text
    assert 'lgg_dicom_instances_received_total{outcome="spool_full"} 1.0' in metrics
    assert client.get("/v1/dicom-node").json()["series"]["incoming"] == 1
