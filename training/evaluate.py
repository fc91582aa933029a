"""Choose thresholds on validation patients, then measure once on test patients.

Detection: slice-level ROC AUC, sensitivity, specificity, accuracy at the chosen
threshold. Segmentation as Buda et al. 2019 report it: the Dice of each patient's
whole volume, plus mean Dice over tumor slices; both for the segmenter alone and
for the full detect-then-segment pipeline (mask empty where the classifier says
no). Masks are compared at the source resolution, after the same
`mask_to_input_size` the service applies.
"""

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from app.core.preprocessing import mask_to_input_size, resize_plane
from app.core.series import keep_largest_component
from training.dataset import SliceCache, load_cache, read_split
from training.export import load_checkpoint
from training.metrics import (
    detection_metrics,
    dice_score,
    per_volume_dice,
    threshold_for_sensitivity,
)
from training.train import predict, setup_logging

log = logging.getLogger("training")

Predictor = Callable[[np.ndarray], np.ndarray]  # model inputs (N,3,S,S) -> sigmoid outputs
SEGMENTER_THRESHOLDS = np.round(np.arange(0.1, 0.71, 0.05), 2)


def pipeline_masks(
    tumor_probability: np.ndarray,
    probability_maps: np.ndarray,
    shape: tuple[int, int],
    classifier_threshold: float | None,
    segmenter_threshold: float,
) -> np.ndarray:
    """Masks at source size; with a classifier threshold, empty where the classifier says no tumor."""
    masks = np.stack([mask_to_input_size(m[0], *shape, segmenter_threshold) for m in probability_maps])
    if classifier_threshold is not None:
        masks[tumor_probability < classifier_threshold] = False
    return masks


def segmentation_metrics(masks: np.ndarray, truths: np.ndarray, patients: np.ndarray) -> dict:
    volume = per_volume_dice(masks, truths, patients)
    tumor = truths.reshape(len(truths), -1).any(axis=1)
    tumor_slice_dice = [dice_score(m, t) for m, t in zip(masks[tumor], truths[tumor], strict=True)]
    return {
        "patients": len(volume),
        "volume_dice_mean": float(np.mean(list(volume.values()))),
        "volume_dice_median": float(np.median(list(volume.values()))),
        "volume_dice_by_patient": volume,
        "tumor_slices": int(tumor.sum()),
        "tumor_slice_dice_mean": float(np.mean(tumor_slice_dice)),
    }


def evaluate(
    cache: SliceCache, split: dict[str, list[str]], classify: Predictor, segment: Predictor, target_sensitivity: float
) -> tuple[dict, dict]:
    """Returns (report, per-slice outputs of the test set for figures)."""
    shape = cache.masks.shape[1:]
    outputs = {}
    for part in ("val", "test"):
        idx = cache.indices_of(split[part])
        outputs[part] = {"idx": idx, "prob": classify(cache.images[idx])[:, 0], "maps": segment(cache.images[idx])}
    val = outputs["val"]
    val_labels = cache.labels[val["idx"]]
    classifier_threshold = threshold_for_sensitivity(val["prob"], val_labels, target_sensitivity)

    def pipeline_dice(part: str, segmenter_threshold: float) -> float:
        o = outputs[part]
        masks = pipeline_masks(o["prob"], o["maps"], shape, classifier_threshold, segmenter_threshold)
        return segmentation_metrics(masks, cache.masks[o["idx"]], cache.patients[o["idx"]])["volume_dice_mean"]

    sweep = {float(t): pipeline_dice("val", t) for t in SEGMENTER_THRESHOLDS}
    segmenter_threshold = max(sweep, key=sweep.get)
    log.info(
        "thresholds from validation: classifier %.4f (sensitivity >= %.2f), segmenter %.2f (sweep %s)",
        classifier_threshold,
        target_sensitivity,
        segmenter_threshold,
        sweep,
    )

    metrics = {}
    for part, o in outputs.items():
        idx = o["idx"]
        truths, patients = cache.masks[idx], cache.patients[idx]
        pipeline = pipeline_masks(o["prob"], o["maps"], shape, classifier_threshold, segmenter_threshold)
        alone = pipeline_masks(o["prob"], o["maps"], shape, None, segmenter_threshold)
        # Buda et al.'s 3-D postprocessing, per patient volume (the cache keeps each patient's slices in order).
        largest = pipeline.copy()
        for patient in set(patients.tolist()):
            largest[patients == patient] = keep_largest_component(pipeline[patients == patient])
        metrics[part] = {
            "patients": len(split[part]),
            "slices": len(idx),
            "tumor_slices": int(cache.labels[idx].sum()),
            "detection": detection_metrics(o["prob"], cache.labels[idx], classifier_threshold),
            "segmentation_pipeline": segmentation_metrics(pipeline, truths, patients),
            "segmentation_segmenter_alone": segmentation_metrics(alone, truths, patients),
            "segmentation_pipeline_largest_3d_component": segmentation_metrics(largest, truths, patients),
        }
        o["masks"] = pipeline
    report = {
        "thresholds": {"classifier": classifier_threshold, "segmenter": segmenter_threshold},
        "threshold_choice": {
            "classifier": f"highest threshold with validation sensitivity >= {target_sensitivity}",
            "segmenter": "maximizes validation mean per-volume Dice of the pipeline",
            "segmenter_sweep_validation_volume_dice": sweep,
        },
        "dice_convention": "Dice = 1 when prediction and truth are both empty, 0 when only one is empty",
        "metrics": metrics,
        "split_patients": split,
    }
    return report, outputs["test"]


