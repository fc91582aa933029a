"""The loader on the real LGG data (skipped when ../shared/data is absent; CI has it)."""

import csv
from pathlib import Path

import numpy as np
import pytest

from training.dataset import find_slices, load_cache, patient_id, read_image, read_mask, split_patients

pytestmark = pytest.mark.real_data

# Facts from ../shared/README.md.
PATIENTS, SLICES, TUMOR_SLICES = 85, 2980, 1062


@pytest.fixture(scope="module")
def real_slices(real_data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(patient per slice, tumor label per slice) of the whole real dataset: masks only, about a second."""
    records = find_slices(real_data_dir)
    return np.array([r.patient for r in records]), np.array([read_mask(r.mask_path).any() for r in records])


def test_tif_sample_and_webp_copy_decode_to_identical_pixels(real_tif_sample_dir: Path, real_data_dir: Path) -> None:
    tif = find_slices(real_tif_sample_dir)
    assert {r.image_path.suffix for r in tif} == {".tif"}
    patients = {r.patient for r in tif}
    assert len(patients) == 2
    webp = [r for r in find_slices(real_data_dir) if r.patient in patients]
    assert [(r.patient, r.number) for r in webp] == [(r.patient, r.number) for r in tif]
    for a, b in zip(tif, webp, strict=True):
        image = read_image(a.image_path)
        assert image.shape == (256, 256, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, read_image(b.image_path), err_msg=str(a.image_path))
        np.testing.assert_array_equal(read_mask(a.mask_path), read_mask(b.mask_path), err_msg=str(a.mask_path))


def test_real_data_has_the_documented_patients_slices_and_tumor_slices(
    real_data_dir: Path, real_slices: tuple[np.ndarray, np.ndarray]
) -> None:
    patients, labels = real_slices
    assert len(set(patients.tolist())) == PATIENTS
    assert len(patients) == SLICES
    assert int(labels.sum()) == TUMOR_SLICES
    with open(real_data_dir / "data.csv", newline="") as file:
        listed = {row["Patient"] for row in csv.DictReader(file)}
    assert listed == {patient_id(p) for p in patients.tolist()}


def test_real_split_by_patient(real_slices: tuple[np.ndarray, np.ndarray]) -> None:
    patients, labels = real_slices
    split = split_patients(patients, labels, seed=42)
    assert split == split_patients(patients, labels, seed=42)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(set.union(*parts)) == PATIENTS
    assert all(len(p) >= 12 for p in parts[1:])  # about 15% each
    for names in parts:
        part_labels = labels[np.isin(patients, list(names))]
        assert 0.2 < part_labels.mean() < 0.5  # each part near the 36% tumor slices of the whole


def test_cache_of_a_few_real_patients(real_data_dir: Path, tmp_path: Path) -> None:
    # Three patients through the same path as training, without decoding all 2,980 slices.
    data = tmp_path / "data"
    data.mkdir()
    chosen = sorted(p for p in real_data_dir.iterdir() if p.is_dir())[:3]
    for folder in chosen:
        (data / folder.name).symlink_to(folder)
    cache = load_cache(data, 64, tmp_path / "cache")
    n = len(cache.patients)
    assert n == sum(1 for folder in chosen for p in folder.iterdir() if p.name.endswith("_mask.png"))
    assert cache.images.shape == (n, 3, 64, 64) and cache.masks.shape == (n, 256, 256)
    assert np.isfinite(cache.images.astype(np.float32)).all()
    assert cache.labels.any() and not cache.labels.all()
    means = cache.images.astype(np.float32).mean(axis=(2, 3))
    assert np.abs(means).max() < 0.01  # per-slice, per-channel z-score
