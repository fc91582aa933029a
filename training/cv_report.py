"""The cross-validation report: pooled held-out figures with bootstrap intervals, per patient, and figures.

Variants are postprocessing choices evaluated on the same trained folds (thresholds re-chosen on each fold's
inner validation patients for every variant), so their rows differ only by that choice.
"""

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from training.dataset import SliceCache
from training.figures import overlay_panel
from training.metrics import (
    bootstrap_interval,
    decision_metrics,
    dice_score,
    roc_auc,
    segmentation_metrics,
)
from training.selection import (
    MIN_COMPONENT_PIXELS,
    Outputs,
    choose_thresholds,
    largest_component_per_patient,
    pipeline_masks,
    reported_probability,
)


class Variant(NamedTuple):
    flip: bool  # flip averaging
    components: bool  # small components removed
    # Held-out slices shown as FLAIR only (a study without pre- and post-contrast, or a grayscale upload);
    # thresholds are still chosen on the full inputs, as the shipped card's are.
    flair_only: bool = False
    largest_component: bool = False  # the series routes' option: only the largest 3-D tumor region kept


# The first is the recipe's, fixed before any result.
VARIANTS = {
    "pipeline, small components removed": Variant(flip=False, components=True),
    "pipeline, no component removal": Variant(flip=False, components=False),
    "pipeline, small components removed, flip averaging": Variant(flip=True, components=True),
    "pipeline, small components removed, FLAIR-only input": Variant(flip=False, components=True, flair_only=True),
    "pipeline, small components removed, largest 3-D region": Variant(
        flip=False, components=True, largest_component=True
    ),
}
PRIMARY = next(iter(VARIANTS))
FLAIR_ONLY = next(name for name, variant in VARIANTS.items() if variant.flair_only)
RECIPE_OPTIONS = (
    "networks", "size", "width", "blocks", "epochs", "warmup_epochs", "batch_size", "lr", "ema_decay", "mask_loss",
    "missing_sequences", "augmentation", "fill_background", "init_encoder", "seed", "autocast",
)  # fmt: skip
NETWORKS_TEXT = {
    "joint": "one joint ResUNet (its encoder is the ResNet classifier)",
    "separate": "a ResNet classifier and a ResUNet segmenter, each",
}


class LeakError(RuntimeError):
    """A held-out patient reached the data that chooses thresholds."""


def check_no_leak(cache: SliceCache, arrays: np.lib.npyio.NpzFile) -> None:
    shared = set(cache.patients[arrays["validation_indices"]]) & set(cache.patients[arrays["held_out_indices"]])
    if shared:
        raise LeakError(f"held-out patients among the threshold-choosing ones: {sorted(shared)}")


def output_suffix(flip: bool, flair_only: bool = False) -> str:
    """The outputs.npz key suffix of one way of predicting (training.cv.predict_fold writes them)."""
    return "_flip" * flip + "_flair_only" * flair_only


# outputs.npz keeps the segmenter's maps as round(probability x MAP_LEVELS) in uint8, with each map's exact peak
# beside them: compressed, a fold's outputs take about 0.5 MB instead of 100 MB of float16, so they can be
# committed and a CV survives the machine it ran on. The thresholds are chosen on a 0.05 grid, far above the
# quantization step (0.004). Older outputs.npz hold float16 maps and no peaks; both are read.
MAP_LEVELS = 255


def compact_maps(maps: np.ndarray) -> dict[str, np.ndarray]:
    """Probability maps (N, S, S) as outputs.npz stores them: quantized maps and exact peaks."""
    return {
        "probability_maps": np.round(maps * MAP_LEVELS).astype(np.uint8),
        "segmenter_peak": maps.reshape(len(maps), -1).max(axis=1).astype(np.float32),
    }


def fold_outputs(arrays: np.lib.npyio.NpzFile, part: str, flip: bool, flair_only: bool = False) -> Outputs:
    suffix = output_suffix(flip, flair_only)
    maps = arrays[f"{part}_probability_maps{suffix}"]
    peaks = f"{part}_segmenter_peak{suffix}"
    return Outputs(
        arrays[f"{part}_indices"],
        arrays[f"{part}_tumor_probability{suffix}"],
        maps.astype(np.float32) / MAP_LEVELS if maps.dtype == np.uint8 else maps,
        arrays.get(peaks),
    )


