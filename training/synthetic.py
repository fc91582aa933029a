"""Synthetic brain-MRI phantoms with exact tumor masks, in the kaggle_3m layout.

Each patient is a small volume: a skull-like ring around an elliptical brain with
smooth texture and noise, in three channels that differ the way pre-contrast,
FLAIR and post-contrast do, and (for most patients) an irregular 3D tumor blob
that is bright in FLAIR, so the end slices and some patients are tumor-free. The
mask is exactly the set of pixels the tumor was painted on. Deterministic by seed;
fast enough to drive the tests without the real data.

    python -m training synthetic --out /tmp/synthetic --patients 10 --slices 20
"""

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.preprocessing import resize_plane

FORMATS = {"tif": (".tif", ".tif"), "webp": (".webp", ".png")}  # image, mask extension

# Mean intensity of each tissue in (pre-contrast, FLAIR, post-contrast), 0..255.
SKULL = np.array([190.0, 70.0, 200.0])
BRAIN = np.array([95.0, 105.0, 100.0])
TUMOR = np.array([75.0, 200.0, 120.0])


@dataclass(frozen=True)
class SyntheticPatient:
    folder: str  # TCGA_XX_<nnnn>_20000101, as kaggle_3m names them
    images: np.ndarray  # (slices, size, size, 3) uint8, R = pre-contrast, G = FLAIR, B = post-contrast
    masks: np.ndarray  # (slices, size, size) bool, exactly where the tumor is

    @property
    def patient(self) -> str:
        return "_".join(self.folder.split("_")[:3])

    @property
    def tumor_slices(self) -> int:
        return int(self.masks.any(axis=(1, 2)).sum())


def smooth_field(rng: np.random.Generator, size: int, cells: int = 6) -> np.ndarray:
    """Low-frequency texture in about -1..1: coarse noise upsampled bilinearly."""
    return resize_plane(rng.standard_normal((cells, cells)).astype(np.float32), size, size)


def make_patient(index: int, slices: int = 20, size: int = 256, seed: int = 0, tumor: bool = True) -> SyntheticPatient:
    """One patient's volume; the same (index, seed) always gives the same pixels, whatever the other patients."""
    rng = np.random.default_rng([seed, index])
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    head_radii = rng.uniform(0.75, 0.9, 2)  # (y, x) half-axes of the head at its widest slice
    angle = np.arctan2(y, x)
    # The tumor: an ellipsoid with a wavy boundary, centered inside the brain, spanning some middle slices.
    center = np.array([rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(-0.35, 0.35)])  # y, x, z
    radii = np.array([*rng.uniform(0.12, 0.3, 2), rng.uniform(0.3, 0.6)])  # z spans -1.1..1.1
    waves = rng.uniform(0, 0.25, 3), rng.uniform(0, 2 * np.pi, 3)
    wavy = 1 + sum(a * np.cos((k + 2) * angle + p) for k, (a, p) in enumerate(zip(*waves, strict=True)))
    images = np.empty((slices, size, size, 3), np.uint8)
    masks = np.zeros((slices, size, size), bool)
    for n in range(slices):
        z = (2 * (n + 0.5) / slices - 1) * 1.1  # slice position; |z| > 1 leaves the ends almost empty
        shrink = np.sqrt(max(1 - 0.85 * z**2, 0.02))
        ry, rx = head_radii * shrink
        head = (y / ry) ** 2 + (x / rx) ** 2
        skull = (head <= 1) & (head > 0.8)
        brain = head <= 0.72
        if tumor:
            across = 1 - ((z - center[2]) / radii[2]) ** 2  # squared fraction of the blob's radius left at z
            blob = ((y - center[0]) / radii[0]) ** 2 + ((x - center[1]) / radii[1]) ** 2
            masks[n] = brain & (blob <= across * wavy**2) if across > 0 else False
        planes = np.zeros((3, size, size), np.float32)
        for c in range(3):
            texture = smooth_field(rng, size)
            planes[c] += skull * SKULL[c] * (1 + 0.1 * texture)
            planes[c] += brain * BRAIN[c] * (1 + 0.15 * texture)
            planes[c] = np.where(masks[n], TUMOR[c] * (1 + 0.1 * smooth_field(rng, size)), planes[c])
            planes[c] += rng.normal(0, 4, (size, size))
        images[n] = np.clip(planes, 0, 255).round().astype(np.uint8).transpose(1, 2, 0)
    return SyntheticPatient(f"TCGA_XX_{index + 1:04d}_20000101", images, masks)


def write_patient(patient: SyntheticPatient, root: Path, fmt: str = "tif") -> Path:
    """`<root>/<folder>/<folder>_<n>.<ext>` and `<folder>_<n>_mask.<ext>`, n = 1..N, not zero-padded."""
    image_ext, mask_ext = FORMATS[fmt]
    folder = Path(root) / patient.folder
    folder.mkdir(parents=True, exist_ok=True)
    for n, (image, mask) in enumerate(zip(patient.images, patient.masks, strict=True), start=1):
        stem = folder / f"{patient.folder}_{n}"
        if fmt == "tif":  # as the download: uncompressed RGB image, 8-bit 0/255 mask
            Image.fromarray(image).save(f"{stem}{image_ext}")
            Image.fromarray(mask.astype(np.uint8) * 255).save(f"{stem}_mask{mask_ext}")
        else:  # as ../shared/data/lgg: lossless WebP image, 1-bit PNG mask
            Image.fromarray(image).save(f"{stem}{image_ext}", lossless=True)
            Image.fromarray(mask).save(f"{stem}_mask{mask_ext}")
    return folder


def write_synthetic_dataset(
    root: Path,
    patients: int = 10,
    slices: int = 20,
    size: int = 256,
    seed: int = 0,
    fmt: str = "tif",
    tumor_free_every: int = 5,
) -> list[SyntheticPatient]:
    """Write a kaggle_3m-layout dataset plus data.csv; every `tumor_free_every`-th patient has no tumor (0: none)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    root = Path(root)
    written = []
    for index in range(patients):
        tumor = not (tumor_free_every and (index + 1) % tumor_free_every == 0)
        patient = make_patient(index, slices, size, seed, tumor)
        write_patient(patient, root, fmt)
        written.append(patient)
    with open(root / "data.csv", "w", newline="") as file:
        table = csv.writer(file)
        table.writerow(["Patient", "tumor_slices"])
        table.writerows([p.patient, p.tumor_slices] for p in written)
    return written


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="folder to write the patient folders and data.csv into")
    parser.add_argument("--patients", type=int, default=10)
    parser.add_argument("--slices", type=int, default=20, help="slices per patient")
    parser.add_argument("--size", type=int, default=256, help="slice height and width (kaggle_3m: 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=sorted(FORMATS), default="tif", help="tif (the download) or webp/png")
    parser.add_argument("--tumor-free-every", type=int, default=5, help="every n-th patient has no tumor (0: none)")


def run(args: argparse.Namespace) -> None:
    written = write_synthetic_dataset(
        Path(args.out), args.patients, args.slices, args.size, args.seed, args.format, args.tumor_free_every
    )
    tumor_slices = sum(p.tumor_slices for p in written)
    print(
        f"wrote {len(written)} patients, {len(written) * args.slices} slices ({tumor_slices} with tumor) to {args.out}"
    )
