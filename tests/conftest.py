"""Shared fixtures. Tests on the real LGG data run only when ../shared/data is beside the checkout."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
REAL_DATA = REPO_ROOT.parent / "shared" / "data" / "lgg"
REAL_TIF_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "lgg-tif-sample"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not REAL_DATA.is_dir():
        pytest.skip("real LGG data not present at ../shared/data/lgg")
    return REAL_DATA


@pytest.fixture(scope="session")
def real_tif_sample_dir() -> Path:
    if not REAL_TIF_SAMPLE.is_dir():
        pytest.skip("real TIFF sample not present at ../shared/data/lgg-tif-sample")
    return REAL_TIF_SAMPLE


@pytest.fixture(scope="session")
def bundled_models_dir() -> Path:
    return REPO_ROOT / "models"
