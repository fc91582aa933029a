"""The service in a hospital network, against a real Orthanc PACS and a real uvicorn.

(a) Orthanc sends a series by C-STORE to the service's DICOM node; the SEG comes back into Orthanc by C-STORE.
(b) POST /v1/dicomweb/series pulls the series from Orthanc (WADO-RS); the SEG goes back by STOW-RS.
Both SEGs, read back from Orthanc, reference the source instances and their frames equal the masks
POST /v1/series returns for the same files; the volume in mL is checked by hand. A series that cannot be
processed stays in the spool with its error (route, metrics, logs without patient identifiers) and is retried.

The series: 30 real LGG slices when ../shared/data/lgg is there (the bundled models), else 30 synthetic ones.
"""

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import MRImageStorage, Verification

from app.cli import main
from tests.dicom.builders import CANARY_ID, CANARY_NAME, mr_series
from tests.pacs import lgg_series
from tests.pacs.lgg_series import PIXEL_SPACING_MM, SLICE_SPACING_MM, SLICES
from tests.pacs.orthanc import free_port, missing
from tests.pacs.stack import NODE_AE, NODE_MODALITY, Stack, running_stack
from tests.service.conftest import coco_decode

if missing():
    pytest.skip(missing(), allow_module_level=True)
hd = pytest.importorskip("highdicom")

pytestmark = pytest.mark.slow
TEST_AE = "TEST-SCU"
QUIET_S = 1.0
WAIT_S = 120.0


@pytest.fixture(scope="module")
def series_files() -> list[bytes]:
    return lgg_series.series_files(lgg_series.load_volume())


@pytest.fixture(scope="module")
def models_dir(request: pytest.FixtureRequest) -> Path:
    """The bundled models on the real slices; the phantom models (bright FLAIR is tumor) on synthetic ones."""
    return lgg_series.BUNDLED_MODELS if lgg_series.real_data() else request.getfixturevalue("phantom_models_dir")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("pacs"), models_dir, QUIET_S, allowed_calling_aes=(TEST_AE,)) as stack:
        yield stack


@dataclass
class Expected:
    """POST /v1/series for the same files: the mask per SOP Instance UID, and the JSON."""

    masks: dict[str, np.ndarray]
    body: dict


@pytest.fixture(scope="module")
def expected(stack: Stack, series_files: list[bytes]) -> Expected:
    parts = [("files", (f"{n}.dcm", data, "application/dicom")) for n, data in enumerate(series_files)]
    body = httpx.post(f"{stack.service.url}/v1/series", files=parts, timeout=WAIT_S).json()
    height, width = body["image_size"]
    masks = {s["sop_instance_uid"]: coco_decode(s["mask"]) if s["mask"] else np.zeros((height, width), bool)
             for s in body["slices"]}  # fmt: skip
    return Expected(masks, body)


def check_seg(seg_bytes: bytes, files: list[bytes], expected: dict[str, np.ndarray]) -> int:
    """The SEG references every source instance and its frames equal the service's masks; its voxel count."""
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(seg_bytes)))
    sources = [pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True) for f in files]
    uids = [str(s.SOPInstanceUID) for s in sources]
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    assert referenced == set(uids)
    assert str(seg.StudyInstanceUID) == str(sources[0].StudyInstanceUID)
    frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[..., 0]
    for uid, frame in zip(uids, frames, strict=True):
        assert np.array_equal(frame.astype(bool), expected[uid]), uid
    return int(frames.astype(bool).sum())


def check_volume(body: dict, voxels: int) -> None:
    by_hand = voxels * PIXEL_SPACING_MM[0] * PIXEL_SPACING_MM[1] * SLICE_SPACING_MM / 1000
    assert body["tumor_volume_voxels"] == voxels > 0
    assert body["tumor_volume_ml"] == pytest.approx(by_hand, rel=1e-9)


def test_orthanc_sends_a_series_and_gets_the_seg_back(
    stack: Stack, series_files: list[bytes], expected: Expected
) -> None:
    pacs, service = stack.pacs, stack.service
    series_id = pacs.store(series_files)
    known = set(pacs.find("Instance", Modality="SEG"))
    started = time.perf_counter()
    pacs.rest("POST", f"/modalities/{NODE_MODALITY}/store", json={"Resources": [series_id], "Synchronous": True})
    stored = time.perf_counter()
    seg_id = pacs.wait_for_new_seg(known, WAIT_S)
    arrived = time.perf_counter()
    print(
        f"\n{SLICES}-slice series: C-STORE to the node {stored - started:.2f} s; C-STORE start to SEG in Orthanc "
        f"{arrived - started:.2f} s, of which quiet time {QUIET_S:g} s"
    )
    voxels = check_seg(pacs.instance_file(seg_id), series_files, expected.masks)
    check_volume(expected.body, voxels)
    state = httpx.get(f"{service.url}/v1/dicom-node", timeout=10).json()
    assert state["series"] == {"incoming": 0, "processing": 0, "failed": 0} and state["spool_bytes"] == 0
    metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert f'lgg_dicom_instances_received_total{{outcome="stored"}} {float(SLICES)}' in metrics
    assert 'lgg_dicom_series_total{outcome="sent"} 1.0' in metrics


