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
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from app.core.postprocessing import keep_largest_component
from training.checkpoints import load_run
from training.dataset import SliceCache, load_cache, read_split
from training.figures import overlay_panel
from training.inference import predict
from training.logs import setup_logging
from training.metrics import decision_metrics, dice_score, roc_auc, segmentation_metrics
from training.selection import Outputs, choose_thresholds, pipeline_masks, reported_probability

log = logging.getLogger("training")


def evaluate(
    cache: SliceCache, split: dict[str, list[str]], outputs: dict[str, Outputs], target_sensitivity: float
) -> tuple[dict, dict]:
    """Thresholds on the validation patients, metrics on validation and test; returns (report, test masks)."""
    shape = cache.masks.shape[1:]
    val = outputs["val"]
    thresholds, sweeps = choose_thresholds(
        val, cache.masks[val.indices], cache.patients[val.indices], target_sensitivity
    )
    log.info("thresholds from validation: %s", thresholds)
    metrics, masks = {}, {}
    for part, o in outputs.items():
        idx = o.indices
        truths, patients, labels = cache.masks[idx], cache.patients[idx], cache.labels[idx]
        pipeline = pipeline_masks(o, shape, thresholds)
        alone = pipeline_masks(o, shape, thresholds, classify=False)
        # Buda et al.'s 3-D postprocessing, per patient volume (the cache keeps each patient's slices in order).
        largest = pipeline.copy()
        for patient in set(patients.tolist()):
            largest[patients == patient] = keep_largest_component(pipeline[patients == patient])
        metrics[part] = {
            "patients": len(split[part]),
            "slices": len(idx),
            "tumor_slices": int(labels.sum()),
            # What the service answers: tumor_probability as the card's rule reports it, tumor_detected (the flag).
            "detection": {
                "roc_auc": roc_auc(reported_probability(o, thresholds.classifier), labels),
                "classifier_roc_auc": roc_auc(o.classifier_probability, labels),
                "threshold": thresholds.classifier,
                **decision_metrics(pipeline.reshape(len(idx), -1).any(axis=1), labels),
            },
            "segmentation_pipeline": segmentation_metrics(pipeline, truths, patients),
            "segmentation_segmenter_alone": segmentation_metrics(alone, truths, patients),
            "segmentation_pipeline_largest_3d_component": segmentation_metrics(largest, truths, patients),
        }
        masks[part] = pipeline
    report = {
        "thresholds": thresholds.__dict__,
        "threshold_choice": {
            "classifier": f"highest threshold with validation sensitivity >= {target_sensitivity}",
            "segmenter": "maximizes validation mean per-volume Dice of the pipeline",
            "min_component_pixels": "then the smallest component size kept, same criterion",
            "sweeps_validation_volume_dice": sweeps,
        },
        "dice_convention": "Dice = 1 when prediction and truth are both empty, 0 when only one is empty",
        "metrics": metrics,
        "split_patients": split,
    }
    return report, masks["test"]


def draw_figures(
    report: dict, test: Outputs, test_masks: np.ndarray, cache: SliceCache, runs: Path, out_dir: Path
) -> list[Path]:
    paths = []
    # Training curves of every run folder there is (classifier, segmenter or joint).
    histories = {p.parent.name: json.loads(p.read_text()) for p in sorted(runs.glob("*/history.json"))}
    fig, axes = plt.subplots(1, max(len(histories), 1), figsize=(5.5 * max(len(histories), 1), 4), squeeze=False)
    for ax, (kind, history) in zip(axes[0], histories.items(), strict=False):
        epochs = [h["epoch"] for h in history]
        ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
        for metric in ("roc_auc", "volume_dice"):
            if metric in history[0]:
                ax.plot(epochs, [h[metric] for h in history], label=f"val {metric}")
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
    idx = test.indices
    tumor = np.flatnonzero(cache.labels[idx])
    scores = np.array([dice_score(test_masks[i], cache.masks[idx[i]]) for i in tumor])
    order = tumor[np.argsort(scores)]
    picks = {"worst": order[0], "median": order[len(order) // 2], "best": order[-1]}
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.5))
    for ax, (label, i) in zip(axes, picks.items(), strict=True):
        j = idx[i]
        dice = dice_score(test_masks[i], cache.masks[j])
        probability = test.classifier_probability[i]
        title = f"{label}: {cache.patients[j]} #{cache.numbers[j]}\nDice {dice:.3f}, classifier p {probability:.2f}"
        overlay_panel(ax, cache, j, test_masks[i], title)
    fig.suptitle("green: ground truth, red: pipeline prediction")
    paths.append(out_dir / "test_overlays.png")
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def run(args: argparse.Namespace) -> dict:
    runs, out_dir = Path(args.runs), Path(args.out)
    setup_logging(out_dir / "evaluate.log")
    networks = load_run(runs)
    (classifier, checkpoint), (segmenter, _) = networks["classifier"], networks["segmenter"]
    cache = load_cache(Path(args.data), checkpoint["config"]["size"], Path(args.cache_dir))
    split = read_split(Path(args.split))
    outputs = {}
    for part in ("val", "test"):
        idx = cache.indices_of(split[part])
        images = cache.images[idx]
        outputs[part] = Outputs(idx, predict(classifier, images)[:, 0], predict(segmenter, images)[:, 0])
    report, test_masks = evaluate(cache, split, outputs, args.sensitivity)
    report["figures"] = [p.name for p in draw_figures(report, outputs["test"], test_masks, cache, runs, out_dir)]
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
    parser.add_argument("--runs", default="runs", help="folder with joint/ (or classifier/ and segmenter/) checkpoints")
    parser.add_argument("--data", default="../shared/data/lgg")
    parser.add_argument("--split", default="runs/split.json")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--out", default="runs/evaluation", help="report.json and figures go here")
    parser.add_argument(
        "--sensitivity",
        type=float,
        default=0.99,
        help="classifier threshold (the segmenter runs at or above it): highest with at least this validation "
        "sensitivity",
    )