def evaluate_variant(
    cache: SliceCache, folds: dict[int, np.lib.npyio.NpzFile], variant: Variant, sensitivity: float
) -> dict:
    """Thresholds per fold on its inner validation patients, applied to its held-out patients; then pooled."""
    shape = cache.masks.shape[1:]
    indices, probabilities, scores, masks, thresholds = [], [], [], [], {}
    for k, arrays in sorted(folds.items()):
        check_no_leak(cache, arrays)
        validation = fold_outputs(arrays, "validation", variant.flip)
        v = validation.indices
        sizes = MIN_COMPONENT_PIXELS if variant.components else (0,)
        chosen, sweeps = choose_thresholds(validation, cache.masks[v], cache.patients[v], sensitivity, sizes)
        held_out = fold_outputs(arrays, "held_out", variant.flip, variant.flair_only)
        thresholds[k] = {**chosen.__dict__, "sweeps": sweeps}
        indices.append(held_out.indices)
        probabilities.append(held_out.classifier_probability)
        scores.append(reported_probability(held_out, chosen.classifier))
        masks.append(pipeline_masks(held_out, shape, chosen))
    idx = np.concatenate(indices)
    classifier, reported, predicted = np.concatenate(probabilities), np.concatenate(scores), np.concatenate(masks)
    truths, patients, labels = cache.masks[idx], cache.patients[idx], cache.labels[idx]
    if variant.largest_component:
        predicted = largest_component_per_patient(predicted, patients, cache.numbers[idx])
    segmentation = segmentation_metrics(predicted, truths, patients)
    by_patient = segmentation["volume_dice_by_patient"]
    names = sorted(by_patient)
    # A patient whose tumor gets no overlapping mask pixel at all is the miss a radiologist would notice first.
    with_tumor = [p for p in names if truths[patients == p].any()]
    found = [bool((predicted[patients == p] & truths[patients == p]).any()) for p in with_tumor]
    flagged = np.concatenate(
        [p >= thresholds[k]["classifier"] for k, p in zip(sorted(folds), probabilities, strict=True)]
    )

    def auc_of(values: np.ndarray) -> Callable[[list[str]], float]:
        def auc(drawn: list[str]) -> float:
            # Each drawn patient's slices, as many times as the patient was drawn.
            take = np.concatenate([np.flatnonzero(patients == p) for p in drawn])
            return roc_auc(values[take], labels[take])

        return auc

    return {
        "patients": len(names),
        "slices": len(idx),
        "volume_dice_mean": segmentation["volume_dice_mean"],
        "volume_dice_mean_95ci": bootstrap_interval(names, lambda d: float(np.mean([by_patient[p] for p in d]))),
        "volume_dice_median": segmentation["volume_dice_median"],
        "volume_dice_median_95ci": bootstrap_interval(names, lambda d: float(np.median([by_patient[p] for p in d]))),
        "tumor_slice_dice_mean": segmentation["tumor_slice_dice_mean"],
        # The service's tumor_probability (both networks' evidence), and the classifier's alone beside it.
        "roc_auc": roc_auc(reported, labels),
        "roc_auc_95ci": bootstrap_interval(names, auc_of(reported), samples=500),
        "specificity_at_sensitivity_0.95": specificity_at(reported, labels, 0.95),
        "classifier_roc_auc": roc_auc(classifier, labels),
        "classifier_roc_auc_95ci": bootstrap_interval(names, auc_of(classifier), samples=500),
        "classifier_specificity_at_sensitivity_0.95": specificity_at(classifier, labels, 0.95),
        "patients_tumor_found": [sum(found), len(found)],
        "detection_final_flag": decision_metrics(predicted.reshape(len(idx), -1).any(axis=1), labels),
        "detection_classifier_alone": decision_metrics(flagged, labels),
        "segmented_share": float(flagged.mean()),
        "thresholds_by_fold": thresholds,
        "volume_dice_by_patient": by_patient,
        "_predicted": (idx, predicted, reported),
    }


def specificity_at(scores: np.ndarray, labels: np.ndarray, sensitivity: float) -> float:
    """The pooled ROC curve's specificity where sensitivity first reaches `sensitivity` (descriptive only)."""
    positives = np.sort(scores[labels])
    threshold = positives[int(np.floor(len(positives) * (1 - sensitivity)))]
    return float((scores[~labels] < threshold).mean())


def cross_validation_report(
    cache: SliceCache, plan: list[dict], folds: dict[int, np.lib.npyio.NpzFile], args: argparse.Namespace
) -> dict:
    variants = {name: evaluate_variant(cache, folds, variant, args.sensitivity) for name, variant in VARIANTS.items()}
    primary = variants[PRIMARY]
    idx, predicted, _ = primary["_predicted"]
    fold_of = {p: k for k, fold in enumerate(plan) for p in fold["held_out"]}
    per_patient = []
    for patient, dice in sorted(primary["volume_dice_by_patient"].items(), key=lambda item: item[1]):
        rows = cache.patients[idx] == patient
        per_patient.append(
            {
                "patient": patient,
                "fold": fold_of[patient],
                "slices": int(rows.sum()),
                "tumor_slices": int(cache.labels[idx][rows].sum()),
                "tumor_pixels": int(cache.masks[idx][rows].sum()),
                "predicted_pixels": int(predicted[rows].sum()),
                "volume_dice": dice,
            }
        )
    return {
        "folds": len(plan),
        "folds_complete": sorted(folds),
        "patients": sum(len(f["held_out"]) for k, f in enumerate(plan) if k in folds),
        "method": (
            f"{len(plan)}-fold cross-validation grouped by patient, stratified by tumor burden (seed {args.seed}); "
            f"in each fold {NETWORKS_TEXT[args.networks]} trained on the fold's training "
            "patients minus an inner validation group, which alone chooses the fold's thresholds (classifier: "
            f"highest with sensitivity >= {args.sensitivity}; segmenter threshold and minimum component size: "
            "best mean per-volume Dice); held-out predictions pooled; 95% intervals by bootstrap over patients"
        ),
        "recipe": {k: getattr(args, k) for k in RECIPE_OPTIONS},
        "dice_convention": "Dice = 1 when prediction and truth are both empty, 0 when only one is empty",
        "primary": PRIMARY,
        "variants": {name: {k: v for k, v in m.items() if k != "_predicted"} for name, m in variants.items()},
        "per_patient": per_patient,
        "_primary_predicted": primary["_predicted"],
    }


