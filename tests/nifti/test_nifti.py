"""POST /v1/nifti: the same slices give the same masks as the DICOM series; the mask keeps the input's grid."""

import gzip
import io

import httpx
import nibabel as nib
import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.cli import main
from tests.dicom.conftest import PIXEL_SPACING_MM, SLICE_SPACING_MM, multipart
from tests.live_server import live_server
from tests.service.conftest import coco_decode

ROW_MM, COLUMN_MM = PIXEL_SPACING_MM


def ras_affine(shape: tuple[int, ...]) -> np.ndarray:
    """RAS+ voxel axes: i toward the patient's right... the opposite of the slicing axes (L, P), to test flips."""
    affine = np.diag([COLUMN_MM, ROW_MM, SLICE_SPACING_MM, 1.0])
    affine[:3, 3] = (-40.0, -50.0, 10.0)
    return affine


def to_ras(volume: np.ndarray) -> np.ndarray:
    """(slices, rows, columns) in radiological view -> (i, j, k) voxels of a RAS+ volume."""
    return np.ascontiguousarray(volume.transpose(2, 1, 0)[::-1, ::-1, :])


def nifti_bytes(data: np.ndarray, affine: np.ndarray, compressed: bool = True) -> bytes:
    raw = nib.Nifti1Image(data, affine).to_bytes()
    return gzip.compress(raw) if compressed else raw


def read_mask(data: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(data))


def post(client: TestClient, files: list[bytes], names: list[str] | None = None, **params: object):
    names = names or [f"volume{n}.nii.gz" for n in range(len(files))]
    return client.post("/v1/nifti", files=multipart(files, names, "application/gzip"), params=params)


@pytest.fixture(scope="module")
def dicom_result(dicom_client: TestClient, series_files: list[bytes]) -> dict:
    response = dicom_client.post("/v1/series", files=multipart(series_files))
    assert response.status_code == 200, response.text
    return response.json()


def dicom_masks(result: dict) -> np.ndarray:
    height, width = result["image_size"]
    return np.stack(
        [coco_decode(s["mask"]) if s["mask"] else np.zeros((height, width), bool) for s in result["slices"]]
    ).astype(bool)


def test_flair_volume_gives_the_dicom_series_masks_on_its_own_grid(
    dicom_client: TestClient, flair_volume: np.ndarray, dicom_result: dict
) -> None:
    data = to_ras(flair_volume)
    affine = ras_affine(data.shape)
    response = post(dicom_client, [nifti_bytes(data, affine)])
    assert response.status_code == 200, response.text
    mask = read_mask(response.content)
    assert mask.shape == data.shape and np.allclose(mask.affine, affine)
    assert mask.get_data_dtype() == np.uint8
    expected = dicom_masks(dicom_result)
    assert expected.sum() > 0
    assert np.array_equal(np.asanyarray(mask.dataobj).astype(bool), to_ras(expected))
    voxels = int(expected.sum())
    assert int(response.headers["X-Tumor-Voxels"]) == voxels
    by_hand = voxels * ROW_MM * COLUMN_MM * SLICE_SPACING_MM / 1000
    assert float(response.headers["X-Tumor-Volume-mL"]) == pytest.approx(by_hand, rel=1e-6)
    assert dicom_result["tumor_volume_ml"] == pytest.approx(by_hand, rel=1e-6)


def test_json_output_has_the_volume_and_per_slice_results(
    dicom_client: TestClient, flair_volume: np.ndarray, dicom_result: dict
) -> None:
    data = to_ras(flair_volume)
    response = post(dicom_client, [nifti_bytes(data, ras_affine(data.shape), compressed=False)], output="json")
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["slice_count"] == len(flair_volume)
    assert [s["area_pixels"] for s in result["slices"]] == [s["area_pixels"] for s in dicom_result["slices"]]
    assert result["tumor_volume_ml"] == pytest.approx(dicom_result["tumor_volume_ml"], rel=1e-6)
    assert result["voxel_spacing"]["slice_from"] == "NIfTI header"


