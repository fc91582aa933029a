"""Service settings, read from environment variables prefixed `LGG_` (e.g. `LGG_MODEL_DIR=/models`)."""

import tempfile
from pathlib import Path
from typing import Literal

import onnxruntime as ort
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.admission import default_capacity

MiB = 1024 * 1024


class Settings(BaseSettings):
    # An empty variable (e.g. compose passing `LGG_API_KEY:` through unset) means "not set", not an empty key.
    model_config = SettingsConfigDict(env_prefix="LGG_", frozen=True, env_ignore_empty=True)

    model_dir: Path = Field(Path("models"), description="Folder with model_card.json and the ONNX files it names.")
    providers: str = Field(
        "auto",
        description="Comma-separated ONNX Runtime execution providers, best first, or 'auto': TensorRT -> CUDA -> "
        "CPU, each GPU provider only where a CUDA device is visible and its libraries load "
        "(app/core/onnx_sessions.py choose_providers; one log line says what was chosen and why).",
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per session; 0 = all cores.")
    intra_op_spinning: bool = Field(
        False,
        description="Let ONNX Runtime's idle intra-op threads busy-wait for work. Off: on a small CPU the spinning "
        "threads take cycles from HTTP handling, decoding and the other requests (bench/serving.py measures it).",
    )
    trt_cache_dir: Path = Field(
        Path(tempfile.gettempdir()) / "lgg-trt-engine-cache",
        description="Where TensorRT keeps built engines so a restart skips the build.",
    )
    cuda_mem_limit_bytes: int = Field(0, ge=0, description="CUDA arena limit per session; 0 = no limit.")
    triton_url: str | None = Field(
        None,
        description="host:port of a Triton Inference Server's gRPC endpoint serving the `lgg-tumor triton-export` "
        "repository: the networks run there instead of in-process ONNX Runtime sessions (providers unused).",
    )
    triton_timeout_s: float = Field(30.0, gt=0, description="Deadline of one Triton call (and of the startup checks).")

    batching: bool = Field(
        False,
        description="Gather concurrent slices into ONNX Runtime calls of up to max_batch_size. Off by default: on the "
        "2-core CPU (bench/serving.py, 16 clients) it is level with off (0.92-1.07x), a gain is expected on a GPU.",
    )
    max_batch_size: int = Field(16, ge=1, le=256, description="Most slices per ONNX Runtime call.")
    max_wait_ms: float = Field(
        0.0,
        ge=0,
        le=1000,
        description="How long the batcher waits for more slices. 0 (Triton's default): a lone slice runs at once; "
        "under load batches still form from the slices that arrive while the previous batch runs.",
    )
    batch_concurrency: int = Field(
        0,
        ge=0,
        description="Batches run at once when batching (inference threads, like Triton's instance count). "
        "0: two per core ONNX Runtime uses on the CPU, two on an accelerator or Triton "
        "(app/core/batching.py batch_concurrency).",
    )
    warmup_runs: int = Field(1, ge=0, description="Warm-up inferences per batch size before /readyz says ready.")

    max_upload_bytes: int = Field(20 * MiB, ge=1, description="Largest image file accepted.")
    max_batch_files: int = Field(256, ge=1, description="Most files in one /v1/predict/batch request.")
    max_batch_bytes: int = Field(256 * MiB, ge=1, description="Largest /v1/predict/batch request body.")
    max_pixels: int = Field(4096 * 4096, ge=1, description="Largest image (width x height), checked before decoding.")
    max_side: int = Field(8192, ge=1, description="Longest image side in pixels, checked before decoding.")
    max_aspect_ratio: float = Field(16.0, ge=1, description="Most elongated image (long side / short side) accepted.")
    max_request_pixels: int = Field(
        64 * MiB,
        ge=1,
        description="Decoded pixel values (width x height x samples x frames) one request may hold, all files "
        "together; charged from each file's declared size before it is decoded.",
    )
    decode_workers: int = Field(
        2, ge=1, description="Worker processes decoding compressed DICOM pixel data (a native crash kills one)."
    )
    decode_timeout_s: float = Field(20.0, gt=0, description="Longest decode of one compressed DICOM file.")
    decode_memory_bytes: int = Field(
        1024 * MiB, ge=256 * MiB, description="Address-space limit (RLIMIT_AS) of each DICOM decoder worker."
    )

    max_in_flight_slices: int = Field(
        default_factory=default_capacity,
        ge=1,
        description="Slices admitted at once (decoding, queued or computing); beyond it a fast 503 with Retry-After. "
        "Default: 2 per core this process may use.",
    )
    request_timeout_s: float = Field(
        30.0,
        gt=0,
        description="Time budget of one prediction request, from its headers to its answer (upload, decoding, "
        "models, encoding); beyond it a 504 and the work stops at its next step. Also bounds a DICOM node series.",
    )
    work_niceness: int = Field(
        5,
        ge=0,
        le=19,
        description="How much lower (Linux nice steps) the CPU priority of the threads doing admitted work is than "
        "the event loop's, so refusals (503) and health answers do not wait for the cores (app/core/work_priority.py)"
        "; 0: the same priority.",
    )
    shutdown_drain_s: float = Field(
        3.0,
        ge=0,
        description="After SIGTERM: how long /readyz answers 503 while requests are still served, so load balancers "
        "stop sending before the listening socket closes.",
    )
    shutdown_grace_s: float = Field(
        30.0, ge=0, description="After the drain: how long requests in flight may take to finish before exit."
    )

    api_key: SecretStr | None = Field(None, description="When set, every route but health and metrics requires it.")
    cors_origins: list[str] = Field(
        [],
        description="Origins whose browser pages may call the API (JSON list, e.g. '[\"https://viewer.example\"]'); "
        "empty: no CORS headers, so only same-origin pages can.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"

    # The DICOM node (app/core/dicom_node.py): off unless asked for.
    dicom_node: bool = Field(False, description="Listen as a DICOM AE (C-ECHO, C-STORE of MR images).")
    dicom_ae_title: str = Field("LGG-TUMOR", min_length=1, max_length=16, description="This node's AE title.")
    dicom_host: str = Field("0.0.0.0", description="Address the DICOM node listens on.")
    dicom_port: int = Field(11112, ge=0, le=65535, description="DICOM port; 0 = any free port (tests).")
    dicom_allowed_calling_aes: str = Field(
        "", description="Comma-separated calling AE titles allowed to associate; empty = any (trusted networks only)."
    )
    dicom_destination: str = Field(
        "", description="Where the DICOM SEG goes by C-STORE, as AE_TITLE@host:port (typically the sending PACS)."
    )
    dicom_quiet_s: float = Field(
        10.0, gt=0, description="A series is processed once no new instance of it arrived for this many seconds."
    )
    dicom_spool_dir: Path = Field(
        Path(tempfile.gettempdir()) / "lgg-dicom-spool",
        description="Received instances wait here until their SEG is sent; failed series stay here with the error.",
    )
    dicom_spool_max_bytes: int = Field(
        2048 * MiB, ge=1, description="Spool size cap; beyond it C-STORE answers 'out of resources' (0xA700)."
    )
    dicomweb_allowed_urls: str = Field(
        "", description="Comma-separated DICOMweb URL prefixes /v1/dicomweb may call; empty = any (trusted callers)."
    )

    @property
    def warmup_batch_sizes(self) -> list[int]:
        """Powers of two up to max_batch_size, and max_batch_size itself: each new shape is slow once on GPUs."""
        sizes = {1, self.max_batch_size}
        size = 2
        while size < self.max_batch_size:
            sizes.add(size)
            size *= 2
        return sorted(sizes)

    @field_validator("providers")
    @classmethod
    def known_providers(cls, value: str) -> str:
        """A misspelt name ('cpu') makes ONNX Runtime print an error block and fall back silently: refuse it."""
        if value.strip().lower() == "auto":
            return value
        listed = [p.strip() for p in value.split(",") if p.strip()]
        unknown = [p for p in listed if p not in ort.get_all_providers()]
        if unknown or not listed:
            raise ValueError(
                f"unknown ONNX Runtime execution provider(s) {unknown}: use 'auto' or names such as "
                "TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider"
            )
        return value