def markdown_table(report: dict) -> str:
    lines = [
        "| variant | volume Dice mean [95% CI] | median [95% CI] | tumor-slice Dice "
        "| tumor_probability: ROC AUC [95% CI], specificity at sensitivity 0.95 "
        "| classifier alone: ROC AUC [95% CI], specificity at sensitivity 0.95 "
        "| sensitivity / specificity (final flag) | slices segmented | patients with tumor found |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["variants"].items():
        flag = m["detection_final_flag"]
        lines.append(
            f"| {name} | {m['volume_dice_mean']:.3f} [{m['volume_dice_mean_95ci'][0]:.3f}, "
            f"{m['volume_dice_mean_95ci'][1]:.3f}] | {m['volume_dice_median']:.3f} "
            f"[{m['volume_dice_median_95ci'][0]:.3f}, {m['volume_dice_median_95ci'][1]:.3f}] "
            f"| {m['tumor_slice_dice_mean']:.3f} | {m['roc_auc']:.4f} [{m['roc_auc_95ci'][0]:.4f}, "
            f"{m['roc_auc_95ci'][1]:.4f}], {m['specificity_at_sensitivity_0.95']:.3f} "
            f"| {m['classifier_roc_auc']:.4f} [{m['classifier_roc_auc_95ci'][0]:.4f}, "
            f"{m['classifier_roc_auc_95ci'][1]:.4f}], {m['classifier_specificity_at_sensitivity_0.95']:.3f} "
            f"| {flag['sensitivity']:.3f} / {flag['specificity']:.3f} | {m['segmented_share']:.3f} "
            f"| {'/'.join(map(str, m['patients_tumor_found']))} |"
        )
    return "\n".join(lines) + "\n"


def draw_figures(report: dict, cache: SliceCache, out: Path) -> list[str]:
    rows = report["per_patient"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([max(r["tumor_pixels"], 1) for r in rows], [r["volume_dice"] for r in rows], s=18)
    ax.set(xscale="log", xlabel="tumor size (mask pixels at 256x256, whole volume; 1 = tumor-free)")
    ax.set(ylabel="per-volume Dice (held out)", ylim=(-0.02, 1.02), title="Dice against tumor size, pooled folds")
    fig.tight_layout()
    fig.savefig(out / "cv_dice_vs_tumor_size.png", dpi=100)
    plt.close(fig)

    idx, predicted, probability = report["_primary_predicted"]
    with_tumor = [r for r in rows if r["tumor_pixels"] > 0]
    picks = {"worst": with_tumor[0], "median": with_tumor[len(with_tumor) // 2], "best": with_tumor[-1]}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    for ax, (label, row) in zip(axes, picks.items(), strict=True):
        rows_of = np.flatnonzero(cache.patients[idx] == row["patient"])
        i = rows_of[np.argmax(cache.masks[idx[rows_of]].sum(axis=(1, 2)))]  # the slice with the most tumor
        j = idx[i]
        title = (
            f"{label}: {row['patient']} #{cache.numbers[j]}\nvolume Dice {row['volume_dice']:.3f}, slice Dice "
            f"{dice_score(predicted[i], cache.masks[j]):.3f}, p {probability[i]:.2f}"
        )
        overlay_panel(ax, cache, j, predicted[i], title)
    fig.suptitle("held-out patients; green: ground truth, red: pipeline")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(out / "cv_overlays.png", dpi=100)
    plt.close(fig)
    return ["cv_dice_vs_tumor_size.png", "cv_overlays.png"]


def write_report(report: dict, cache: SliceCache, out: Path) -> None:
    report["figures"] = draw_figures(report, cache, out)
    report.pop("_primary_predicted")
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    per_patient = (
        "| patient | fold | tumor slices | tumor pixels | predicted pixels | volume Dice |\n|---|---|---|---|---|---|\n"
    )
    per_patient += "".join(
        f"| {r['patient']} | {r['fold']} | {r['tumor_slices']}/{r['slices']} | {r['tumor_pixels']} "
        f"| {r['predicted_pixels']} | {r['volume_dice']:.3f} |\n"
        for r in report["per_patient"]
    )
    complete = f"{len(report['folds_complete'])}/{report['folds']} folds, {report['patients']} patients"
    (out / "report.md").write_text(
        f"# Cross-validation ({complete})\n\n{report['method']}.\n\n{markdown_table(report)}\n{per_patient}"
    )
