"""`python -m training ensemble RUN RUN ... --out DIR`: the cross-validation of an ensemble of CV runs, no training.

CV runs over the same fold plan predicted every held-out patient with networks that never saw it. The mean of
their outputs, fold by fold (classifier probabilities, segmenter maps; inner-validation and held-out alike), is what
an ensemble of those networks answers, so the same report (thresholds chosen on the inner validation patients,
held-out figures pooled) is the ensemble's cross-validation, at no training cost: two seeds of one recipe measure
what averaging buys; two recipes, what their combination buys. Only folds every run finished are reported.
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from training.cv import OUTPUTS_FILE, PREDICTIONS, outputs_complete
from training.cv_report import (
    RECIPE_OPTIONS,
    cross_validation_report,
    fold_outputs,
    output_suffix,
    write_report,
)
from training.dataset import load_cache
from training.logs import setup_logging

log = logging.getLogger("training")


def mean_outputs(members: list) -> dict[str, np.ndarray]:
    """One fold's outputs.npz arrays (each member's) -> the ensemble's: mean probabilities and mean maps.

    Each map's peak is that of the mean map; where every member's map stays below the quantization step of the
    stored maps (a faint, tumor-free slice) the mean of the members' exact peaks stands in for it (an upper bound),
    so faint slices still rank by the segmenter's evidence rather than tie."""
    arrays: dict[str, np.ndarray] = {}
    for part, ways in PREDICTIONS.items():
        indices = [m[f"{part}_indices"] for m in members]
        if any(not np.array_equal(i, indices[0]) for i in indices):
            raise SystemExit(f"the runs predicted other {part} slices in a fold: not the same fold plan")
        arrays[f"{part}_indices"] = indices[0]
        for flip, flair_only in ways:
            suffix = output_suffix(flip, flair_only)
            outputs = [fold_outputs(m, part, flip, flair_only) for m in members]
            maps = np.mean([o.probability_maps.astype(np.float32) for o in outputs], axis=0)
            peak = maps.reshape(len(maps), -1).max(axis=1)
            faint = np.mean([o.segmenter_peak for o in outputs], axis=0)
            arrays[f"{part}_tumor_probability{suffix}"] = np.mean([o.classifier_probability for o in outputs], axis=0)
            arrays[f"{part}_probability_maps{suffix}"] = maps
            arrays[f"{part}_segmenter_peak{suffix}"] = np.where(peak > 0, peak, faint).astype(np.float32)
    return arrays


def run(args: argparse.Namespace) -> dict:
    out = Path(args.out)
    setup_logging(out / "ensemble.log")
    runs = [Path(r) for r in args.runs]
    plans = [json.loads((r / "folds.json").read_text()) for r in runs]
    if any(plan != plans[0] for plan in plans):
        raise SystemExit("the runs hold other fold plans: their held-out patients differ")
    recipes = [json.loads((r / "report.json").read_text())["recipe"] for r in runs]
    if len({(r["size"], r["seed"]) for r in recipes}) != 1:
        raise SystemExit("the runs differ in input size or fold seed")
    folds = [k for k in range(len(plans[0])) if all(outputs_complete(r / f"fold{k}" / OUTPUTS_FILE) for r in runs)]
    if not folds:
        raise SystemExit("no fold is finished in every run")
    log.info("ensemble of %s over folds %s", [str(r) for r in runs], [k + 1 for k in folds])
    cache = load_cache(Path(args.data), recipes[0]["size"], Path(args.cache_dir))
    members = {k: [np.load(r / f"fold{k}" / OUTPUTS_FILE) for r in runs] for k in folds}
    averaged = {k: mean_outputs(arrays) for k, arrays in members.items()}
    # The report's wording (networks, seed) from the first run; its recipe is then the runs' own recipes.
    settings = argparse.Namespace(**{**dict.fromkeys(RECIPE_OPTIONS), **recipes[0], "sensitivity": args.sensitivity})
    report = cross_validation_report(cache, plans[0], averaged, settings)
    report["method"] = f"Ensemble (mean outputs) of the runs {', '.join(map(str, runs))}. " + report["method"]
    report["recipe"] = {"ensemble_of": {str(r): recipe for r, recipe in zip(runs, recipes, strict=True)}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "folds.json").write_text(json.dumps(plans[0], indent=1) + "\n")
    write_report(report, cache, out)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", help="cv --out folders over the same fold plan")
    parser.add_argument("--out", required=True, help="the ensemble's report.{json,md} and figures")
    parser.add_argument("--data", default="../shared/data/lgg", help="kaggle_3m-layout folder")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument(
        "--sensitivity", type=float, default=0.99, help="classifier threshold: inner-validation sensitivity"
    )
