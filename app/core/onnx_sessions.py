"""The verified model folder and one ONNX Runtime session per model.

Startup runs in two steps so a broken model folder stops the process at once while the slow part
(session creation, warm-up) can run after the server answers /healthz:
  read_model_card()  -> validates the card (app/core/model_card.py), checks that its preprocessing is the code's
                        and every file's sha256; raises ModelFolderError
  load_models()      -> providers chosen once (choose_providers), sessions with cold-start-safe options, warm-up

Another backend (e.g. Triton) plugs in beside OnnxModel: anything with `run(images) -> np.ndarray` is a Session.
"""

import ctypes
import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from pydantic import ValidationError

from app.core.config import Settings
from app.core.model_card import CARD_FILE, MODEL_KINDS, ModelCardSchema, preprocessing_mismatches, sha256_of

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
# "auto": best first, each GPU provider only where it can run (see choose_providers).
PREFERRED_PROVIDERS = (TENSORRT, CUDA, CPU)
# onnxruntime-gpu's provider libraries; loading one loads the CUDA / cuDNN / TensorRT libraries it links.
PROVIDER_LIBRARIES = {CUDA: "libonnxruntime_providers_cuda.so", TENSORRT: "libonnxruntime_providers_tensorrt.so"}
SHARED_PROVIDER_LIBRARY = "libonnxruntime_providers_shared.so"
MAX_VALIDATION_ERRORS = 5


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
    """A card that validated against the schema and whose files match it: what the service serves."""

    card: ModelCardSchema
    version: str
    input_size: int
    classifier: ModelSpec
    segmenter: ModelSpec


def validation_message(error: ValidationError) -> str:
    problems = [f"{'.'.join(map(str, e['loc'])) or '(card)'}: {e['msg']}" for e in error.errors()]
    more = len(problems) - MAX_VALIDATION_ERRORS
    return "; ".join(problems[:MAX_VALIDATION_ERRORS]) + (f"; and {more} more" if more > 0 else "")


def read_model_card(model_dir: Path) -> ModelCard:
    """Validate model_card.json, compare its preprocessing with the code's, verify each ONNX file's sha256."""
    card_path = Path(model_dir) / CARD_FILE
    try:
        text = card_path.read_text()
    except FileNotFoundError as error:
        raise ModelFolderError(f"no {CARD_FILE} in model folder {Path(model_dir).resolve()}") from error
    except OSError as error:
        raise ModelFolderError(f"cannot read {card_path}: {error}") from error
    try:
        card = ModelCardSchema.model_validate_json(text)
    except ValidationError as error:
        raise ModelFolderError(
            f"{card_path} does not follow the model card schema: {validation_message(error)}"
        ) from error
    mismatches = preprocessing_mismatches(card)
    if mismatches:
        raise ModelFolderError(
            f"{card_path} was made for another preprocessing than app/core/preprocessing.py applies "
            f"({'; '.join(mismatches)}): its models would get inputs they were not trained on; refusing to serve them"
        )
    specs = {}
    for kind in MODEL_KINDS:
        entry = getattr(card.models, kind)
        spec = specs[kind] = ModelSpec(
            kind=kind,
            path=Path(model_dir) / entry.file,
            sha256=entry.sha256,
            threshold=entry.threshold,
            input_name=entry.input.name,
            output_name=entry.output.name,
        )
        if not spec.path.is_file():
            raise ModelFolderError(f"{kind} model file {spec.path} named in {card_path} does not exist")
        actual = sha256_of(spec.path)
        if actual != spec.sha256:
            raise ModelFolderError(
                f"{spec.path} has sha256 {actual} but {card_path} says {spec.sha256}: "
                "the file was changed or belongs to another export; refusing to serve it"
            )
    return ModelCard(card, card.version, card.input_size, specs["classifier"], specs["segmenter"])


