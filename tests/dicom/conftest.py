"""Fixtures for the DICOM, series, SEG and viewer tests: phantom models, an in-process app, synthetic series."""

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset

from app.core.config import Settings
from app.main import create_app
from tests.dicom.builders import mr_series, to_bytes, write_phantom_models
from tests.service.conftest import start
from training.synthetic import SyntheticPatient, make_patient

SLICES, SIZE = 12, 128
SLICE_SPACING_MM, PIXEL_SPACING_MM = 3.3, (0.5, 0.7)


@pytest.fixture(scope="session")
def phantom_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx", reason="building the phantom ONNX models needs the onnx package (.[train])")
    return write_phantom_models(tmp_path_factory.mktemp("phantom-models"), flair_z=2.5)


@pytest.fixture(scope="session")
def dicom_settings(phantom_models_dir: Path) -> Settings:
    return Settings(model_dir=phantom_models_dir, providers="CPUExecutionProvider", warmup_runs=0, max_batch_size=8)


@pytest.fixture(scope="session")
def dicom_client(dicom_settings: Settings) -> Iterator[TestClient]:
    yield from start(create_app(dicom_settings))


@pytest.fixture(scope="session")
def make_dicom_client(dicom_settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """An app on the phantom models with some settings changed; stopped at session end."""
    running: list[Iterator[TestClient]] = []

    def make(**changes: object) -> TestClient:
        runner = start(create_app(Settings(**(dicom_settings.model_dump() | changes))))
        running.append(runner)
        return next(runner)

    yield make
    for runner in running:
        next(runner, None)


@pytest.fixture(scope="session")
def patient() -> SyntheticPatient:
    return make_patient(0, slices=SLICES, size=SIZE)


@pytest.fixture(scope="session")
def flair_volume(patient: SyntheticPatient) -> np.ndarray:
    """12-bit FLAIR: the phantom's 8-bit values times 16, as a scanner's stored values might be."""
    return patient.images[..., 1].astype(np.uint16) * 16


@pytest.fixture(scope="session")
def series_datasets(flair_volume: np.ndarray) -> list[Dataset]:
    return mr_series(flair_volume, slice_spacing=SLICE_SPACING_MM, pixel_spacing=PIXEL_SPACING_MM, bits_stored=12)


@pytest.fixture(scope="session")
def series_files(series_datasets: list[Dataset]) -> list[bytes]:
    return [to_bytes(ds) for ds in series_datasets]


def multipart(files: list[bytes], names: list[str] | None = None, content_type: str = "application/dicom") -> list:
    names = names or [f"IM{n:04d}.dcm" for n in range(len(files))]
    return [("files", (name, data, content_type)) for name, data in zip(names, files, strict=True)]
