"""Fixtures for the service tests: settings on the bundled models, in-process apps, test images."""

import io
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pycocotools import mask as coco_mask

from app.core.config import Settings
from app.core.onnx_sessions import read_model_card
from app.core.preprocessing import preprocess_slice
from app.main import create_app

READY_TIMEOUT_S = 180  # generous: a nice 15 process gets little CPU while training runs


def synthetic_slice(height: int = 256, width: int = 256, seed: int = 0) -> np.ndarray:
    """A head-like ellipse with a bright blob, HxWx3 uint8 in the dataset's channel order."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    head = ((y - height / 2) / (0.42 * height)) ** 2 + ((x - width / 2) / (0.36 * width)) ** 2 <= 1
    blob = ((y - 0.4 * height) / (0.08 * height)) ** 2 + ((x - 0.6 * width) / (0.1 * width)) ** 2 <= 1
    image = np.zeros((height, width, 3), np.float32)
    image[head] = (60, 80, 70)
    image[blob] = (70, 200, 90)
    image += rng.normal(0, 6, image.shape) * head[..., None]
    return np.clip(image, 0, 255).astype(np.uint8)


def encode(array: np.ndarray, image_format: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def coco_decode(rle: dict) -> np.ndarray:
    """A COCO uncompressed RLE mask (the service's `rle` format) decoded by pycocotools, as bool HxW."""
    return coco_mask.decode(coco_mask.frPyObjects(rle, *rle["size"])).astype(bool)


def wait_until_ready(client: TestClient) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "service not ready in time"
        time.sleep(0.02)


def start(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as client:
        wait_until_ready(client)
        yield client


@pytest.fixture(scope="session")
def settings(bundled_models_dir: Path) -> Settings:
    # Batching on (it is off by default): these tests exercise the dynamic batcher and its queue metrics.
    return Settings(
        model_dir=bundled_models_dir, providers="CPUExecutionProvider", warmup_runs=0, max_batch_size=8, batching=True
    )


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[TestClient]:
    yield from start(create_app(settings))


@pytest.fixture(scope="session")
def make_client(settings: Settings) -> Iterator[Callable[..., TestClient]]:
    """A started app with some settings changed, e.g. make_client(api_key="k"); stopped at session end."""
    started: list[Iterator[TestClient]] = []

    def make(**changes: object) -> TestClient:
        runner = start(create_app(Settings(**(settings.model_dump() | changes))))
        started.append(runner)
        return next(runner)

    yield make
    for runner in started:
        next(runner, None)


@pytest.fixture(scope="session")
def slice_png() -> bytes:
    return encode(synthetic_slice())


def segmenter_map(model_dir: Path, image: np.ndarray) -> np.ndarray:
    """The segmenter's probability map for one slice, straight from ONNX Runtime."""
    card = read_model_card(model_dir)
    session = ort.InferenceSession(str(card.segmenter.path), providers=["CPUExecutionProvider"])
    batch = preprocess_slice(image, card.input_size)[None]
    return session.run([card.segmenter.output_name], {card.segmenter.input_name: batch})[0][0, 0]


def models_with_thresholds(bundled_models_dir: Path, folder: Path, classifier: float, segmenter: float) -> Path:
    """The bundled ONNX files (symlinked) under a card with other thresholds."""
    card = json.loads((bundled_models_dir / "model_card.json").read_text())
    for kind, threshold in (("classifier", classifier), ("segmenter", segmenter)):
        (folder / card["models"][kind]["file"]).symlink_to(bundled_models_dir / card["models"][kind]["file"])
        card["models"][kind]["threshold"] = threshold
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="session")
def tumor_models_dir(bundled_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Thresholds that give the synthetic slice a partial, non-empty mask whatever the models were trained to.

    Classifier threshold 0 flags every slice; the segmenter threshold is the median of its map for synthetic_slice().
    """
    median = float(np.median(segmenter_map(bundled_models_dir, synthetic_slice())))
    return models_with_thresholds(bundled_models_dir, tmp_path_factory.mktemp("tumor-models"), 0.0, median)


@pytest.fixture(scope="session")
def tumor_client(make_client: Callable[..., TestClient], tumor_models_dir: Path) -> TestClient:
    return make_client(model_dir=tumor_models_dir)


@pytest.fixture(scope="session")
def no_tumor_client(
    make_client: Callable[..., TestClient], bundled_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> TestClient:
    """A classifier threshold above 1: no slice is a tumor."""
    folder = models_with_thresholds(bundled_models_dir, tmp_path_factory.mktemp("no-tumor-models"), 1.01, 0.5)
    return make_client(model_dir=folder)