def draw_figures(report: dict, test: dict, cache: SliceCache, runs: Path, out_dir: Path) -> list[Path]:
    paths = []
    # Training curves.
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, kind, metric in zip(axes, ("classifier", "segmenter"), ("val ROC AUC", "val volume Dice"), strict=True):
        history_path = runs / kind / "history.json"
        if not history_path.exists():
            continue
        history = json.loads(history_path.read_text())
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
        ax.plot(epochs, [h["val_metric"] for h in history], label=metric)
        ax.set(title=kind, xlabel="epoch")
        ax.legend()
    paths.append(out_dir / "training_curves.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    # Per-patient volume Dice of the pipeline on test patients.
    volume = report["metrics"]["test"]["segmentation_pipeline"]["volume_dice_by_patient"]
    fig, ax = plt.subplots(figsize=(10, 4))
    names = sorted(volume, key=volume.get)
    ax.barh(names, [volume[n] for n in names])
    mean = np.mean(list(volume.values()))
    ax.axvline(mean, color="k", linestyle="--", label=f"mean {mean:.3f}")
    ax.set(xlabel="volume Dice (pipeline)", xlim=(0, 1), title="Test patients")
    ax.legend(loc="lower left")
    paths.append(out_dir / "test_volume_dice.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    # Overlays: best, median and worst test tumor slices by slice Dice.
    idx = test["idx"]
    tumor = np.flatnonzero(cache.labels[idx])
    scores = np.array([dice_score(test["masks"][i], cache.masks[idx[i]]) for i in tumor])
    order = tumor[np.argsort(scores)]
    picks = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    for ax, (label, i) in zip(axes, picks.items(), strict=True):
        j = idx[i]
        ax.imshow(resize_plane(cache.images[j][1].astype(np.float32), *cache.masks.shape[1:]), cmap="gray")
        ax.contour(cache.masks[j], levels=[0.5], colors="lime", linewidths=1)
        if test["masks"][i].any():
            ax.contour(test["masks"][i], levels=[0.5], colors="red", linewidths=1)
        dice = dice_score(test["masks"][i], cache.masks[j])
        title = f"{label}: {cache.patients[j]} #{cache.numbers[j]}\nDice {dice:.3f}, p(tumor) {test['prob'][i]:.2f}"
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("green: ground truth, red: pipeline prediction")
    paths.append(out_dir / "test_overlays.png")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def run(args: argparse.Namespace) -> dict:
    runs, out_dir = Path(args.runs), Path(args.out)
    setup_logging(out_dir / "evaluate.log")
    classifier, checkpoint = load_checkpoint(runs / "classifier" / "best.pt")
    segmenter, _ = load_checkpoint(runs / "segmenter" / "best.pt")
    cache = load_cache(Path(args.data), checkpoint["config"]["size"], Path(args.cache_dir))
    split = read_split(Path(args.split))
    report, test = evaluate(
        cache, split, lambda x: predict(classifier, x), lambda x: predict(segmenter, x), args.sensitivity
    )
    report["figures"] = [p.name for p in draw_figures(report, test, cache, runs, out_dir)]
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for part in ("val", "test"):
        m = report["metrics"][part]
        log.info(
            "%s (%d patients): AUC %.4f sens %.4f spec %.4f | volume Dice pipeline %.4f (segmenter alone %.4f, "
            "largest 3-D component %.4f), tumor-slice Dice %.4f",
            part,
            m["patients"],
            m["detection"]["roc_auc"],
            m["detection"]["sensitivity"],
            m["detection"]["specificity"],
            m["segmentation_pipeline"]["volume_dice_mean"],
            m["segmentation_segmenter_alone"]["volume_dice_mean"],
            m["segmentation_pipeline_largest_3d_component"]["volume_dice_mean"],
            m["segmentation_pipeline"]["tumor_slice_dice_mean"],
        )
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="runs", help="folder with classifier/ and segmenter/ checkpoints")
    parser.add_argument("--data", default="../shared/data/lgg")
    parser.add_argument("--split", default="runs/split.json")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--out", default="runs/evaluation", help="report.json and figures go here")
    parser.add_argument(
        "--sensitivity",
        type=float,
        default=0.97,
        help="classifier threshold: highest with at least this validation sensitivity",
    )
