"""LGG kaggle_3m data: discovery, decoding into a cached array, patient split.

Layout: one folder per patient, `<folder>_<n>.<ext>` and `<folder>_<n>_mask.<ext>`,
with ext tif (the download) or webp/png (the lossless copy). Slices are numbered
1..N and sorted numerically.
"""

import hashlib
import json
import logging
import math
import random
import re
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from app.core.codecs import to_slice_array
from app.core.preprocessing import preprocess_slice, resize_plane, to_three_channels

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".webp", ".png", ".jpg", ".jpeg")
CACHE_VERSION = 1  # bump when decoding or preprocessing changes


class DatasetError(ValueError):
    """The data folder is not a readable kaggle_3m layout; the message says where."""


@dataclass(frozen=True)
class SliceRecord:
    patient: str
    number: int
    image_path: Path
    mask_path: Path


def find_slices(root: Path) -> list[SliceRecord]:
    """Every (image, mask) pair under root, patients sorted by name, slices by number."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist")
    records: list[SliceRecord] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        pattern = re.compile(rf"^{re.escape(folder.name)}_(\d+)(_mask)?(\.\w+)$", re.IGNORECASE)
        images: dict[int, Path] = {}
        masks: dict[int, Path] = {}
        ignored = 0
        for path in folder.iterdir():
            match = pattern.match(path.name)
            if not match or match.group(3).lower() not in IMAGE_EXTENSIONS:
                ignored += 1
                continue
            (masks if match.group(2) else images)[int(match.group(1))] = path
        if ignored:
            log.warning("%s: ignored %d files that are not <folder>_<n>[_mask].<image ext>", folder.name, ignored)
        if missing := sorted(set(images) - set(masks)):
            raise DatasetError(f"{folder.name}: no mask for slice(s) {missing[:10]}")
        if orphans := sorted(set(masks) - set(images)):
            raise DatasetError(f"{folder.name}: mask without image for slice(s) {orphans[:10]}")
        records += [SliceRecord(folder.name, n, images[n], masks[n]) for n in sorted(images)]
    if not records:
        raise DatasetError(f"no <folder>_<n>.<ext> slices with masks found under {root}")
    return records


def read_image(path: Path) -> np.ndarray:
    """An 8-bit slice as HxWx3 (a grayscale file is taken as FLAIR and replicated)."""
    try:
        with Image.open(path) as image:
            return to_three_channels(to_slice_array(image))
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read image {path}: {error}") from error


def read_mask(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("L")) > 127
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read mask {path}: {error}") from error


def patient_id(folder: str) -> str:
    """TCGA_CS_4941_19960909 -> TCGA_CS_4941, the key of data.csv."""
    return "_".join(folder.split("_")[:3])


@dataclass
class SliceCache:
    """The whole dataset decoded once: network inputs at model size, masks at source size."""

    images: np.ndarray  # (N, 3, size, size) float16, preprocess_slice output
    target_masks: np.ndarray  # (N, 1, size, size) float16, mask area fraction at model size
    masks: np.ndarray  # (N, H, W) bool, the ground truth at source resolution
    patients: np.ndarray  # (N,) str, folder names
    numbers: np.ndarray  # (N,) int, slice numbers

    @property
    def labels(self) -> np.ndarray:
        return self.masks.reshape(len(self.masks), -1).any(axis=1)

    def indices_of(self, patients: list[str]) -> np.ndarray:
        return np.flatnonzero(np.isin(self.patients, patients))


def decode_record(args: tuple[SliceRecord, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    record, size = args
    image, mask = read_image(record.image_path), read_mask(record.mask_path)
    if image.shape[:2] != mask.shape:
        raise DatasetError(f"{record.image_path.name}: image {image.shape[:2]} and mask {mask.shape} differ in size")
    target = resize_plane(mask.astype(np.float32), size, size)
    return preprocess_slice(image, size).astype(np.float16), target[None].astype(np.float16), mask


def load_cache(root: Path, size: int, cache_dir: Path, workers: int = 2) -> SliceCache:
    """Decode and preprocess every slice once; later runs load the .npz (seconds)."""
    records = find_slices(root)
    listing = "\n".join(
        f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for r in records for p in (r.image_path, r.mask_path)
    )
    key = hashlib.sha256(f"{CACHE_VERSION}:{size}:{listing}".encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"lgg-{size}-{key}.npz"
    if path.exists():
        with np.load(path) as data:
            return SliceCache(**{name: data[name] for name in data.files})
    log.info("decoding %d slices of %d patients from %s", len(records), len({r.patient for r in records}), root)
    with Pool(workers) as pool:
        decoded = pool.map(decode_record, [(r, size) for r in records], chunksize=32)
    shapes = {d[2].shape for d in decoded}
    if len(shapes) != 1:
        raise DatasetError(f"slices differ in size: {sorted(shapes)}; kaggle_3m slices are all 256x256")
    cache = SliceCache(
        images=np.stack([d[0] for d in decoded]),
        target_masks=np.stack([d[1] for d in decoded]),
        masks=np.stack([d[2] for d in decoded]),
        patients=np.array([r.patient for r in records]),
        numbers=np.array([r.number for r in records]),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **cache.__dict__)
    return cache


def split_patients(
    patients: np.ndarray, labels: np.ndarray, seed: int = 42, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> dict[str, list[str]]:
    """Deterministic patient-level split, stratified by tumor burden.

    Patients are ranked by their share of tumor slices (tumor-free patients
    first) and dealt out in blocks, so every split spans light and heavy tumor
    burden and gets tumor-free patients where there are any.
    """
    names = sorted(set(patients.tolist()))
    burden = {p: float(labels[patients == p].mean()) for p in names}
    rng = random.Random(seed)
    ordered = sorted(names, key=lambda p: (burden[p], rng.random()))
    n_val = max(1, round(len(names) * val_fraction))
    n_test = max(1, round(len(names) * test_fraction))
    if n_val + n_test >= len(names):
        raise DatasetError(f"{len(names)} patients are too few for a train/val/test split")
    split: dict[str, list[str]] = {"train": [], "val": [], "test": []}
    block = len(names) / max(n_val, n_test)
    for start in range(0, len(names), math.ceil(block)):
        group = ordered[start : start + math.ceil(block)]
        rng.shuffle(group)
        for name in group:
            if len(split["test"]) < n_test and not any(g in split["test"] for g in group):
                split["test"].append(name)
            elif len(split["val"]) < n_val and not any(g in split["val"] for g in group):
                split["val"].append(name)
            else:
                split["train"].append(name)
    return {k: sorted(v) for k, v in split.items()}


def patient_folds(patients: np.ndarray, labels: np.ndarray, folds: int = 5, seed: int = 42) -> list[list[str]]:
    """Patient-grouped K folds, stratified by tumor burden: every patient in exactly one fold.

    Patients are ranked by their share of tumor slices and dealt out in blocks of K, each block shuffled,
    so every fold spans light and heavy tumor burden (and tumor-free patients where there are any).
    """
    names = sorted(set(patients.tolist()))
    if len(names) < folds:
        raise DatasetError(f"{len(names)} patients are too few for {folds} folds")
    burden = {p: float(labels[patients == p].mean()) for p in names}
    rng = random.Random(seed)
    ordered = sorted(names, key=lambda p: (burden[p], rng.random()))
    assignment: list[list[str]] = [[] for _ in range(folds)]
    for start in range(0, len(ordered), folds):
        block = ordered[start : start + folds]
        targets = sorted(range(folds), key=lambda k: (len(assignment[k]), rng.random()))
        for name, k in zip(block, targets, strict=False):
            assignment[k].append(name)
    return [sorted(fold) for fold in assignment]


def write_split(split: dict[str, list[str]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split, indent=2) + "\n")


def read_split(path: Path) -> dict[str, list[str]]:
    return json.loads(Path(path).read_text())


class SliceDataset(Dataset):
    """(image, target mask, label) tensors from the cache; augmentation happens per batch."""

    def __init__(self, cache: SliceCache, indices: np.ndarray) -> None:
        self.cache, self.indices = cache, indices
        self.labels = cache.labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        j = self.indices[i]
        return (
            torch.from_numpy(self.cache.images[j].astype(np.float32)),
            torch.from_numpy(self.cache.target_masks[j].astype(np.float32)),
            torch.tensor(float(self.labels[j])),
        )
