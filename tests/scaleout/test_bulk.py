"""`lgg-tumor bulk` on an embedded Ray with 2 CPUs: a small archive of kaggle_3m-style image slices, a DICOM
series, a NIfTI volume and an unreadable series; masks and CSVs compared with the in-process pipeline."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from app.core.analysis import stack_masks
from app.core.config import Settings
from app.core.onnx_sessions import load_models, read_model_card
from app.core.pipeline import Pipeline
from app.core.series import Series, SeriesLimits, Upload, read_series
from tests.dicom.builders import mr_series, to_bytes, write_phantom_models
from training.synthetic import make_patient

ray = pytest.importorskip("ray", reason='Ray is the optional [bulk] extra: pip install -e ".[bulk]"')
nibabel = pytest.importorskip("nibabel")
pytest.importorskip("onnx", reason="the phantom ONNX models need the onnx package (.[train])")

SLICES, SIZE = 4, 96
SLICE_SPACING_MM, PIXEL_SPACING_MM = 3.0, (0.5, 0.75)
KAGGLE = "kaggle_3m/TCGA_XX_0001_20000101"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantom networks that segment the synthetic patients' bright FLAIR blob: the masks are not empty."""
    return write_phantom_models(tmp_path_factory.mktemp("phantom-models"), flair_z=2.5)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("archive")
    images = make_patient(0, slices=SLICES, size=SIZE).images  # (slices, H, W, 3), tumor in the middle slices
    (root / KAGGLE).mkdir(parents=True)
    for number, image in enumerate(images, start=1):
        Image.fromarray(image).save(root / KAGGLE / f"TCGA_XX_0001_20000101_{number}.tif")
        empty = Image.fromarray(np.zeros(image.shape[:2], np.uint8))
        empty.save(root / KAGGLE / f"TCGA_XX_0001_20000101_{number}_mask.tif")  # kaggle_3m's masks: skipped
    flair = make_patient(1, slices=SLICES, size=SIZE).images[..., 1]
    (root / "dicom" / "series1").mkdir(parents=True)
    for number, dataset in enumerate(mr_series(flair, slice_spacing=SLICE_SPACING_MM, pixel_spacing=PIXEL_SPACING_MM)):
        (root / "dicom" / "series1" / f"IM{number:04d}.dcm").write_bytes(to_bytes(dataset))
    (root / "nifti").mkdir()
    volume = np.ascontiguousarray(flair.transpose(2, 1, 0))  # (x, y, z) as NIfTI stores it
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([1.0, 1.0, 2.0, 1.0])), root / "nifti" / "flair.nii.gz")
    (root / "broken").mkdir()
    (root / "broken" / "slice_1.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def out(archive: Path, models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk-out")
    argv = ["bulk", str(archive), "--out", str(out), "--model-dir", str(models), "--num-cpus", "2", "--actors", "2"]
    assert main([*argv, "--quiet"]) == 0
    assert not ray.is_initialized()  # the embedded Ray is shut down again
    return out


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def in_process(models: Path, uploads: list[Upload]) -> tuple[Series, np.ndarray]:
    """The same series through the shared pipeline without Ray: what the actors must have written."""
    settings = Settings(model_dir=models, providers="CPUExecutionProvider", warmup_runs=0)
    pipeline = Pipeline(load_models(read_model_card(models), settings), settings.max_batch_size)
    series = read_series(uploads, SeriesLimits.from_settings(settings))
    return series, stack_masks(series, pipeline.predict_batch([s.pixels for s in series.slices]))


def uploads_of(folder: Path, pattern: str) -> list[Upload]:
    return [Upload(p.name, p.read_bytes()) for p in sorted(folder.glob(pattern)) if "_mask" not in p.name]


def test_one_row_per_series_and_the_unreadable_one_says_why(out: Path) -> None:
    rows = {row["series"]: row for row in read_csv(out / "series.csv")}
    assert set(rows) == {KAGGLE, "dicom/series1", "nifti/flair.nii.gz", "broken"}
    assert {rows[name]["kind"] for name in rows} == {"images", "dicom", "nifti"}
    assert rows["broken"]["error"] and not rows["broken"]["slices"]
    for name in (KAGGLE, "dicom/series1", "nifti/flair.nii.gz"):
        assert rows[name]["error"] == "" and int(rows[name]["slices"]) == SLICES
    slices = read_csv(out / "slices.csv")
    assert len(slices) == 3 * SLICES
    assert {row["series"] for row in slices} == {KAGGLE, "dicom/series1", "nifti/flair.nii.gz"}


def test_image_masks_match_the_in_process_pipeline(out: Path, archive: Path, models: Path) -> None:
    _, expected = in_process(models, uploads_of(archive / KAGGLE, "*.tif"))
    assert expected.any(), "the phantom models should find the synthetic tumor"
    written = [
        np.array(Image.open(out / KAGGLE / f"TCGA_XX_0001_20000101_{number}_mask.png"))
        for number in range(1, SLICES + 1)
    ]
    assert all(mask.dtype == bool and mask.shape == (SIZE, SIZE) for mask in written)
    np.testing.assert_array_equal(np.stack(written), expected)
    [row] = [row for row in read_csv(out / "series.csv") if row["series"] == KAGGLE]
    assert int(row["tumor_voxels"]) == int(expected.sum()) and row["tumor_volume_ml"] == ""  # no spacing in a TIFF
    assert int(row["tumor_slices"]) == int(expected.any(axis=(1, 2)).sum())
    areas = [int(r["area_pixels"]) for r in read_csv(out / "slices.csv") if r["series"] == KAGGLE]
    assert areas == [int(m.sum()) for m in expected]


def test_dicom_series_volume_from_its_spacing(out: Path, archive: Path, models: Path) -> None:
    series, expected = in_process(models, uploads_of(archive / "dicom" / "series1", "*.dcm"))
    [row] = [row for row in read_csv(out / "series.csv") if row["series"] == "dicom/series1"]
    assert row["ordered_by"] == "position"
    voxel_ml = PIXEL_SPACING_MM[0] * PIXEL_SPACING_MM[1] * SLICE_SPACING_MM / 1000
    assert int(row["tumor_voxels"]) == int(expected.sum()) > 0
    assert float(row["tumor_volume_ml"]) == pytest.approx(expected.sum() * voxel_ml, abs=1e-6)
    for slice_, mask in zip(series.slices, expected, strict=True):
        name = f"IM{slice_.source:04d}_mask.png"
        np.testing.assert_array_equal(np.array(Image.open(out / "dicom" / "series1" / name)), mask)


def test_nifti_mask_volume_on_the_input_grid(out: Path, archive: Path) -> None:
    [row] = [row for row in read_csv(out / "series.csv") if row["series"] == "nifti/flair.nii.gz"]
    mask = nibabel.load(out / row["mask"])
    source = nibabel.load(archive / "nifti" / "flair.nii.gz")
    assert mask.shape == source.shape and np.allclose(mask.affine, source.affine)
    assert int(np.asarray(mask.dataobj).sum()) == int(row["tumor_voxels"])
    assert float(row["tumor_volume_ml"]) == pytest.approx(int(row["tumor_voxels"]) * 2.0 / 1000)


def test_an_empty_folder_is_an_error_without_starting_ray(tmp_path: Path) -> None:
    assert main(["bulk", str(tmp_path), "--out", str(tmp_path / "out")]) == 1
    assert not ray.is_initialized()


def test_png_masks_are_one_bit(out: Path) -> None:
    image = Image.open(io.BytesIO((out / KAGGLE / "TCGA_XX_0001_20000101_1_mask.png").read_bytes()))
    assert image.mode == "1"
