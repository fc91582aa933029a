"""The PACS tests' and benchmark's series: 30 real LGG slices (RGB: pre-contrast, FLAIR, post-contrast) with a
known spacing when ../shared/data/lgg is there, else 30 synthetic phantom slices; each call new UIDs."""

import numpy as np
from PIL import Image

from tests.conftest import REAL_DATA, REPO_ROOT
from tests.dicom.builders import AXIAL, mr_series, to_bytes
from training.synthetic import make_patient

PATIENT, SLICES, FIRST_SLICE = "TCGA_HT_A61B_19991127", 30, 20
PIXEL_SPACING_MM, SLICE_SPACING_MM = (0.9375, 0.9375), 2.5
BUNDLED_MODELS = REPO_ROOT / "models"


def real_data() -> bool:
    return (REAL_DATA / PATIENT).is_dir() and (BUNDLED_MODELS / "model_card.json").is_file()


def load_volume() -> np.ndarray:
    if real_data():
        folder = REAL_DATA / PATIENT
        return np.stack([np.asarray(Image.open(folder / f"{PATIENT}_{n}.webp").convert("RGB"))
                         for n in range(FIRST_SLICE, FIRST_SLICE + SLICES)])  # fmt: skip
    return make_patient(0, slices=SLICES, size=128).images


def series_files(volume: np.ndarray) -> list[bytes]:
    """One single-frame MR instance per slice, new Study/Series/SOP UIDs, axial, the known spacing."""
    datasets = mr_series(volume, pixel_spacing=PIXEL_SPACING_MM, slice_spacing=SLICE_SPACING_MM, orientation=AXIAL)
    return [to_bytes(ds) for ds in datasets]
