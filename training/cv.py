"""`python -m training cv`: patient-grouped K-fold cross-validation of the recipe, resumable fold by fold.

Each fold's held-out patients are predicted by a network trained without them. Inside each fold, an inner
validation group of the fold's training patients (never trained on) chooses that fold's thresholds
(`training.selection`), so no held-out patient chooses anything. The report pools the held-out predictions of
all folds: per-volume Dice with bootstrap 95% intervals over patients, Dice against tumor size, detection.
Every epoch is checkpointed; rerunning the command continues where it stopped.
"""

import argparse
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from training.checkpoints import load_run
from training.cv_report import compact_maps, cross_validation_report, output_suffix, write_report
from training.dataset import SliceCache, load_cache, patient_folds
from training.fitting import Runtime, TrainConfig, add_config_arguments, check_same_recipe, config_from_args, fit
from training.inference import predict
from training.logs import setup_logging

log = logging.getLogger("training")

OUTPUTS_FILE = "outputs.npz"
RECIPE_FILE = "recipe.json"
# --networks: one joint ResUNet (its encoder is the classifier) in fold<k>/, or a ResNet classifier and a ResUNet
# segmenter trained apart, in fold<k>/classifier/ and fold<k>/segmenter/ (the layout `train` writes).
NETWORKS = {"joint": ("joint",), "separate": ("classifier", "segmenter")}
INNER_GROUPS = 6  # the inner validation group is one sixth of a fold's training patients (~11 of 68)


