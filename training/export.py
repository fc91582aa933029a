"""Export both networks to ONNX, check them against PyTorch, and write the model card.

Each ONNX graph ends in a sigmoid, so the service reads probabilities directly:
  classifier.onnx  image (N,3,S,S) float32 -> tumor_probability (N,1)
  segmenter.onnx   image (N,3,S,S) float32 -> tumor_probability_map (N,1,S,S)
"""

import argparse
import json
import logging
import platform
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from app.core.model_card import (
    CARD_FILE,
    PREPROCESSING_FUNCTION,
    Hyperparameters,
    ModelCardSchema,
    sha256_of,
    write_card,
)
from app.core.postprocessing import BOTH_NETWORKS, DETECTION_RULE
from app.core.preprocessing import CHANNEL_ORDER, NORMALIZATION
from training.checkpoints import load_run
from training.cv_report import RECIPE_OPTIONS
from training.dataset import load_cache, read_split
from training.fitting import SEGMENTER_ONLY_OPTIONS, TrainConfig
from training.inference import predict
from training.logs import setup_logging
from training.networks import count_gflops, count_parameters

log = logging.getLogger("training")

MODEL_FILES = {"classifier": "classifier.onnx", "segmenter": "segmenter.onnx"}
OUTPUT_NAMES = {"classifier": "tumor_probability", "segmenter": "tumor_probability_map"}
OPSET = 17


class WithSigmoid(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(image))


def training_statement(configs: dict[str, dict], train_patients: int) -> str:
    """How each network started and where it trained, from its checkpoint's config (not from defaults)."""
    parts = []
    for kind, config in configs.items():
        if config.get("pretrained"):
            start = f"started from ImageNet weights ({Path(config['pretrained']).name})"
        elif config.get("init_encoder"):
            start = "encoder started from a trained classifier"
        else:
            start = "trained from scratch (no ImageNet weights)"
        parts.append(f"{kind} {start} on {config.get('device') or 'an unrecorded device'}, seed {config['seed']}")
    sentence = "; ".join(parts)
    return f"{sentence[0].upper()}{sentence[1:]}; {train_patients} training patients of one public dataset."


def training_run(checkpoint: dict) -> dict:
    """What the card says about the run: from the checkpoint's own config and state."""
    config, state = checkpoint["config"], checkpoint["state"]
    final = {k: v for k, v in (state["history"] or [{}])[-1].items() if k in ("roc_auc", "volume_dice")}
    return {
        "device": config.get("device") or None,  # the device fit() trained on, as its checkpoint says
        "epochs_run": state["epoch"],
        "seconds_run": round(state["train_seconds"]),
        **({"final_validation": final} if final else {}),
        "hyperparameters": {k: config[k] for k in Hyperparameters.model_fields if k in config},
    }


def check_cv_recipe(networks: dict[str, tuple[nn.Module, dict]], cv_report: dict) -> None:
    """The card's CV figures and thresholds describe the recipe that CV trained: refuse networks of another
    recipe, and a CV with unfinished folds (its figures and thresholds would stand for fewer patients than it says)."""
    recipe = cv_report["recipe"]
    if "ensemble_of" in recipe:
        raise SystemExit("--cv-report: an ensemble's CV, not these models' (export writes no ensemble)")
    missing = sorted(set(range(cv_report["folds"])) - set(cv_report["folds_complete"]))
    if missing:
        raise SystemExit(f"--cv-report: folds {[k + 1 for k in missing]} of {cv_report['folds']} unfinished")
    defaults = asdict(TrainConfig(model="segmenter"))
    expected = {k: defaults.get(k) for k in RECIPE_OPTIONS} | {k: v for k, v in recipe.items() if v is not None}
    changed = []
    for kind, (_, checkpoint) in networks.items():
        config = {**defaults, **checkpoint["config"]}
        config["networks"] = "joint" if config["model"] == "joint" else "separate"
        for option in RECIPE_OPTIONS:
            if kind == "classifier" and config["networks"] == "separate" and option in SEGMENTER_ONLY_OPTIONS:
                continue
            want, have = json.loads(json.dumps(expected[option])), json.loads(json.dumps(config[option]))
            if want != have:
                changed.append(f"{kind} {option}: {have!r}, CV {want!r}")
    if changed:
        raise SystemExit(f"--cv-report: these networks were not trained with the CV's recipe ({'; '.join(changed)})")


def thresholds_from_cv(cv_report: dict) -> dict[str, float]:
    """For models trained on every patient: the median over folds of each fold's thresholds, which that fold's
    inner validation patients chose for the same recipe (no patient scored in the CV chose them for itself)."""
    by_fold = cv_report["variants"][cv_report["primary"]]["thresholds_by_fold"].values()
    return {
        key: float(np.median([fold[key] for fold in by_fold]))
        for key in ("classifier", "segmenter", "min_component_pixels")
    }


