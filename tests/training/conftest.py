"""Fixtures for the training tests: small synthetic kaggle_3m datasets, written once per session."""

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from training.synthetic import SyntheticPatient, write_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]
# 10 patients (2 tumor-free) x 12 slices: enough for a 6/2/2 patient split and for slice numbers past 9.
SYNTHETIC = {"patients": 10, "slices": 12, "size": 96, "seed": 7}


@dataclass(frozen=True)
class SyntheticData:
    root: Path
    patients: list[SyntheticPatient]


@pytest.fixture(scope="session")
def synthetic_tif(tmp_path_factory: pytest.TempPathFactory) -> SyntheticData:
    root = tmp_path_factory.mktemp("synthetic-tif")
    return SyntheticData(root, write_synthetic_dataset(root, fmt="tif", **SYNTHETIC))


@pytest.fixture(scope="session")
def synthetic_webp(tmp_path_factory: pytest.TempPathFactory) -> SyntheticData:
    root = tmp_path_factory.mktemp("synthetic-webp")
    return SyntheticData(root, write_synthetic_dataset(root, fmt="webp", **SYNTHETIC))


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    """One patient, three 32x32 slices, for tests that break files."""
    root = tmp_path / "data"
    write_synthetic_dataset(root, patients=1, slices=3, size=32, seed=1, tumor_free_every=0)
    return root


def run_training(*args: str | Path, timeout: float = 1200, launcher: tuple[str, ...] = ()) -> str:
    """`python -m training ARGS` in a subprocess (or under `launcher`, e.g. torchrun); returns its log output.

    The timeout only catches hangs: niced behind a training job, a one-epoch run can take minutes.
    """
    command = [*(launcher or (sys.executable, "-m")), "training", *map(str, args)]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} exited {result.returncode}:\n{result.stderr[-4000:]}"
    return result.stdout + result.stderr


@dataclass(frozen=True)
class TrainedRuns:
    data: Path
    runs: Path  # runs/classifier/ and runs/joint/ after one epoch each
    split: Path
    cache_dir: Path


# One thread: the tiny nets are faster single-threaded, and tests must not starve a training job in the background.
TINY_TRAINING = ("--size", "64", "--width", "8", "--batch-size", "16", "--threads", "1", "--no-progress")


@pytest.fixture(scope="session")
def trained_runs(synthetic_tif: SyntheticData, tmp_path_factory: pytest.TempPathFactory) -> TrainedRuns:
    work = tmp_path_factory.mktemp("trained")
    trained = TrainedRuns(synthetic_tif.root, work / "runs", work / "runs" / "split.json", work / "cache")
    for model in ("classifier", "joint"):
        run_training(
            "train", "--model", model, "--data", trained.data, "--out", trained.runs, "--split", trained.split,
            "--cache-dir", trained.cache_dir, "--epochs", "1", *TINY_TRAINING,
        )  # fmt: skip
    return trained


def copy_run(trained: TrainedRuns, destination: Path) -> Path:
    """A private copy of the trained runs folder, for tests that train further."""
    shutil.copytree(trained.runs, destination)
    return destination
