"""`python -m training compare`: recipes side by side, each change as a paired difference with an interval.

Two cross-validations over the same fold plan predict every patient out of fold, so a recipe change is judged on
the per-patient differences (paired bootstrap over patients): far tighter than comparing two overlapping
intervals. With `--models`, a shipped model folder is compared too, through the service's own pipeline (decode,
preprocessing, ONNX Runtime, the card's thresholds and postprocessing), on the patients its card kept out of
training (its test split; its validation split chose its thresholds and is listed apart). `--input flair-only`
compares every side on FLAIR-only slices instead (the reports' FLAIR-only row; the shipped models fed the FLAIR
plane alone, as a grayscale upload reaches the service).
"""

import argparse
import json
import logging
from pathlib import Path

import numpy as np

from app.core.config import Settings
from app.core.onnx_sessions import load_models, read_model_card
from app.core.pipeline import Pipeline
from training.cv_report import FLAIR_ONLY, PRIMARY
from training.dataset import find_slices, read_image, read_mask
from training.logs import setup_logging
from training.metrics import bootstrap_interval, per_volume_dice

log = logging.getLogger("training")

# --input: which cv report variant, and what the shipped models are fed.
INPUTS = {"full": PRIMARY, "flair-only": FLAIR_ONLY}


def load_report(path: Path) -> dict:
    report = json.loads((Path(path) / "report.json").read_text())
    if report["folds_complete"] != list(range(report["folds"])):
        log.warning("%s: only folds %s of %d are complete", path, report["folds_complete"], report["folds"])
    return report


def held_out_dice(report: dict, variant: str = PRIMARY) -> dict[str, float]:
    return report["variants"][variant]["volume_dice_by_patient"]


def paired_difference(reference: dict[str, float], other: dict[str, float]) -> dict:
    """Mean of other - reference over the patients both predicted, with a bootstrap 95% interval over patients;
    and each side's mean over those patients."""
    patients = sorted(set(reference) & set(other))
    difference = {p: other[p] - reference[p] for p in patients}

    def mean_of(drawn: list[str]) -> float:
        return float(np.mean([difference[p] for p in drawn]))

    return {
        "patients": len(patients),
        "reference_mean": float(np.mean([reference[p] for p in patients])),
        "other_mean": float(np.mean([other[p] for p in patients])),
        "mean_difference": mean_of(patients),
        "mean_difference_95ci": bootstrap_interval(patients, mean_of),
        "better": sum(d > 0 for d in difference.values()),
        "worse": sum(d < 0 for d in difference.values()),
    }


def shipped_models_dice(model_dir: Path, data: Path, patients: list[str], flair_only: bool = False) -> dict[str, float]:
    """Per-volume Dice of a model folder on `patients`, slice by slice through the service's pipeline."""
    card = read_model_card(model_dir)
    pipeline = Pipeline(load_models(card, Settings(model_dir=model_dir, providers="CPUExecutionProvider")))
    records = [r for r in find_slices(data) if r.patient in set(patients)]
    truths = np.stack([read_mask(r.mask_path) for r in records])
    images = [read_image(r.image_path) for r in records]
    predictions = pipeline.predict_batch([image[..., 1] for image in images] if flair_only else images)
    predicted = np.stack(
        [p.mask if p.mask is not None else np.zeros_like(t) for p, t in zip(predictions, truths, strict=True)]
    )
    return per_volume_dice(predicted, truths, np.array([r.patient for r in records]))


def recipe_label(report: dict) -> str:
    recipe = report["recipe"]
    if "ensemble_of" in recipe:
        return "ensemble of " + " + ".join(Path(run).name for run in recipe["ensemble_of"])
    shown = (
        "networks", "size", "width", "epochs", "ema_decay", "mask_loss", "missing_sequences", "augmentation",
        "fill_background", "init_encoder",
    )  # fmt: skip
    return ", ".join(f"{k} {recipe[k]}" for k in shown if recipe.get(k) is not None)


def comparison_table(
    names: list[str], reports: list[dict], shipped: dict[str, dict] | None, variant: str = PRIMARY
) -> str:
    reference = held_out_dice(reports[0], variant)
    lines = [
        "| recipe | folds | volume Dice mean [95% CI] | ROC AUC [95% CI] | sensitivity / specificity "
        f"| Dice difference vs {names[0]} [paired 95% CI] | better / worse patients |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, report in zip(names, reports, strict=True):
        m = report["variants"][variant]
        flag = m["detection_final_flag"]
        if report is reports[0]:
            change = "reference | "
        else:
            d = paired_difference(reference, held_out_dice(report, variant))
            low, high = d["mean_difference_95ci"]
            change = f"{d['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}] ({d['patients']} patients) "
            change += f"| {d['better']} / {d['worse']}"
        lines.append(
            f"| {name} ({recipe_label(report)}) | {len(report['folds_complete'])}/{report['folds']} "
            f"| {m['volume_dice_mean']:.3f} [{m['volume_dice_mean_95ci'][0]:.3f}, {m['volume_dice_mean_95ci'][1]:.3f}]"
            f" | {m['roc_auc']:.4f} [{m['roc_auc_95ci'][0]:.4f}, {m['roc_auc_95ci'][1]:.4f}] "
            f"| {flag['sensitivity']:.3f} / {flag['specificity']:.3f} | {change} |"
        )
    if shipped:
        lines += [
            "",
            "| shipped models vs out-of-fold | patients | shipped mean Dice | recipe mean Dice (same patients) "
            "| difference [paired 95% CI] | better / worse patients |",
            "|---|---|---|---|---|---|",
        ]
        for split, dice in shipped.items():
            for name, report in zip(names, reports, strict=True):
                d = paired_difference(dice, held_out_dice(report, variant))
                low, high = d["mean_difference_95ci"]
                lines.append(
                    f"| {split} split, {name} | {d['patients']} | {d['reference_mean']:.3f} | {d['other_mean']:.3f} "
                    f"| {d['mean_difference']:+.3f} [{low:+.3f}, {high:+.3f}] | {d['better']} / {d['worse']} |"
                )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> str:
    setup_logging(None)
    names = [Path(p).name for p in args.cv_dirs]
    reports = [load_report(p) for p in args.cv_dirs]
    shipped = None
    if args.models:
        split = read_model_card(Path(args.models)).card.data.split_patients
        held_out = {part: split[part] for part in ("test", "val") if split.get(part)}
        if not held_out:
            raise SystemExit(
                f"{args.models} was trained on every patient (its card keeps none apart): no patient to compare it "
                "on; its recipe's cross-validation is its measurement"
            )
        model_dir, data = Path(args.models), Path(args.data)
        flair_only = args.input == "flair-only"
        shipped = {part: shipped_models_dice(model_dir, data, names, flair_only) for part, names in held_out.items()}
    table = f"Input: {args.input} ({INPUTS[args.input]})\n\n" + comparison_table(
        names, reports, shipped, INPUTS[args.input]
    )
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cv_dirs", nargs="+", help="cv --out folders; the first is the reference")
    parser.add_argument("--models", help="a shipped model folder to compare on the patients its card kept apart")
    parser.add_argument("--data", default="../shared/data/lgg", help="kaggle_3m-layout folder (with --models)")
    parser.add_argument("--input", choices=list(INPUTS), default="full", help="compare on full or FLAIR-only slices")
    parser.add_argument("--out", help="also write the table (markdown) here")