def test_three_channel_files_equal_one_4d_file(dicom_client: TestClient, patient) -> None:
    channels = [to_ras(patient.images[..., c]) for c in range(3)]  # pre-contrast, FLAIR, post-contrast
    affine = ras_affine(channels[0].shape)
    separate = post(dicom_client, [nifti_bytes(c, affine) for c in channels])
    four_d = post(dicom_client, [nifti_bytes(np.stack(channels, axis=-1), affine)])
    assert separate.status_code == four_d.status_code == 200, separate.text + four_d.text
    a, b = read_mask(separate.content), read_mask(four_d.content)
    assert a.shape == channels[0].shape and np.array_equal(np.asanyarray(a.dataobj), np.asanyarray(b.dataobj))
    assert int(separate.headers["X-Tumor-Voxels"]) > 0


@pytest.mark.parametrize(
    ("files", "status", "message"),
    [
        ([b"not a nifti file at all" * 20], 400, "not a readable NIfTI"),
        ([gzip.compress(b"\0" * 1000)[:-8]], 400, "corrupt gzip"),
        ("two", 400, "send FLAIR alone"),
        ("other grid", 400, "not on the same voxel grid"),
        ("2-D", 400, "not a volume"),
    ],
)
def test_bad_nifti_is_a_clear_4xx(
    dicom_client: TestClient, flair_volume: np.ndarray, files: object, status: int, message: str
) -> None:
    data = to_ras(flair_volume)
    good = nifti_bytes(data, ras_affine(data.shape))
    if files == "two":
        files = [good, good]
    elif files == "other grid":
        files = [good, nifti_bytes(data, np.diag([1.0, 1.0, 1.0, 1.0])), good]
    elif files == "2-D":
        files = [nifti_bytes(data[:, :, 0], np.eye(4))]
    response = post(dicom_client, files)
    assert response.status_code == status and message in response.json()["detail"], response.text


def test_a_gzip_bomb_is_refused_before_it_unpacks(dicom_client: TestClient, dicom_settings) -> None:
    buffer = io.BytesIO()
    with gzip.GzipFile(fileobj=buffer, mode="wb") as packed:
        for _ in range(dicom_settings.max_batch_bytes // (1 << 20) + 1):
            packed.write(b"\0" * (1 << 20))
    response = post(dicom_client, [buffer.getvalue()])
    assert response.status_code == 413 and "unpacks to more than" in response.json()["detail"]


def test_cli_writes_the_mask_nifti_and_prints_the_volume(
    phantom_models_dir, flair_volume: np.ndarray, tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = to_ras(flair_volume)
    affine = ras_affine(data.shape)
    source = tmp_path / "flair.nii.gz"
    source.write_bytes(nifti_bytes(data, affine))
    out = tmp_path / "out" / "mask.nii.gz"
    with live_server(tmp_path, model_dir=phantom_models_dir, warmup_runs=0) as server:
        status = main(["nifti", str(source), "--out", str(out), "--url", server.url])
        printed = capsys.readouterr().out
        assert status == 0
        api = post_over_http(server.url, source)
        capsys.readouterr()
        (tmp_path / "notes.nii").write_text("not a volume")
        assert (
            main(["nifti", str(tmp_path / "notes.nii"), "--out", str(tmp_path / "x.nii.gz"), "--url", server.url]) == 1
        )
        assert "400" in (refused := capsys.readouterr()).err and "not a readable NIfTI" in refused.err
        with pytest.raises(SystemExit):  # argparse: a missing file is a bad argument (exit 2)
            main(["nifti", str(tmp_path / "missing.nii.gz"), "--out", str(out), "--url", server.url])
    mask = nib.load(out)
    assert np.allclose(mask.affine, affine) and mask.shape == data.shape
    assert out.read_bytes() == api.content
    volume = float(api.headers["X-Tumor-Volume-mL"])
    assert f"{api.headers['X-Tumor-Voxels']} tumor voxels, tumor volume {volume:.3f} mL" in printed


def post_over_http(url: str, path) -> httpx.Response:
    files = [("files", (path.name, path.read_bytes(), "application/gzip"))]
    response = httpx.post(f"{url}/v1/nifti", files=files, timeout=60)
    response.raise_for_status()
    return response