def test_dicomweb_route_pulls_from_orthanc_and_stores_the_seg(
    stack: Stack, series_files: list[bytes], expected: Expected
) -> None:
    pacs, service = stack.pacs, stack.service
    pacs.store(series_files)
    first = pydicom.dcmread(io.BytesIO(series_files[0]), stop_before_pixels=True)
    response = httpx.post(
        f"{service.url}/v1/dicomweb/series",
        json={
            "dicomweb_url": pacs.dicomweb_url,
            "study_instance_uid": str(first.StudyInstanceUID),
            "series_instance_uid": str(first.SeriesInstanceUID),
        },
        timeout=WAIT_S,
    )
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["stored"] and result["slice_count"] == SLICES
    seg_ids = pacs.find("Instance", SOPInstanceUID=result["seg_sop_instance_uid"])
    assert len(seg_ids) == 1
    voxels = check_seg(pacs.instance_file(seg_ids[0]), series_files, expected.masks)
    check_volume(expected.body, voxels)
    assert result["tumor_volume_voxels"] == voxels
    assert result["tumor_volume_ml"] == pytest.approx(expected.body["tumor_volume_ml"], rel=1e-9)


def test_dicomweb_errors_are_clear(stack: Stack) -> None:
    service, pacs = stack.service, stack.pacs
    unknown = {"study_instance_uid": "1.2.3.4", "series_instance_uid": "1.2.3.5"}
    response = httpx.post(
        f"{service.url}/v1/dicomweb/series", json={"dicomweb_url": pacs.dicomweb_url, **unknown}, timeout=WAIT_S
    )
    assert response.status_code == 404, response.text
    down = f"http://127.0.0.1:{free_port()}/dicom-web"
    response = httpx.post(f"{service.url}/v1/dicomweb/series", json={"dicomweb_url": down, **unknown}, timeout=WAIT_S)
    assert response.status_code == 502 and "cannot be reached" in response.json()["detail"]


def associate(stack: Stack, calling_ae: str):
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(Verification)
    ae.add_requested_context(MRImageStorage)
    port = httpx.get(f"{stack.service.url}/v1/dicom-node", timeout=10).json()["port"]
    return ae.associate("127.0.0.1", port, ae_title=NODE_AE)


def test_c_echo_and_the_calling_ae_allow_list(stack: Stack) -> None:
    association = associate(stack, TEST_AE)
    assert association.is_established
    assert association.send_c_echo().Status == 0x0000
    association.release()
    assert not associate(stack, "INTRUDER").is_established


def test_a_failed_series_stays_in_the_spool_with_its_error_and_is_retried(
    stack: Stack, series_files: list[bytes]
) -> None:
    service = stack.service
    # Two slices at one position: read_series refuses the stack, as POST /v1/series would (400).
    datasets = mr_series(
        np.zeros((3, 32, 32), np.uint8), pixel_spacing=PIXEL_SPACING_MM, slice_spacing=SLICE_SPACING_MM
    )
    datasets[2].ImagePositionPatient = datasets[1].ImagePositionPatient
    association = associate(stack, TEST_AE)
    assert association.is_established
    statuses = [association.send_c_store(ds).Status for ds in datasets]
    association.release()
    assert statuses == [0x0000] * 3  # stored in the spool: the sender may forget them
    deadline = time.monotonic() + WAIT_S
    while not (failed := httpx.get(f"{service.url}/v1/dicom-node/failed", timeout=10).json()):
        assert time.monotonic() < deadline, "the series never failed"
        time.sleep(0.1)
    [item] = failed
    assert item["instances"] == 3 and item["attempts"] == 1 and "same position" in item["error"]
    metrics = httpx.get(f"{service.url}/metrics", timeout=10).text
    assert 'lgg_dicom_series_total{outcome="failed"} 1.0' in metrics
    assert 'lgg_dicom_spool_series{state="failed"} 1.0' in metrics
    retried = httpx.post(f"{service.url}/v1/dicom-node/failed/{item['batch']}/retry", timeout=10)
    assert retried.status_code == 202
    deadline = time.monotonic() + WAIT_S
    while [f["attempts"] for f in httpx.get(f"{service.url}/v1/dicom-node/failed", timeout=10).json()] != [2]:
        assert time.monotonic() < deadline, "the retry never ran"
        time.sleep(0.1)
    assert httpx.post(f"{service.url}/v1/dicom-node/failed/nope/retry", timeout=10).status_code == 404
    for text in (service.log(), metrics, str(failed)):
        assert CANARY_NAME not in text and CANARY_ID not in text
        assert str(datasets[0].SeriesInstanceUID) not in text


def test_dicomweb_cli(stack: Stack, series_files: list[bytes], capsys: pytest.CaptureFixture[str]) -> None:
    pacs, service = stack.pacs, stack.service
    pacs.store(series_files)
    first = pydicom.dcmread(io.BytesIO(series_files[0]), stop_before_pixels=True)
    uids = ["--study", str(first.StudyInstanceUID), "--series", str(first.SeriesInstanceUID)]
    assert main(["dicomweb", "--pacs", pacs.dicomweb_url, *uids, "--url", service.url]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["stored"] and result["slice_count"] == SLICES
    assert len(pacs.find("Instance", SOPInstanceUID=result["seg_sop_instance_uid"])) == 1
    unknown = ["--study", "1.2.3", "--series", "1.2.3.4"]
    assert main(["dicomweb", "--pacs", pacs.dicomweb_url, *unknown, "--url", service.url]) == 1
    assert "404" in capsys.readouterr().err