def cross_validation_section(cv_report: dict) -> dict:
    """The CV report in the card's terms: pooled figures with their intervals, each fold's thresholds."""
    primary = cv_report["variants"][cv_report["primary"]]
    method = "bootstrap over patients, 2000 resamples (ROC AUC: 500)"

    def interval(key: str) -> dict:
        low, high = primary[f"{key}_95ci"]
        return {"estimate": primary[key], "low": low, "high": high, "method": method}

    return {
        "k": cv_report["folds"],
        "patients": cv_report["patients"],
        "seed": cv_report["recipe"]["seed"],
        "folds": [
            {
                "fold": int(k),
                "validation_patients": sorted({r["patient"] for r in cv_report["per_patient"] if r["fold"] == int(k)}),
                "thresholds": {t: float(fold[t]) for t in ("classifier", "segmenter", "min_component_pixels")},
            }
            for k, fold in sorted(primary["thresholds_by_fold"].items())
        ],
        "pooled": {key: interval(key) for key in ("volume_dice_mean", "volume_dice_median", "roc_auc")},
        "threshold_selection": cv_report["method"],
    }


def export_onnx(model: nn.Module, kind: str, size: int, path: Path) -> None:
    # Legacy exporter: one self-contained file, no onnxscript, a stable opset.
    torch.onnx.export(
        WithSigmoid(model).eval(),
        (torch.zeros(1, 3, size, size),),
        str(path),
        dynamo=False,
        opset_version=OPSET,
        input_names=["image"],
        output_names=[OUTPUT_NAMES[kind]],
        dynamic_axes={"image": {0: "batch"}, OUTPUT_NAMES[kind]: {0: "batch"}},
    )


