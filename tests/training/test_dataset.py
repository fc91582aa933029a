"""The kaggle_3m loader (TIFF and WebP/PNG), its cache, its errors, the patient split."""

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.core.codecs import decode_image
from app.core.limits import ImageLimits
from app.core.preprocessing import preprocess_slice, to_three_channels
from tests.training.conftest import SYNTHETIC, SyntheticData
from training.dataset import (
    DatasetError,
    SliceCache,
    find_slices,
    load_cache,
    read_image,
    read_mask,
    read_split,
    split_patients,
    write_split,
)
from training.synthetic import write_synthetic_dataset

SIZE = 64


@pytest.fixture(scope="module")
def synthetic_cache(synthetic_tif: SyntheticData, tmp_path_factory: pytest.TempPathFactory) -> SliceCache:
    return load_cache(synthetic_tif.root, SIZE, tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("layout", ["synthetic_tif", "synthetic_webp"])
def test_loader_reads_both_layouts_exactly_in_numeric_slice_order(layout: str, request: pytest.FixtureRequest) -> None:
    data: SyntheticData = request.getfixturevalue(layout)
    records = find_slices(data.root)
    assert len(records) == SYNTHETIC["patients"] * SYNTHETIC["slices"]
    assert [r.patient for r in records[:: SYNTHETIC["slices"]]] == [p.folder for p in data.patients]
    for patient in data.patients:
        mine = [r for r in records if r.patient == patient.folder]
        # 1, 2, ..., 10, 11, 12, not the string order 1, 10, 11, 12, 2, ...
        assert [r.number for r in mine] == list(range(1, SYNTHETIC["slices"] + 1))
        assert all(r.image_path.name == f"{patient.folder}_{r.number}{r.image_path.suffix}" for r in mine)
        for record, image, mask in zip(mine, patient.images, patient.masks, strict=True):
            np.testing.assert_array_equal(read_image(record.image_path), image)
            np.testing.assert_array_equal(read_mask(record.mask_path), mask)


def test_grayscale_image_is_taken_as_flair_and_replicated(tmp_path: Path) -> None:
    flair = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(flair).save(tmp_path / "flair.png")
    np.testing.assert_array_equal(read_image(tmp_path / "flair.png"), np.repeat(flair[..., None], 3, axis=2))


@pytest.mark.parametrize(
    ("name", "pixels"),
    [
        ("rgb.tif", np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)),
        ("gray.png", np.arange(64, dtype=np.uint8).reshape(8, 8)),
        ("wide.png", (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)),  # 16-bit: windowed, not clipped
    ],
)
def test_training_decodes_a_file_as_the_service_does(tmp_path: Path, name: str, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(tmp_path / name)
    served = to_three_channels(decode_image((tmp_path / name).read_bytes(), ImageLimits(max_pixels=10**6)))
    np.testing.assert_array_equal(read_image(tmp_path / name), served)


def test_cache_holds_the_shared_preprocessing_and_source_masks(
    synthetic_cache: SliceCache, synthetic_tif: SyntheticData
) -> None:
    n = SYNTHETIC["patients"] * SYNTHETIC["slices"]
    assert synthetic_cache.images.shape == (n, 3, SIZE, SIZE) and synthetic_cache.images.dtype == np.float16
    assert synthetic_cache.target_masks.shape == (n, 1, SIZE, SIZE)
    assert synthetic_cache.target_masks.min() >= 0 and synthetic_cache.target_masks.max() <= 1
    source = SYNTHETIC["size"]
    assert synthetic_cache.masks.shape == (n, source, source)
    masks = np.concatenate([p.masks for p in synthetic_tif.patients])
    np.testing.assert_array_equal(synthetic_cache.masks, masks)
    np.testing.assert_array_equal(synthetic_cache.labels, masks.any(axis=(1, 2)))
    assert synthetic_cache.numbers[:3].tolist() == [1, 2, 3]
    # Exactly what the service computes for the same slice.
    first = synthetic_tif.patients[0]
    expected = np.stack([preprocess_slice(image, SIZE) for image in first.images]).astype(np.float16)
    np.testing.assert_array_equal(synthetic_cache.images[: SYNTHETIC["slices"]], expected)
    # Target masks are the area fraction at model size: a tumor slice keeps (about) its tumor area.
    tumor = int(np.flatnonzero(synthetic_cache.labels)[0])
    area = synthetic_cache.masks[tumor].mean()
    assert synthetic_cache.target_masks[tumor].astype(np.float32).mean() == pytest.approx(area, rel=0.05)


def test_both_layouts_give_the_same_cache(
    synthetic_cache: SliceCache, synthetic_webp: SyntheticData, tmp_path: Path
) -> None:
    webp = load_cache(synthetic_webp.root, SIZE, tmp_path)
    np.testing.assert_array_equal(webp.images, synthetic_cache.images)
    np.testing.assert_array_equal(webp.masks, synthetic_cache.masks)


def test_second_load_comes_from_the_cache_file(tmp_path: Path, tiny_dataset: Path) -> None:
    first = load_cache(tiny_dataset, 32, tmp_path / "cache")
    (cached,) = (tmp_path / "cache").glob("lgg-32-*.npz")
    again = load_cache(tiny_dataset, 32, tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == [cached]
    np.testing.assert_array_equal(again.images, first.images)
    np.testing.assert_array_equal(again.patients, first.patients)


def test_cache_is_rebuilt_when_the_data_changes(tmp_path: Path) -> None:
    """Regenerated data with the same file names and sizes (uncompressed TIFFs all have one size) must not
    be served from a stale cache."""
    root = tmp_path / "data"
    write_synthetic_dataset(root, patients=1, slices=2, size=32, seed=1)
    load_cache(root, 32, tmp_path / "cache")
    write_synthetic_dataset(root, patients=1, slices=2, size=32, seed=2)
    second = load_cache(root, 32, tmp_path / "cache")
    expected = np.stack([preprocess_slice(read_image(r.image_path), 32) for r in find_slices(root)])
    np.testing.assert_array_equal(second.images, expected.astype(np.float16))


# Broken data: a clear DatasetError that names the place.


def test_missing_mask_is_an_error(tiny_dataset: Path) -> None:
    folder = next(p for p in tiny_dataset.iterdir() if p.is_dir())
    (folder / f"{folder.name}_2_mask.tif").unlink()
    with pytest.raises(DatasetError, match=rf"{folder.name}: no mask for slice\(s\) \[2\]"):
        find_slices(tiny_dataset)


def test_mask_without_image_is_an_error(tiny_dataset: Path) -> None:
    folder = next(p for p in tiny_dataset.iterdir() if p.is_dir())
    (folder / f"{folder.name}_3.tif").unlink()
    with pytest.raises(DatasetError, match=r"mask without image for slice\(s\) \[3\]"):
        find_slices(tiny_dataset)


@pytest.mark.parametrize("broken", ["_1.tif", "_1_mask.tif"])
def test_unreadable_file_is_an_error(tiny_dataset: Path, tmp_path: Path, broken: str) -> None:
    folder = next(p for p in tiny_dataset.iterdir() if p.is_dir())
    (folder / f"{folder.name}{broken}").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=rf"cannot read (image|mask) .*{folder.name}{broken}"):
        load_cache(tiny_dataset, 32, tmp_path / "cache")


def test_image_and_mask_of_different_size_is_an_error(tiny_dataset: Path, tmp_path: Path) -> None:
    folder = next(p for p in tiny_dataset.iterdir() if p.is_dir())
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / f"{folder.name}_2_mask.tif")
    with pytest.raises(DatasetError, match=rf"{folder.name}_2.tif: image \(32, 32\) and mask \(16, 16\) differ"):
        load_cache(tiny_dataset, 32, tmp_path / "cache")


