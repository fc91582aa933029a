"""Cross-validation: folds by patient, thresholds chosen without held-out patients, resumable end to end."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.training.conftest import REPO_ROOT, SyntheticData, run_training
from training.cv import fold_plan
from training.cv_report import FLAIR_ONLY, PRIMARY, VARIANTS, LeakError, compact_maps, evaluate_variant
from training.dataset import SliceCache, patient_folds
from training.selection import Outputs, largest_component_per_patient, reported_probability


def toy_cache(patients: int = 23, slices: int = 6, seed: int = 0) -> SliceCache:
    """Patients with 0..slices tumor slices; 8x8 masks, inputs 4x4 (only the bookkeeping matters here)."""
    rng = np.random.default_rng(seed)
    names = np.repeat([f"P{i:02d}" for i in range(patients)], slices)
    masks = np.zeros((len(names), 8, 8), bool)
    for i in range(patients):
        tumor_slices = rng.integers(0, slices + 1)
        masks[i * slices : i * slices + tumor_slices, 2:5, 2:6] = True
    return SliceCache(
        images=np.zeros((len(names), 3, 4, 4), np.float16),
        target_masks=np.zeros((len(names), 1, 4, 4), np.float16),
        masks=masks,
        patients=names,
        numbers=np.tile(np.arange(1, slices + 1), patients),
    )


def test_folds_cover_every_patient_once_and_balance_tumor_burden() -> None:
    cache = toy_cache()
    folds = patient_folds(cache.patients, cache.labels, 5, seed=3)
    flat = [p for fold in folds for p in fold]
    assert sorted(flat) == sorted(set(cache.patients.tolist()))  # every patient, exactly once
    assert max(map(len, folds)) - min(map(len, folds)) <= 1
    burden = {p: cache.labels[cache.patients == p].mean() for p in flat}
    means = [np.mean([burden[p] for p in fold]) for fold in folds]
    assert max(means) - min(means) < 0.35  # stratified: no fold of only light or only heavy tumors
    assert folds == patient_folds(cache.patients, cache.labels, 5, seed=3)  # deterministic


def test_fold_plan_keeps_held_out_patients_out_of_training_and_threshold_choice(tmp_path: Path) -> None:
    cache = toy_cache(patients=30)
    plan = fold_plan(cache, 5, 42, tmp_path / "folds.json")
    assert sorted(p for fold in plan for p in fold["held_out"]) == sorted(set(cache.patients.tolist()))
    for fold in plan:
        held_out = set(fold["held_out"])
        assert not held_out & set(fold["train"]) and not held_out & set(fold["validation"])
        assert not set(fold["train"]) & set(fold["validation"]) and fold["validation"]
        assert len(held_out) + len(fold["train"]) + len(fold["validation"]) == 30
    # Resuming with another plan (other data or seed) is refused rather than mixing folds.
    with pytest.raises(SystemExit, match="another fold plan"):
        fold_plan(cache, 5, 7, tmp_path / "folds.json")


def fake_outputs(cache: SliceCache, validation: list[str], held_out: list[str], held_out_shift: float) -> dict:
    """Outputs that follow the truth on validation slices and are shifted by held_out_shift on held-out ones."""
    arrays = {}
    for part, names, shift in (("validation", validation, 0.0), ("held_out", held_out, held_out_shift)):
        idx = cache.indices_of(names)
        truth = cache.labels[idx].astype(np.float32)
        probability = np.clip(0.2 + 0.6 * truth + shift, 0, 1)
        maps = np.zeros((len(idx), 4, 4), np.float16)
        maps[:, 1:3, 1:3] = (0.1 + 0.8 * truth + shift)[:, None, None]
        for suffix in ("", "_flip", "_flair_only"):
            arrays[f"{part}_tumor_probability{suffix}"] = probability
            arrays[f"{part}_probability_maps{suffix}"] = maps
        arrays[f"{part}_indices"] = idx
    return arrays


def test_thresholds_do_not_depend_on_held_out_outputs() -> None:
    cache = toy_cache(patients=12)
    names = sorted(set(cache.patients.tolist()))
    validation, held_out = names[:6], names[6:]
    runs = [
        evaluate_variant(cache, {0: fake_outputs(cache, validation, held_out, shift)}, VARIANTS[PRIMARY], 0.97)
        for shift in (0.0, -0.15)  # held-out probabilities change, validation ones do not
    ]
    chosen = [{k: v for k, v in run["thresholds_by_fold"][0].items() if k != "sweeps"} for run in runs]
    assert chosen[0] == chosen[1]
    assert runs[0]["volume_dice_mean"] != runs[1]["volume_dice_mean"]  # the held-out change was seen downstream
    for run in runs:  # a tumor patient is found exactly when its Dice is above 0 (some overlap)
        tumor_patients = [p for p in held_out if cache.labels[cache.patients == p].any()]
        dice = run["volume_dice_by_patient"]
        assert run["patients_tumor_found"] == [sum(dice[p] > 0 for p in tumor_patients), len(tumor_patients)]
    assert runs[0]["patients_tumor_found"] != runs[1]["patients_tumor_found"]  # lowered outputs lose a patient


def test_the_flair_only_variant_reads_flair_only_held_out_outputs_with_full_input_thresholds() -> None:
    cache = toy_cache(patients=12)
    names = sorted(set(cache.patients.tolist()))
    arrays = fake_outputs(cache, names[:6], names[6:], 0.0)
    arrays["validation_probability_maps_flair_only"] = arrays["validation_probability_maps"] * 0  # never read
    arrays["held_out_probability_maps_flair_only"] = arrays["held_out_probability_maps"] * 0  # finds nothing
    full, flair = (evaluate_variant(cache, {0: arrays}, VARIANTS[name], 0.97) for name in (PRIMARY, FLAIR_ONLY))
    assert full["thresholds_by_fold"][0]["segmenter"] == flair["thresholds_by_fold"][0]["segmenter"]
    assert flair["volume_dice_mean"] < full["volume_dice_mean"]


def test_compact_outputs_report_what_the_full_maps_report() -> None:
    """outputs.npz's uint8 maps with exact peaks (small enough to commit) give the float maps' thresholds, Dice and
    detection ranking; the peaks matter: from the quantized maps alone, faint slices tie at 0."""
    cache = toy_cache(patients=16)
    names = sorted(set(cache.patients.tolist()))
    rng = np.random.default_rng(1)
    arrays = {}
    for part, patients in (("validation", names[:8]), ("held_out", names[8:])):
        idx = cache.indices_of(patients)
        truth = cache.labels[idx]
        maps = rng.uniform(0, 0.3, (len(idx), 4, 4))
        maps[:, 1:3, 1:3] += truth[:, None, None] * rng.uniform(0.2, 0.7, (len(idx), 1, 1))
        maps *= np.where(rng.random((len(idx), 1, 1)) < 0.3, 1e-3, 1.0)  # faint maps, below the quantization step
        arrays[f"{part}_indices"] = idx
        for suffix in ("", "_flip", "_flair_only"):
            arrays[f"{part}_tumor_probability{suffix}"] = rng.uniform(0.5, 1, len(idx)).astype(np.float32)
            arrays[f"{part}_probability_maps{suffix}"] = maps.astype(np.float32)
    compact = dict(arrays)
    for key in [k for k in arrays if "_probability_maps" in k]:
        part, suffix = key.split("_probability_maps")
        stored = compact_maps(arrays[key])
        assert stored["probability_maps"].dtype == np.uint8
        compact[key] = stored["probability_maps"]
        compact[f"{part}_segmenter_peak{suffix}"] = stored["segmenter_peak"]
    full, small = (evaluate_variant(cache, {0: a}, VARIANTS[PRIMARY], 0.97) for a in (arrays, compact))
    chosen = [{k: v for k, v in r["thresholds_by_fold"][0].items() if k != "sweeps"} for r in (full, small)]
    assert chosen[0] == chosen[1]
    for patient, dice in full["volume_dice_by_patient"].items():  # pixels within a quantization step may flip
        assert abs(small["volume_dice_by_patient"][patient] - dice) < 0.02, patient
    assert small["roc_auc"] == full["roc_auc"]
    peaks_dropped = {k: v for k, v in compact.items() if "_segmenter_peak" not in k}
    assert evaluate_variant(cache, {0: peaks_dropped}, VARIANTS[PRIMARY], 0.97)["roc_auc"] != full["roc_auc"]


def test_the_reported_probability_adds_the_segmenters_evidence_where_the_segmenter_runs() -> None:
    cache = toy_cache(patients=12)
    names = sorted(set(cache.patients.tolist()))
    arrays = fake_outputs(cache, names[:6], names[6:], 0.0)  # validation: the classifier's threshold is 0.8
    rng = np.random.default_rng(1)
    held_out = len(arrays["held_out_indices"])
    arrays["held_out_tumor_probability"] = rng.uniform(0.85, 0.95, held_out).astype(np.float32)  # no signal
    report = evaluate_variant(cache, {0: arrays}, VARIANTS[PRIMARY], 0.97)
    assert report["classifier_roc_auc"] < 0.8 and report["roc_auc"] == 1.0  # the maps follow the truth
    assert report["segmented_share"] == 1.0
    outputs = Outputs(np.arange(3), np.array([0.9, 0.9, 0.5], np.float32), np.zeros((3, 4, 4), np.float16))
    outputs.probability_maps[1, 0, 0] = 0.4
    outputs.probability_maps[2] = 0.9  # below the classifier's threshold the service never runs the segmenter
    np.testing.assert_allclose(reported_probability(outputs, 0.8), [0.0, 0.6, 0.5], atol=1e-3)


def test_the_largest_region_is_kept_per_patient_with_slices_stacked_in_order() -> None:
    masks = np.zeros((5, 8, 8), bool)
    patients = np.array(["A", "B", "A", "A", "B"])
    numbers = np.array([3, 1, 1, 2, 2])
    # A: one region through slices 1-3 (slice 2 joins the other two): 30 pixels, in one piece only in slice order
    masks[2, 1:4, 0:2] = True  # slice 1
    masks[3, 1:4, 0:6] = True  # slice 2
    masks[0, 1:4, 4:6] = True  # slice 3
    masks[2, 6:8, 6:8] = True  # A: a separate 4-pixel region on slice 1
    masks[1, 0, 0] = True  # B: one pixel, smaller than A's stray region, yet B's largest
    kept = largest_component_per_patient(masks, patients, numbers)
    assert kept[[0, 2, 3]].sum() == 30 and not kept[2, 6:8, 6:8].any()
    assert kept[1, 0, 0] and kept.sum() == 31


def test_a_planted_leak_is_caught() -> None:
    cache = toy_cache(patients=12)
    names = sorted(set(cache.patients.tolist()))
    leaky = fake_outputs(cache, names[:7], names[6:], 0.0)  # patient 6 both chooses thresholds and is held out
    with pytest.raises(LeakError, match=names[6]):
        evaluate_variant(cache, {0: leaky}, VARIANTS[PRIMARY], 0.97)


@pytest.mark.slow
def test_cv_runs_resumes_and_reports_every_patient_once(synthetic_tif: SyntheticData, tmp_path: Path) -> None:
    common = ["cv", "--data", synthetic_tif.root, "--out", tmp_path / "cv", "--cache-dir", tmp_path / "cache"]
    common += ["--folds", "2", "--size", "64", "--width", "8", "--threads", "1", "--no-progress"]
    # A session's end in fold 2 (the process killed as fold 2 starts) leaves fold 1 trained, predicted and reported.
    command = [sys.executable, "-m", "training", *map(str, common), "--epochs", "1"]
    with subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True) as process:
        assert process.stderr is not None
        for line in process.stderr:
            if "fold 2/2" in line:
                process.kill()
                break
        else:
            pytest.fail(f"the cv run ended (exit {process.wait()}) without starting fold 2")
    first = json.loads((tmp_path / "cv" / "report.json").read_text())
    assert first["folds_complete"] == [0]
    fold0 = (tmp_path / "cv" / "fold0" / "outputs.npz").stat().st_mtime_ns
    with np.load(tmp_path / "cv" / "fold0" / "outputs.npz") as outputs:  # the compact form, small enough to commit
        assert outputs["held_out_probability_maps"].dtype == np.uint8 and "held_out_segmenter_peak" in outputs
    log = run_training(*common, "--epochs", "1")
    assert "fold 1/2" not in log and "fold 2/2" in log  # fold 0 is done and not trained again
    with pytest.raises(AssertionError, match="another recipe"):  # a recipe change is another CV, not more folds
        run_training(*common, "--epochs", "1", "--mask-loss", "slice_dice")
    assert (tmp_path / "cv" / "fold0" / "outputs.npz").stat().st_mtime_ns == fold0
    report = json.loads((tmp_path / "cv" / "report.json").read_text())
    patients = [row["patient"] for row in report["per_patient"]]
    assert sorted(patients) == sorted(p.folder for p in synthetic_tif.patients) and report["patients"] == 10
    for name, variant in report["variants"].items():
        low, high = variant["volume_dice_mean_95ci"]
        assert low <= variant["volume_dice_mean"] <= high, name
    assert (tmp_path / "cv" / "report.md").read_text().count("| TCGA") == 10
    for figure in report["figures"]:
        assert (tmp_path / "cv" / figure).stat().st_size > 1000


@pytest.mark.slow
def test_final_model_on_every_patient_exports_with_the_cv_thresholds_and_figures(
    synthetic_tif: SyntheticData, tmp_path: Path
) -> None:
    data = ["--data", synthetic_tif.root, "--cache-dir", tmp_path / "cache"]
    tiny = ["--size", "64", "--width", "8", "--threads", "1", "--no-progress", "--epochs", "1"]
    run_training("cv", *data, *tiny, "--out", tmp_path / "cv", "--folds", "2")
    split = tmp_path / "all" / "split.json"
    run_training(
        "train", "--model", "joint", "--all-patients", *data, *tiny, "--out", tmp_path / "all", "--split", split
    )
    assert len(json.loads(split.read_text())["train"]) == 10
    export = ["export", "--runs", tmp_path / "all", *data, "--split", split, "--out", tmp_path / "models"]
    run_training(*export, "--cv-report", tmp_path / "cv" / "report.json")
    card = json.loads((tmp_path / "models" / "model_card.json").read_text())
    cv = json.loads((tmp_path / "cv" / "report.json").read_text())
    folds = cv["variants"][cv["primary"]]["thresholds_by_fold"].values()
    median = float(np.median([fold["classifier"] for fold in folds]))
    assert card["models"]["classifier"]["threshold"] == pytest.approx(median)
    assert card["cross_validation"]["k"] == 2 and card["cross_validation"]["patients"] == 10
    pooled = card["cross_validation"]["pooled"]["volume_dice_mean"]
    assert pooled["low"] <= pooled["estimate"] <= pooled["high"]
    assert "metrics" not in card  # no single-split figures for a model that trained on every patient
    other = ["--out", tmp_path / "other", "--split", split, "--mask-loss", "slice_dice"]
    run_training("train", "--model", "joint", "--all-patients", *data, *tiny, *other)
    with pytest.raises(AssertionError, match="not trained with the CV's recipe"):  # its figures would not be its own
        run_training(*export[:2], tmp_path / "other", *export[3:], "--cv-report", tmp_path / "cv" / "report.json")


@pytest.mark.slow
def test_cv_with_separate_networks_trains_both_per_fold_and_keeps_its_recipe(
    synthetic_tif: SyntheticData, tmp_path: Path
) -> None:
    common = ["cv", "--data", synthetic_tif.root, "--out", tmp_path / "cv", "--cache-dir", tmp_path / "cache"]
    common += ["--folds", "2", "--size", "64", "--width", "8", "--threads", "1", "--no-progress", "--epochs", "1"]
    run_training(*common, "--networks", "separate")
    for k in (0, 1):
        for kind in ("classifier", "segmenter"):
            assert (tmp_path / "cv" / f"fold{k}" / kind / "model.pt").exists()
        assert not (tmp_path / "cv" / f"fold{k}" / "model.pt").exists()
    report = json.loads((tmp_path / "cv" / "report.json").read_text())
    assert report["recipe"]["networks"] == "separate"
    assert "a ResNet classifier and a ResUNet segmenter" in report["method"]
    assert len(report["per_patient"]) == 10
    with pytest.raises(AssertionError, match="another recipe"):  # the joint recipe is another CV
        run_training(*common)

    # A segmenter-only change (loss, filled backgrounds) reuses the folds' classifiers: same weights, a new segmenter.
    other = [arg if arg != tmp_path / "cv" else tmp_path / "cv-tversky" for arg in common]
    reuse = ["--networks", "separate", "--classifiers-from", tmp_path / "cv"]
    log = run_training(*other, *reuse, "--mask-loss", "tversky", "--fill-background", "0.5", "--only-folds", "0")
    assert "classifier copied from" in log
    first, second = (tmp_path / run / "fold0" for run in ("cv", "cv-tversky"))
    assert (first / "classifier" / "model.pt").read_bytes() == (second / "classifier" / "model.pt").read_bytes()
    assert (first / "segmenter" / "model.pt").read_bytes() != (second / "segmenter" / "model.pt").read_bytes()
    recipe = json.loads((tmp_path / "cv-tversky" / "report.json").read_text())["recipe"]
    assert recipe["mask_loss"] == "tversky" and recipe["fill_background"] == 0.5
    # The segmenter's encoder can start from each fold's own classifier: one recipe for every fold.
    beside = [arg if arg != tmp_path / "cv" else tmp_path / "cv-encoder" for arg in common]
    log = run_training(*beside, *reuse, "--init-encoder", "classifier")
    for k in (0, 1):
        assert f"encoder starts from {tmp_path / 'cv-encoder' / f'fold{k}' / 'classifier' / 'model.pt'}" in log
    assert json.loads((tmp_path / "cv-encoder" / "report.json").read_text())["recipe"]["init_encoder"] == "classifier"
    # ... and only when the classifier's recipe is the same.
    refused = [arg if arg != tmp_path / "cv" else tmp_path / "cv-missing" for arg in common]
    with pytest.raises(AssertionError, match=r"another recipe \(missing_sequences"):
        run_training(*refused, *reuse, "--missing-sequences", "0.5")
