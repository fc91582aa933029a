"""Two live services for the client and CLI tests, and a folder of slices to send them.

`plain`: the bundled models as they are, no API key (what they decide for synthetic slices is theirs to say).
`tumor`: the same models with the thresholds of tests/service's tumor_models_dir (every slice flagged, a partial
mask), behind an API key.
"""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live_server import LiveServer, live_server
from tests.service.conftest import encode, synthetic_slice, tumor_models_dir  # noqa: F401 (a fixture)

API_KEY = "client-test-key"
# Relative path -> file content: several formats, sizes and folder depths, a mask and a non-image to skip,
# and one corrupt slice.
SLICE_FILES = {
    "TCGA_A/TCGA_A_1.png": lambda: encode(synthetic_slice(256, 256, seed=1)),
    "TCGA_A/TCGA_A_2.tif": lambda: encode(synthetic_slice(256, 256, seed=2), "TIFF"),
    "TCGA_A/TCGA_A_10.webp": lambda: encode(synthetic_slice(200, 180, seed=3), "WEBP", lossless=True),
    "TCGA_A/TCGA_A_1_mask.png": lambda: encode(synthetic_slice(256, 256)[..., 0] > 100),
    "other/deeper/flair.jpg": lambda: encode(synthetic_slice(160, 192, seed=4)[..., 1], "JPEG", quality=95),
    "corrupt.png": lambda: b"\x89PNG\r\n\x1a\n this is not a PNG",
    "notes.txt": lambda: b"not a slice",
}
# What `predict` sends, in its (natural, case-insensitive) order.
SENT = ["corrupt.png", "other/deeper/flair.jpg", "TCGA_A/TCGA_A_1.png", "TCGA_A/TCGA_A_2.tif", "TCGA_A/TCGA_A_10.webp"]


@pytest.fixture(scope="session")
def plain_server(bundled_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("plain"), model_dir=bundled_models_dir, warmup_runs=0) as server:
        yield server


@pytest.fixture(scope="session")
def tumor_server(tumor_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:  # noqa: F811
    log_dir = tmp_path_factory.mktemp("tumor")
    with live_server(log_dir, model_dir=tumor_models_dir, api_key=API_KEY, warmup_runs=0) as server:
        yield server


@pytest.fixture(scope="session")
def slices_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("slices")
    for relative, content in SLICE_FILES.items():
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        (folder / relative).write_bytes(content())
    return folder
