"""The synthetic phantom generator that drives the fast training tests."""

import csv

import numpy as np
from PIL import Image

from tests.training.conftest import SYNTHETIC, SyntheticData
from training.__main__ import main
from training.metrics import dice_score
from training.synthetic import make_patient, write_synthetic_dataset


def test_same_seed_same_pixels_and_other_seed_other_pixels() -> None:
    first, again, other = make_patient(0, 6, 48, seed=3), make_patient(0, 6, 48, seed=3), make_patient(0, 6, 48, seed=4)
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.masks, again.masks)
    assert not np.array_equal(first.images, other.images)
    assert first.images.shape == (6, 48, 48, 3) and first.images.dtype == np.uint8
    assert first.masks.shape == (6, 48, 48) and first.masks.dtype == bool


def test_tumor_is_bright_in_flair_exactly_where_the_mask_says(synthetic_tif: SyntheticData) -> None:
    for patient in synthetic_tif.patients:
        if not patient.masks.any():
            continue
        flair, pre = patient.images[..., 1].astype(float), patient.images[..., 0].astype(float)
        # Thresholding FLAIR recovers the mask almost exactly (texture and noise blur a few edge pixels).
        assert dice_score(flair > 150, patient.masks) > 0.98
        # The channels differ: the tumor is darker than brain in pre-contrast, bright in FLAIR.
        assert pre[patient.masks].mean() < flair[patient.masks].mean() - 80


def test_volumes_have_tumor_and_tumor_free_slices_and_some_patients_none(synthetic_tif: SyntheticData) -> None:
    tumor_slices = [p.tumor_slices for p in synthetic_tif.patients]
    # Every 5th patient is tumor-free; the others have a tumor that spans some but not all slices.
    assert [n == 0 for n in tumor_slices] == [(i + 1) % 5 == 0 for i in range(SYNTHETIC["patients"])]
    assert all(0 < n < SYNTHETIC["slices"] for n in tumor_slices if n)
    fraction = sum(tumor_slices) / (SYNTHETIC["patients"] * SYNTHETIC["slices"])
    assert 0.2 < fraction < 0.5  # the real data: 36%
    # The tumor is one connected run of slices, as a 3D blob is.
    for patient in synthetic_tif.patients:
        present = np.flatnonzero(patient.masks.any(axis=(1, 2)))
        assert len(present) == 0 or np.array_equal(present, np.arange(present[0], present[-1] + 1))


def test_tif_layout_names_modes_and_data_csv(synthetic_tif: SyntheticData) -> None:
    root = synthetic_tif.root
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == [f"TCGA_XX_{i:04d}_20000101" for i in range(1, 11)]
    names = sorted(p.name for p in (root / folders[0]).iterdir())
    slices = SYNTHETIC["slices"]
    expected = [f"{folders[0]}_{n}.tif" for n in range(1, slices + 1)]
    expected += [f"{folders[0]}_{n}_mask.tif" for n in range(1, slices + 1)]
    assert names == sorted(expected)
    # As the kaggle_3m download: RGB image, 8-bit mask with 0/255.
    with Image.open(root / folders[0] / f"{folders[0]}_10.tif") as image:
        assert (image.format, image.mode, image.size) == ("TIFF", "RGB", (96, 96))
        np.testing.assert_array_equal(np.asarray(image), synthetic_tif.patients[0].images[9])
    with Image.open(root / folders[0] / f"{folders[0]}_10_mask.tif") as mask:
        assert mask.mode == "L"
        values = np.asarray(mask)
        assert set(np.unique(values)) <= {0, 255}
        np.testing.assert_array_equal(values == 255, synthetic_tif.patients[0].masks[9])
    with open(root / "data.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["Patient"] for r in rows] == [f"TCGA_XX_{i:04d}" for i in range(1, 11)]


def test_webp_layout_is_lossless_webp_and_one_bit_png(synthetic_webp: SyntheticData) -> None:
    patient = synthetic_webp.patients[3]
    stem = synthetic_webp.root / patient.folder / f"{patient.folder}_7"
    with Image.open(f"{stem}.webp") as image:
        assert image.format == "WEBP"
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), patient.images[6])
    with Image.open(f"{stem}_mask.png") as mask:
        assert (mask.format, mask.mode) == ("PNG", "1")
        np.testing.assert_array_equal(np.asarray(mask), patient.masks[6])


def test_synthetic_command_writes_the_dataset(tmp_path, capsys) -> None:
    main(["synthetic", "--out", str(tmp_path), "--patients", "2", "--slices", "3", "--size", "32", "--seed", "5"])
    assert "wrote 2 patients, 6 slices" in capsys.readouterr().out
    expected = write_synthetic_dataset(tmp_path / "again", patients=2, slices=3, size=32, seed=5)
    with Image.open(tmp_path / "TCGA_XX_0002_20000101" / "TCGA_XX_0002_20000101_3.tif") as image:
        np.testing.assert_array_equal(np.asarray(image), expected[1].images[2])
