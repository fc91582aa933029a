"""The model card, the ONNX files it names, and one ONNX Runtime session per model.

Startup runs in two steps so a broken model folder stops the process at once while the slow part
(session creation, warm-up) can run after the server answers /healthz:
  read_model_card()  -> checks the card and every file's sha256, raises ModelFolderError
  load_models()      -> sessions with cold-start-safe provider options, then warm-up
"""

import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from app.core.config import Settings

log = logging.getLogger(__name__)

CARD_FILE = "model_card.json"
MODEL_KINDS = ("classifier", "segmenter")


class ModelFolderError(RuntimeError):
    """The model folder cannot be served; the message says what is wrong and where."""


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    path: Path
    sha256: str
    threshold: float
    input_name: str
    output_name: str


@dataclass(frozen=True)
class ModelCard:
    card: dict[str, Any]
    version: str
    input_size: int
    classifier: ModelSpec
    segmenter: ModelSpec


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_model_card(model_dir: Path) -> ModelCard:
    """Parse model_card.json and verify each ONNX file against the sha256 the card records."""
    card_path = Path(model_dir) / CARD_FILE
    try:
        card = json.loads(card_path.read_text())
    except FileNotFoundError as error:
        raise ModelFolderError(f"no {CARD_FILE} in model folder {Path(model_dir).resolve()}") from error
    except (OSError, json.JSONDecodeError) as error:
        raise ModelFolderError(f"cannot read {card_path}: {error}") from error
    try:
        specs = {}
        for kind in MODEL_KINDS:
            entry = card["models"][kind]
            specs[kind] = ModelSpec(
                kind=kind,
                path=Path(model_dir) / entry["file"],
                sha256=entry["sha256"],
                threshold=float(entry["threshold"]),
                input_name=entry["input"]["name"],
                output_name=entry["output"]["name"],
            )
        version, input_size = str(card["version"]), int(card["input"]["size"])
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFolderError(f"{card_path} lacks or mistypes a required field: {error!r}") from error
    for spec in specs.values():
        if not spec.path.is_file():
            raise ModelFolderError(f"{spec.kind} model file {spec.path} named in {card_path} does not exist")
        actual = sha256_of(spec.path)
        if actual != spec.sha256:
            raise ModelFolderError(
                f"{spec.path} has sha256 {actual} but {card_path} says {spec.sha256}: "
                "the file was changed or belongs to another export; refusing to serve it"
            )
    return ModelCard(card, version, input_size, specs["classifier"], specs["segmenter"])


def provider_options(provider: str, settings: Settings) -> dict[str, str]:
    """Options that avoid the known cold-start and memory traps of the GPU providers."""
    if provider == "CUDAExecutionProvider":
        options = {"cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"}
        if settings.cuda_mem_limit_bytes:
            options["gpu_mem_limit"] = str(settings.cuda_mem_limit_bytes)
        return options
    if provider == "TensorrtExecutionProvider":
        settings.trt_cache_dir.mkdir(parents=True, exist_ok=True)
        return {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(settings.trt_cache_dir),
            "trt_timing_cache_enable": "True",
        }
    return {}


def trt_profile_options(spec: ModelSpec, input_size: int, max_batch_size: int) -> dict[str, str]:
    """One TensorRT engine for every batch size 1..max instead of one build per new shape."""
    shape = f"{spec.input_name}:{{}}x3x{input_size}x{input_size}"
    return {
        "trt_profile_min_shapes": shape.format(1),
        "trt_profile_opt_shapes": shape.format(max_batch_size),
        "trt_profile_max_shapes": shape.format(max_batch_size),
    }


class OnnxModel:
    """One ONNX Runtime session; run() takes (N,3,S,S) float32 and returns the card's output."""

    def __init__(self, spec: ModelSpec, input_size: int, settings: Settings) -> None:
        self.spec = spec
        options = ort.SessionOptions()
        options.intra_op_num_threads = settings.intra_op_threads
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.intra_op_spinning else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = []
        for name in settings.provider_list:
            provider = provider_options(name, settings)
            if name == "TensorrtExecutionProvider":
                provider |= trt_profile_options(spec, input_size, settings.max_batch_size)
            providers.append((name, provider))
        started = time.perf_counter()
        try:
            # onnxruntime falls back to the next provider when one cannot load (no GPU, no CUDA libraries).
            self.session = ort.InferenceSession(str(spec.path), sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises its own untyped errors for bad graphs and providers
            raise ModelFolderError(f"ONNX Runtime cannot load {spec.path}: {error}") from error
        self.providers = self.session.get_providers()
        log.info(
            "%s: providers asked %s, taken %s (%.2f s)",
            spec.kind,
            settings.provider_list,
            self.providers,
            time.perf_counter() - started,
        )
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = [o.name for o in self.session.get_outputs()]
        if spec.input_name not in inputs or spec.output_name not in outputs:
            raise ModelFolderError(
                f"{spec.path} has inputs {inputs} and outputs {outputs}, "
                f"the card expects {spec.input_name!r} -> {spec.output_name!r}"
            )

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.spec.output_name], {self.spec.input_name: images})[0]


@dataclass
class LoadedModels:
    card: ModelCard
    classifier: OnnxModel
    segmenter: OnnxModel

    @property
    def providers(self) -> dict[str, list[str]]:
        return {"classifier": self.classifier.providers, "segmenter": self.segmenter.providers}


def load_models(card: ModelCard, settings: Settings, cancelled: threading.Event | None = None) -> LoadedModels:
    """Create both sessions and run every warmed batch size `warmup_runs` times (stops early if cancelled)."""
    models = LoadedModels(
        card,
        OnnxModel(card.classifier, card.input_size, settings),
        OnnxModel(card.segmenter, card.input_size, settings),
    )
    started = time.perf_counter()
    for batch_size in settings.warmup_batch_sizes:
        images = np.zeros((batch_size, 3, card.input_size, card.input_size), np.float32)
        for _ in range(settings.warmup_runs):
            if cancelled is not None and cancelled.is_set():
                return models
            models.classifier.run(images)
            models.segmenter.run(images)
    log.info(
        "warm-up: %d run(s) at batch sizes %s in %.2f s",
        settings.warmup_runs,
        settings.warmup_batch_sizes,
        time.perf_counter() - started,
    )
    return models
