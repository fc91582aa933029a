"""The bundled models' answers on three fixture slices, pinned: a change of preprocessing, channel order,
thresholds or postprocessing that silently alters what the shipped models say fails here.

After retraining on purpose, `python -m tests.golden.update` pins the new models' answers.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from app.core.onnx_sessions import read_model_card
from tests.golden.update import HERE, MODELS, SLICES, outputs, read_slice

EXPECTED = json.loads((HERE / "expected.json").read_text())


def matches(actual: dict, expected: dict) -> bool:
    return (
        actual["tumor_detected"] == expected["tumor_detected"]
        and abs(actual["area_pixels"] - expected["area_pixels"]) <= max(3, 0.005 * expected["area_pixels"])
        and all(
            actual[key] == pytest.approx(expected[key], abs=1e-4)
            for key in ("tumor_probability", "segmenter_map_mean", "segmenter_map_max")
        )
    )


def test_the_golden_slices_belong_to_the_bundled_models() -> None:
    card = read_model_card(MODELS)
    assert {kind: getattr(card, kind).sha256 for kind in EXPECTED["models"]} == EXPECTED["models"], (
        "models/ changed: run `python -m tests.golden.update` to pin the new models' answers"
    )


@pytest.mark.parametrize("name", sorted(SLICES))
def test_bundled_models_answer_as_pinned(name: str) -> None:
    actual = outputs()["slices"][name]
    assert matches(actual, EXPECTED["slices"][name]), (actual, EXPECTED["slices"][name])


def test_a_channel_swap_would_be_caught(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fixtures are discriminating: swapping R (pre-contrast) and B (post-contrast) changes the answers."""
    swapped = {name: read_slice(name)[..., ::-1] for name in SLICES}
    monkeypatch.setattr("tests.golden.update.read_slice", lambda name: np.ascontiguousarray(swapped[name]))
    actual = outputs()["slices"]
    assert not all(matches(actual[name], EXPECTED["slices"][name]) for name in SLICES)