def check_parity(model: nn.Module, path: Path, images: np.ndarray, threshold: float) -> dict[str, float | int]:
    """Max abs difference of ONNX Runtime vs PyTorch probabilities, and how many decisions differ."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = np.concatenate(
        [session.run(None, {"image": images[i : i + 32].astype(np.float32)})[0] for i in range(0, len(images), 32)]
    )
    torch_out = predict(model, images)
    return {
        "slices": len(images),
        "max_abs_difference": float(np.abs(onnx_out - torch_out).max()),
        "differing_decisions": int(
            (((onnx_out >= threshold) != (torch_out >= threshold)) & (np.abs(torch_out - threshold) > 1e-5)).sum()
        ),
    }


def export_models(
    networks: dict[str, tuple[nn.Module, dict]],
    out_dir: Path,
    parity_images: np.ndarray,
    thresholds: dict[str, float],
    data_description: dict,
    metrics: dict | None = None,
    cross_validation: dict | None = None,
    version: str | None = None,
) -> dict:
    """Write both ONNX files and the card; refuse to finish if ONNX and PyTorch disagree on a decision."""
    out_dir.mkdir(parents=True, exist_ok=True)
    card_models, configs = {}, {}
    size = None
    for kind, (model, checkpoint) in networks.items():
        config = checkpoint["config"]
        configs[kind] = config
        size = config["size"]
        path = out_dir / MODEL_FILES[kind]
        export_onnx(model, kind, size, path)
        threshold = thresholds[kind]
        parity = check_parity(model, path, parity_images, threshold)
        log.info("%s: %s", kind, parity)
        if parity["differing_decisions"] or parity["max_abs_difference"] > 1e-3:
            raise RuntimeError(f"{kind}: ONNX Runtime disagrees with PyTorch: {parity}")
        card_models[kind] = {
            "file": MODEL_FILES[kind],
            "sha256": sha256_of(path),
            "architecture": (
                f"ResNet ({'-'.join(map(str, config['blocks']))} BasicBlocks, base width {config['width']})"
                if kind == "classifier"
                else f"ResUNet (ResNet encoder {'-'.join(map(str, config['blocks']))}, base width "
                f"{config['width']}, residual bottleneck, residual decoder with skips)"
            ),
            "parameters": count_parameters(model),
            "gflops_per_slice": round(count_gflops(model, size), 3),
            "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32"},
            "output": {
                "name": OUTPUT_NAMES[kind],
                "shape": ["batch", 1] if kind == "classifier" else ["batch", 1, size, size],
            },
            "threshold": threshold,
            "opset": OPSET,
            "onnx_parity": parity,
            "training": training_run(checkpoint),
        }
    card = {
        "name": "lgg-tumor-detect-segment",
        "version": version or datetime.now(UTC).strftime("%Y.%m.%d"),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "task": "Brain MRI slice: is a lower-grade glioma FLAIR abnormality there (classifier), and where (segmenter).",
        "pipeline": "classifier on every slice; segmenter only where the classifier's probability >= its threshold",
        "input": {
            "size": size,
            "channel_order": list(CHANNEL_ORDER),
            "normalization": NORMALIZATION,
            "accepts": "8-bit slice of any size, RGB in channel_order or a single FLAIR channel (replicated)",
            "preprocessing": PREPROCESSING_FUNCTION,
        },
        "models": card_models,
        "postprocessing": {
            "min_component_pixels": int(thresholds["min_component_pixels"]),
            "detection_rule": DETECTION_RULE,
            "tumor_probability": BOTH_NETWORKS,
        },
        **({"metrics": metrics} if metrics is not None else {}),
        **({"cross_validation": cross_validation} if cross_validation is not None else {}),
        "data": data_description,
        "hardware": {
            "machine": platform.machine(),
            "processor": platform.processor() or "unknown",
            "torch": torch.__version__,
            "cpu_threads": torch.get_num_threads(),
        },
        "intended_use": "Research and engineering demonstration. NOT a medical device; not for diagnosis.",
        "limitations": [
            training_statement(configs, len(data_description["split_patients"]["train"])),
            "Lower-grade glioma FLAIR abnormality only; other pathologies, scanners and protocols are unseen.",
            "Slice-by-slice: no 3D context.",
        ],
        "citation": [
            "M. Buda, A. Saha, M. A. Mazurowski. Computers in Biology and Medicine 109 (2019).",
            "M. A. Mazurowski et al. Journal of Neuro-Oncology 133 (2017).",
        ],
        "license": "Models derived from data distributed for research, treat as CC BY-NC-SA 4.0.",
    }
    write_card(ModelCardSchema.model_validate(card), out_dir)  # the service's schema: refuses what it would refuse
    return card


def run(args: argparse.Namespace) -> dict:
    out_dir = Path(args.out)
    setup_logging(None)
    networks = load_run(Path(args.runs))
    size = networks["classifier"][1]["config"]["size"]
    cache = load_cache(Path(args.data), size, Path(args.cache_dir))
    split = read_split(Path(args.split))
    report = json.loads(Path(args.report).read_text()) if args.report else None
    cv_report = json.loads(Path(args.cv_report).read_text()) if args.cv_report else None
    if report is None and cv_report is None:
        raise SystemExit("export needs --report (single-split evaluation) or --cv-report (cross-validation), or both")
    if cv_report is not None:
        check_cv_recipe(networks, cv_report)
    thresholds = report["thresholds"] if report else thresholds_from_cv(cv_report)
    # Parity on real slices the model did not train on where there are any (validation), else on training ones.
    parity_images = cache.images[cache.indices_of(split["val"] or split["train"])][: args.parity_slices]
    labels = cache.labels
    data_description = {
        "dataset": "LGG Segmentation Dataset (kaggle_3m layout), TCGA-LGG, manual FLAIR abnormality masks",
        "source": str(args.data),
        "patients": len(set(cache.patients.tolist())),
        "slices": len(labels),
        "tumor_slices": int(labels.sum()),
        "split": "by patient, stratified by tumor burden (split_patients lists each part)",
        "split_patients": split,
        "split_slices": {part: len(cache.indices_of(names)) for part, names in split.items()},
    }
    card = export_models(
        networks,
        out_dir,
        parity_images,
        thresholds,
        data_description,
        metrics=report["metrics"] if report else None,
        cross_validation=cross_validation_section(cv_report) if cv_report else None,
        version=args.version,
    )
    log.info("wrote %s with %s", out_dir / CARD_FILE, ", ".join(m["file"] for m in card["models"].values()))
    return card


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="runs", help="folder with joint/ (or classifier/ and segmenter/) checkpoints")
    parser.add_argument("--report", help="runs/evaluation/report.json from `evaluate`: thresholds and split metrics")
    parser.add_argument(
        "--cv-report",
        help="runs/cv/report.json from `cv`: the card's cross-validation section; thresholds too without --report",
    )
    parser.add_argument("--data", default="../shared/data/lgg")
    parser.add_argument("--split", default="runs/split.json")
    parser.add_argument("--cache-dir", default=".cache")
    parser.add_argument("--out", default="models")
    parser.add_argument("--parity-slices", type=int, default=128, help="validation slices for the ONNX parity check")
    parser.add_argument("--version", help="the card's version (default: today's date, YYYY.MM.DD)")
