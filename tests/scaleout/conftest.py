"""Fixtures for the scale-out tests: the bundled models' card, a Triton model repository exported from it."""

from pathlib import Path

import pytest

from app.core.onnx_sessions import ModelCard, read_model_card

pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] is a dependency: pip install -e .")


@pytest.fixture(scope="session")
def card(bundled_models_dir: Path) -> ModelCard:
    return read_model_card(bundled_models_dir)