def fold_plan(cache: SliceCache, folds: int, seed: int, path: Path) -> list[dict[str, list[str]]]:
    """Held-out, inner-train and inner-validation patients of every fold; written once, then checked on resume."""
    held_out = patient_folds(cache.patients, cache.labels, folds, seed)
    plan = []
    for k, test in enumerate(held_out):
        training = np.isin(cache.patients, test, invert=True)
        names = set(cache.patients[training].tolist())
        # Tiny datasets (tests) get fewer, larger groups, so the validation group still holds tumor slices.
        groups = min(INNER_GROUPS, max(2, len(names) // 3))
        validation = patient_folds(cache.patients[training], cache.labels[training], groups, seed + k)[0]
        train = sorted(names - set(validation))
        plan.append({"held_out": test, "train": train, "validation": validation})
    if path.exists() and json.loads(path.read_text()) != plan:
        raise SystemExit(f"{path} holds another fold plan (data, --folds or --seed changed): use a new --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan, indent=1) + "\n")
    return plan


def check_one_recipe(config: TrainConfig, path: Path) -> None:
    """All folds of one --out train one recipe (a recipe change is another CV): written once, then checked."""
    if path.exists():
        check_same_recipe(json.loads(path.read_text()), config)
    else:
        path.write_text(json.dumps({k: v for k, v in asdict(config).items() if k != "device"}, indent=1) + "\n")


# The ways each part's slices are predicted: (flip averaging, FLAIR only). Held-out slices are also predicted as
# FLAIR only: the preprocessing z-scores each channel on its own, so a FLAIR-only slice's input is FLAIR's
# channel three times, exactly.
PREDICTIONS = {
    "validation": ((False, False), (True, False)),
    "held_out": ((False, False), (True, False), (False, True)),
}


def outputs_complete(path: Path) -> bool:
    """A fold's outputs.npz holds every prediction the report reads (older ones lack FLAIR-only; rerun adds it)."""
    if not path.exists():
        return False
    with np.load(path) as arrays:
        keys = {f"{part}_probability_maps{output_suffix(*way)}" for part, ways in PREDICTIONS.items() for way in ways}
        return keys <= set(arrays.files)


def predict_fold(fold_dir: Path, cache: SliceCache, fold: dict[str, list[str]], out: Path) -> None:
    """The fold's networks on its inner-validation and held-out slices, each way of PREDICTIONS."""
    networks = load_run(fold_dir)  # one joint network (its encoder the classifier), or two
    classifier, segmenter = networks["classifier"][0], networks["segmenter"][0]
    arrays = {}
    for part, ways in PREDICTIONS.items():
        indices = cache.indices_of(fold[part])
        arrays[f"{part}_indices"] = indices
        for flip, flair_only in ways:
            images = cache.images[indices][:, [1, 1, 1]] if flair_only else cache.images[indices]
            suffix = output_suffix(flip, flair_only)
            arrays[f"{part}_tumor_probability{suffix}"] = predict(classifier, images, flip=flip)[:, 0]
            maps = compact_maps(predict(segmenter, images, flip=flip)[:, 0])
            arrays.update({f"{part}_{name}{suffix}": array for name, array in maps.items()})
    partial = out.with_suffix(".partial.npz")
    np.savez_compressed(partial, **arrays)
    partial.replace(out)


def reuse_classifier(source: Path, plan: list[dict[str, list[str]]], k: int, fold_dir: Path) -> None:
    """Start fold k's classifier from another CV's: a recipe that changes only the segmenter need not retrain it.

    The copy is resumed like any checkpoint, so fit() refuses it unless its recipe is this one's classifier's."""
    target = fold_dir / "classifier"
    if target.exists() or not (source / f"fold{k}" / "classifier").exists():
        return
    if json.loads((source / "folds.json").read_text()) != plan:
        raise SystemExit(f"--classifiers-from {source}: another fold plan; its classifiers held out other patients")
    shutil.copytree(source / f"fold{k}" / "classifier", target)
    log.info("fold %d: classifier copied from %s", k + 1, source)


def run(args: argparse.Namespace) -> dict | None:
    out = Path(args.out)
    setup_logging(out / "cv.log")
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = [config_from_args(args, model) for model in NETWORKS[args.networks]]
    if args.classifiers_from and args.networks != "separate":
        raise SystemExit("--classifiers-from needs --networks separate")
    cache = load_cache(Path(args.data), configs[0].size, Path(args.cache_dir))
    plan = fold_plan(cache, args.folds, configs[0].seed, out / "folds.json")
    check_one_recipe(configs[-1], out / RECIPE_FILE)  # the model field tells joint from separate
    runtime = Runtime.start()
    report = None
    for k in args.only_folds or range(args.folds):
        fold_dir = out / f"fold{k}"
        if outputs_complete(fold_dir / OUTPUTS_FILE):
            continue
        fold = plan[k]
        log.info(
            "fold %d/%d: %d training, %d inner-validation, %d held-out patients",
            k + 1,
            args.folds,
            len(fold["train"]),
            len(fold["validation"]),
            len(fold["held_out"]),
        )
        if args.classifiers_from:
            reuse_classifier(Path(args.classifiers_from), plan, k, fold_dir)
        for config in configs:
            fit(
                config,
                cache,
                cache.indices_of(fold["train"]),
                cache.indices_of(fold["validation"]),
                fold_dir if config.model == "joint" else fold_dir / config.model,
                runtime,
                resume=True,
                progress=args.progress,
            )
        predict_fold(fold_dir, cache, fold, fold_dir / OUTPUTS_FILE)
        # Reported after every fold: a run cut off in a later fold (a session's end) leaves its finished folds' report.
        report = report_finished_folds(cache, plan, out, args)
    return report or report_finished_folds(cache, plan, out, args)


def report_finished_folds(cache: SliceCache, plan: list[dict], out: Path, args: argparse.Namespace) -> dict | None:
    done = [k for k in range(args.folds) if outputs_complete(out / f"fold{k}" / OUTPUTS_FILE)]
    if not done:
        return None
    report = cross_validation_report(cache, plan, {k: np.load(out / f"fold{k}" / OUTPUTS_FILE) for k in done}, args)
    write_report(report, cache, out)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--networks",
        choices=list(NETWORKS),
        default="joint",
        help="one ResUNet trained on both tasks (its encoder is the classifier), or a classifier and a segmenter",
    )
    parser.add_argument("--out", default="runs/cv", help="folds.json, fold<k>/ checkpoints and outputs, the report")
    parser.add_argument("--only-folds", type=int, nargs="+", help="train these folds only (e.g. one per machine)")
    parser.add_argument(
        "--classifiers-from",
        help="another --networks separate CV on the same folds: start each fold's classifier from its checkpoints "
        "(for a recipe that changes only the segmenter; refused if the classifier's recipe differs)",
    )
    parser.add_argument(
        "--sensitivity",
        type=float,
        default=0.99,
        help="classifier threshold (the segmenter runs at or above it): highest with at least this inner-validation "
        "sensitivity",
    )
    add_config_arguments(parser)
