"""Recipes compared as paired per-patient differences; shipped models measured through the service's pipeline."""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from app.core.config import Settings
from app.core.onnx_sessions import load_models, read_model_card
from training.compare import comparison_table, paired_difference, run, shipped_models_dice
from training.cv_report import FLAIR_ONLY, PRIMARY
from training.dataset import load_cache
from training.metrics import per_volume_dice
from training.selection import Outputs, Thresholds, pipeline_masks

REPO_ROOT = Path(__file__).resolve().parents[2]


def cv_report(dice: dict[str, float], mask_loss: str, flair_only_dice: dict[str, float] | None = None) -> dict:
    """The parts of a cv report.json that compare reads."""

    def variant(by_patient: dict[str, float]) -> dict:
        return {
            "volume_dice_mean": sum(by_patient.values()) / len(by_patient),
            "volume_dice_mean_95ci": (0.0, 1.0),
            "roc_auc": 0.9,
            "roc_auc_95ci": (0.8, 1.0),
            "detection_final_flag": {"sensitivity": 0.9, "specificity": 0.95},
            "volume_dice_by_patient": by_patient,
        }

    return {
        "folds": 5,
        "folds_complete": [0, 1, 2, 3, 4],
        "recipe": {"size": 128, "mask_loss": mask_loss},
        "primary": PRIMARY,
        "variants": {PRIMARY: variant(dice), FLAIR_ONLY: variant(flair_only_dice or dice)},
    }


def test_paired_difference_by_hand() -> None:
    reference = {"A": 0.5, "B": 0.8, "C": 0.9, "only-in-reference": 0.0}
    other = {"A": 0.7, "B": 0.8, "C": 0.8, "only-in-other": 1.0}
    d = paired_difference(reference, other)
    assert d["patients"] == 3  # only the patients both predicted
    assert d["mean_difference"] == pytest.approx((0.2 + 0.0 - 0.1) / 3)
    assert (d["better"], d["worse"]) == (1, 1)
    assert (d["reference_mean"], d["other_mean"]) == (pytest.approx(2.2 / 3), pytest.approx(2.3 / 3))
    low, high = d["mean_difference_95ci"]
    assert -0.1 <= low <= d["mean_difference"] <= high <= 0.2  # resampled means stay within the differences


def test_a_consistent_gain_has_an_interval_above_zero_that_overlapping_intervals_would_hide() -> None:
    # Patients vary widely (0.3..0.9), the change adds 0.02 to every one: unpaired intervals overlap almost
    # entirely, the paired one excludes 0.
    reference = {f"P{i}": 0.3 + 0.6 * i / 19 for i in range(20)}
    improved = {p: d + 0.02 for p, d in reference.items()}
    low, high = paired_difference(reference, improved)["mean_difference_95ci"]
    assert low == pytest.approx(0.02) and high == pytest.approx(0.02)
    table = comparison_table(
        ["batch", "slice"], [cv_report(reference, "batch_dice"), cv_report(improved, "slice_dice")], None
    )
    assert "| reference |" in table and "+0.020 [+0.020, +0.020] (20 patients) | 20 / 0 |" in table
    assert "mask_loss slice_dice" in table


def test_flair_only_comparison_reads_each_reports_flair_only_row() -> None:
    full = {f"P{i}": 0.8 for i in range(10)}
    baseline = cv_report(full, "batch_dice", {p: 0.5 for p in full})
    robust = cv_report(full, "batch_dice", {p: 0.7 for p in full})
    assert "+0.000 [+0.000, +0.000] (10 patients)" in comparison_table(["a", "b"], [baseline, robust], None)
    flair_only = comparison_table(["a", "b"], [baseline, robust], None, FLAIR_ONLY)
    assert "| 0.500 [" in flair_only and "+0.200 [+0.200, +0.200] (10 patients) | 10 / 0 |" in flair_only


@pytest.mark.real_data
def test_service_pipeline_gives_the_training_pipelines_dice(real_data_dir: Path, tmp_path: Path) -> None:
    """`compare --models` measures the bundled models through the service (files decoded by app.core.codecs,
    preprocessed, ONNX Runtime, the card's thresholds and postprocessing); the CV reports measure recipes through
    training's pipeline (the slice cache, `pipeline_masks`). With the same ONNX sessions on three real patients,
    both must give the same per-patient Dice, or the two sides of a comparison would not measure the same thing."""
    patients = sorted(p.name for p in real_data_dir.iterdir() if p.is_dir())[:3]
    subset = tmp_path / "lgg"
    subset.mkdir()
    for patient in patients:
        (subset / patient).symlink_to(real_data_dir / patient)
    card = read_model_card(REPO_ROOT / "models")
    cache = load_cache(subset, card.input_size, tmp_path / "cache")
    models = load_models(card, Settings(model_dir=REPO_ROOT / "models", providers="CPUExecutionProvider"))
    images = cache.images.astype(np.float32)  # the cache keeps float16
    outputs = Outputs(np.arange(len(images)), models.classifier.run(images)[:, 0], models.segmenter.run(images)[:, 0])
    postprocessing = card.card.postprocessing
    thresholds = Thresholds(
        card.classifier.threshold,
        card.segmenter.threshold,
        (postprocessing and postprocessing.min_component_pixels) or 0,
    )
    training_side = per_volume_dice(
        pipeline_masks(outputs, cache.masks.shape[1:], thresholds), cache.masks, cache.patients
    )
    service_side = shipped_models_dice(REPO_ROOT / "models", subset, patients)
    assert sorted(service_side) == patients
    assert any(cache.masks[cache.patients == p].any() for p in patients)  # Dice of a tumor, not only of empty slices
    for patient in patients:
        assert service_side[patient] == pytest.approx(training_side[patient], abs=2e-3), patient


def test_models_trained_on_every_patient_are_not_compared_on_their_training_patients(tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(REPO_ROOT / "models", models)
    card = json.loads((models / "model_card.json").read_text())
    everyone = sorted(p for part in card["data"]["split_patients"].values() for p in part)
    card["data"]["split_patients"] = {"train": everyone, "val": [], "test": []}
    (models / "model_card.json").write_text(json.dumps(card))
    report = tmp_path / "cv"
    report.mkdir()
    (report / "report.json").write_text(json.dumps(cv_report({"P0": 0.8}, "batch_dice")))
    args = argparse.Namespace(cv_dirs=[str(report)], models=str(models), data="unused", input="full", out=None)
    with pytest.raises(SystemExit, match="trained on every patient"):
        run(args)