def cuda_device_count() -> tuple[int, str]:
    """CUDA devices the NVIDIA driver shows this process, and in words why there are none."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0, "no NVIDIA driver (libcuda.so.1 not found)"
    status = driver.cuInit(0)
    if status != 0:  # 100: no device (or CUDA_VISIBLE_DEVICES hides them all)
        return 0, f"the NVIDIA driver sees no usable device (cuInit error {status})"
    count = ctypes.c_int(0)
    driver.cuDeviceGetCount(ctypes.byref(count))
    return count.value, f"{count.value} CUDA device(s)"


def provider_library_error(provider: str) -> str | None:
    """Why onnxruntime's library for the provider cannot load here (e.g. a missing libcublas); None if it loads."""
    folder = Path(ort.__file__).parent / "capi"
    try:
        # onnxruntime loads the shared part globally first; the provider library needs its symbols.
        ctypes.CDLL(str(folder / SHARED_PROVIDER_LIBRARY), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(folder / PROVIDER_LIBRARIES[provider]))
    except OSError as error:
        return str(error).removeprefix(f"{folder}/")
    return None


@dataclass(frozen=True)
class ProviderChoice:
    providers: tuple[str, ...]
    reason: str


@functools.cache  # once per process: both sessions, one decision, one log line
def choose_providers(requested: str) -> ProviderChoice:
    """The providers to ask for, best first, ending with the CPU one; and why these.

    "auto" asks for TensorRT or CUDA only when onnxruntime lists it, a CUDA device is visible and its libraries
    load: asking for one that cannot start makes onnxruntime print an error block and fall back anyway.
    """
    if requested.strip().lower() != "auto":
        providers = [p.strip() for p in requested.split(",") if p.strip()]
        return ProviderChoice(tuple(providers), "as listed in LGG_PROVIDERS")
    listed = [p for p in PREFERRED_PROVIDERS if p in ort.get_available_providers() and p != CPU]
    if not listed:
        return ProviderChoice((CPU,), "auto: this onnxruntime build has no GPU provider")
    devices, device_reason = cuda_device_count()
    if devices == 0:
        return ProviderChoice((CPU,), f"auto: onnxruntime lists {', '.join(listed)} but {device_reason}")
    chosen, skipped = [], []
    for provider in listed:
        error = provider_library_error(provider)
        if error is None:
            chosen.append(provider)
        else:
            skipped.append(f"{provider} cannot load ({error})")
    reason = f"auto: {device_reason}" + (f"; {'; '.join(skipped)}" if skipped else "")
    return ProviderChoice((*chosen, CPU), reason)


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
        for name in choose_providers(settings.providers).providers:
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
        log.debug("%s: session with %s in %.2f s", spec.kind, self.providers, time.perf_counter() - started)
        inputs = {i.name: i.shape for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if spec.input_name not in inputs or spec.output_name not in outputs:
            raise ModelFolderError(
                f"{spec.path} has inputs {list(inputs)} and outputs {outputs}, "
                f"the card expects {spec.input_name!r} -> {spec.output_name!r}"
            )
        if inputs[spec.input_name][1:] != [3, input_size, input_size]:
            raise ModelFolderError(
                f"{spec.path} takes {spec.input_name!r} of shape {inputs[spec.input_name]}, "
                f"the card's input size is {input_size} (3 x {input_size} x {input_size})"
            )

    def run(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([self.spec.output_name], {self.spec.input_name: images})[0]


class Session(Protocol):
    """What the pipeline needs of a network: an in-process OnnxModel, or app.core.triton.TritonModel."""

    providers: list[str]

    def run(self, images: np.ndarray) -> np.ndarray: ...


def open_session(spec: ModelSpec, input_size: int, settings: Settings) -> Session:
    if settings.triton_url:
        from app.core.triton import TritonModel  # tritonclient is only imported when a Triton is used

        return TritonModel(spec, settings.triton_url, settings.max_batch_size, settings.triton_timeout_s)
    return OnnxModel(spec, input_size, settings)


@dataclass
class LoadedModels:
    card: ModelCard
    classifier: Session
    segmenter: Session

    @property
    def providers(self) -> dict[str, list[str]]:
        return {"classifier": self.classifier.providers, "segmenter": self.segmenter.providers}


def load_models(card: ModelCard, settings: Settings, cancelled: threading.Event | None = None) -> LoadedModels:
    """Create both sessions and run every warmed batch size `warmup_runs` times (stops early if cancelled)."""
    models = LoadedModels(
        card,
        open_session(card.classifier, card.input_size, settings),
        open_session(card.segmenter, card.input_size, settings),
    )
    choice = choose_providers(settings.providers)
    log.info("providers %s (%s); sessions took %s", ", ".join(choice.providers), choice.reason, models.providers)
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
