"""`python -m training ensemble`: the cross-validation of the mean of CV runs' outputs, from their outputs.npz."""

import json
from pathlib import Path

import numpy as np
import pytest

from tests.training.conftest import SyntheticData, run_training
from training.cv import PREDICTIONS, fold_plan
from training.cv_report import compact_maps, output_suffix
from training.dataset import SliceCache, load_cache
from training.ensemble import mean_outputs

SIZE = 32


def run_outputs(cache: SliceCache, fold: dict[str, list[str]], seed: int) -> dict[str, np.ndarray]:
    """One fold's outputs.npz arrays, compact as cv writes them: maps that roughly follow the truth, with noise."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for part, ways in PREDICTIONS.items():
        idx = cache.indices_of(fold[part])
        arrays[f"{part}_indices"] = idx
        truth = cache.target_masks[idx, 0].astype(np.float32)
        for flip, flair_only in ways:
            suffix = output_suffix(flip, flair_only)
            maps = np.clip(truth * rng.uniform(0.3, 1.0, (len(idx), 1, 1)) + rng.uniform(0, 0.3, truth.shape), 0, 1)
            maps *= np.where(rng.random((len(idx), 1, 1)) < 0.2, 1e-3, 1.0)  # some faint, tumor-free-looking maps
            arrays[f"{part}_tumor_probability{suffix}"] = rng.uniform(0, 1, len(idx)).astype(np.float32)
            arrays.update({f"{part}_{k}{suffix}": v for k, v in compact_maps(maps).items()})
    return arrays


def test_the_mean_of_outputs_is_per_slice_and_keeps_faint_slices_ranked() -> None:
    first = {
        "validation_indices": np.array([0, 1]),
        "held_out_indices": np.array([2, 3]),
    }
    second = dict(first)
    for part in ("validation", "held_out"):
        for flip, flair_only in PREDICTIONS[part]:
            suffix = output_suffix(flip, flair_only)
            maps = np.zeros((2, 4, 4), np.float32)
            maps[0, 1, 1] = 0.8
            maps[1] = 1e-4  # below the stored maps' quantization step
            for arrays, scale, probability in ((first, 1.0, [0.2, 0.4]), (second, 0.5, [0.6, 0.0])):
                arrays.update({f"{part}_{k}{suffix}": v for k, v in compact_maps(maps * scale).items()})
                arrays[f"{part}_tumor_probability{suffix}"] = np.array(probability, np.float32)
    mean = mean_outputs([first, second])
    np.testing.assert_allclose(mean["held_out_tumor_probability"], [0.4, 0.2])
    np.testing.assert_allclose(mean["held_out_probability_maps_flip"][0, 1, 1], 0.6, atol=1 / 255)
    np.testing.assert_allclose(mean["held_out_segmenter_peak"], [0.6, 0.75e-4], rtol=0.01)
    second["held_out_indices"] = np.array([3, 2])
    with pytest.raises(SystemExit, match="not the same fold plan"):
        mean_outputs([first, second])


def write_run(root: Path, cache: SliceCache, plan: list[dict], seed: int, folds: list[int]) -> Path:
    root.mkdir(parents=True)
    (root / "folds.json").write_text(json.dumps(plan))
    recipe = {"networks": "separate", "size": SIZE, "seed": 42, "mask_loss": "batch_dice"}
    (root / "report.json").write_text(json.dumps({"recipe": recipe}))
    for k in folds:
        (root / f"fold{k}").mkdir()
        np.savez_compressed(root / f"fold{k}" / "outputs.npz", **run_outputs(cache, plan[k], seed + k))
    return root


def test_an_ensemble_of_a_run_with_itself_reports_that_run_and_of_two_runs_their_shared_folds(
    synthetic_tif: SyntheticData, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    cache = load_cache(synthetic_tif.root, SIZE, cache_dir)
    plan = fold_plan(cache, 2, 42, tmp_path / "plan.json")
    a = write_run(tmp_path / "a", cache, plan, seed=1, folds=[0, 1])
    b = write_run(tmp_path / "b", cache, plan, seed=2, folds=[0])
    common = ["--data", synthetic_tif.root, "--cache-dir", cache_dir]

    def ensemble(name: str, *runs: Path) -> dict:
        run_training("ensemble", *runs, "--out", tmp_path / name, *common)
        return json.loads((tmp_path / name / "report.json").read_text())

    alone, doubled = ensemble("a-alone", a), ensemble("a-a", a, a)
    for variant, measured in alone["variants"].items():
        assert doubled["variants"][variant]["volume_dice_by_patient"] == measured["volume_dice_by_patient"]
        assert doubled["variants"][variant]["roc_auc"] == pytest.approx(measured["roc_auc"])
    both = ensemble("a-b", a, b)
    assert both["folds_complete"] == [0]  # fold 1 is not finished in b
    assert list(both["recipe"]["ensemble_of"]) == [str(a), str(b)]
    assert both["variants"]["pipeline, small components removed"]["volume_dice_by_patient"].keys() == set(
        plan[0]["held_out"]
    )
    other_plan = tmp_path / "c"
    write_run(other_plan, cache, fold_plan(cache, 2, 7, tmp_path / "plan7.json"), seed=3, folds=[0])
    with pytest.raises(AssertionError, match="other fold plans"):
        run_training("ensemble", a, other_plan, "--out", tmp_path / "refused", *common)