def test_patients_of_different_slice_size_is_an_error(tiny_dataset: Path, tmp_path: Path) -> None:
    write_synthetic_dataset(tmp_path / "other", patients=2, slices=2, size=48, seed=1)
    (tmp_path / "other" / "TCGA_XX_0002_20000101").rename(tiny_dataset / "TCGA_XX_0002_20000101")
    with pytest.raises(DatasetError, match="slices differ in size"):
        load_cache(tiny_dataset, 32, tmp_path / "cache")


def test_empty_or_missing_data_folder_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        find_slices(tmp_path / "nowhere")
    (tmp_path / "empty" / "TCGA_XX_0001_20000101").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no <folder>_<n>\.<ext> slices with masks found"):
        find_slices(tmp_path / "empty")


def test_stray_files_are_skipped_with_a_count_in_the_log(tiny_dataset: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = next(p for p in tiny_dataset.iterdir() if p.is_dir())
    (folder / "Thumbs.db").write_bytes(b"")
    (folder / f"{folder.name}_1.txt").write_text("notes")
    with caplog.at_level(logging.WARNING):
        records = find_slices(tiny_dataset)
    assert len(records) == 3
    assert f"{folder.name}: ignored 2 files" in caplog.text


# The patient split.


def test_split_never_shares_a_patient_and_is_deterministic(synthetic_cache: SliceCache) -> None:
    split = split_patients(synthetic_cache.patients, synthetic_cache.labels, seed=42)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert set.union(*parts) == set(synthetic_cache.patients.tolist())
    assert [len(p) for p in parts] == [6, 2, 2]
    assert split_patients(synthetic_cache.patients, synthetic_cache.labels, seed=42) == split
    others = [split_patients(synthetic_cache.patients, synthetic_cache.labels, seed=s) for s in range(5)]
    assert any(o != split for o in others)  # the seed matters


@pytest.mark.parametrize("seed", range(10))
def test_every_split_gets_tumor_and_tumor_free_slices(synthetic_cache: SliceCache, seed: int) -> None:
    split = split_patients(synthetic_cache.patients, synthetic_cache.labels, seed=seed)
    for part, names in split.items():
        labels = synthetic_cache.labels[synthetic_cache.indices_of(names)]
        assert labels.any() and not labels.all(), part


def test_split_spreads_tumor_burden_across_parts() -> None:
    # 20 patients with burden 0, 0.05, ..., 0.95: the test and val patients must not all be light or all heavy.
    patients = np.repeat([f"P{i:02d}" for i in range(20)], 20)
    labels = np.concatenate([np.arange(20) < i for i in range(20)])
    split = split_patients(patients, labels, seed=1)
    for part in ("val", "test"):
        burdens = sorted(int(name[1:]) for name in split[part])
        assert len(burdens) == 3 and burdens[0] < 7 and burdens[-1] >= 13, (part, burdens)


def test_split_of_too_few_patients_is_an_error() -> None:
    with pytest.raises(DatasetError, match="too few"):
        split_patients(np.array(["a", "b"]), np.array([True, False]))


def test_split_file_round_trip(tmp_path: Path, synthetic_cache: SliceCache) -> None:
    split = split_patients(synthetic_cache.patients, synthetic_cache.labels)
    write_split(split, tmp_path / "nested" / "split.json")
    assert read_split(tmp_path / "nested" / "split.json") == split
