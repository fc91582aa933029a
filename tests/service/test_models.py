"""Settings, the model card's schema and verification, provider choice and ONNX Runtime session options."""

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from app.core import onnx_sessions
from app.core.config import Settings
from app.core.model_card import CARD_FILE, ModelCardSchema, write_card
from app.core.onnx_sessions import (
    CPU,
    CUDA,
    TENSORRT,
    ModelFolderError,
    choose_providers,
    load_models,
    provider_options,
    read_model_card,
)
from app.core.preprocessing import NORMALIZATION
from app.main import create_app


def copy_card(bundled_models_dir: Path, folder: Path, edit: dict | None = None, top: dict | None = None) -> Path:
    """A model folder with the bundled ONNX files (symlinked) and a card changed by `edit` (per model kind) and
    `top` (top-level sections, merged one level deep)."""
    card = json.loads((bundled_models_dir / CARD_FILE).read_text())
    for kind in ("classifier", "segmenter"):
        name = card["models"][kind]["file"]
        (folder / name).symlink_to(bundled_models_dir / name)
        card["models"][kind] |= (edit or {}).get(kind, {})
    for key, value in (top or {}).items():
        card[key] = card[key] | value if isinstance(value, dict) else value
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


@pytest.fixture
def fresh_provider_choice() -> Iterator[None]:
    """choose_providers decides once per process; these tests decide again under their own conditions."""
    choose_providers.cache_clear()
    yield
    choose_providers.cache_clear()


def test_bundled_card_verifies(bundled_models_dir: Path) -> None:
    card = read_model_card(bundled_models_dir)
    assert card.input_size > 0
    assert card.classifier.path.is_file() and card.segmenter.path.is_file()
    assert 0 <= card.classifier.threshold <= 1


def test_checksum_mismatch_refuses_with_a_clear_message(bundled_models_dir: Path, tmp_path: Path) -> None:
    folder = copy_card(bundled_models_dir, tmp_path, {"segmenter": {"sha256": "0" * 64}})
    with pytest.raises(ModelFolderError, match=r"segmenter\.onnx has sha256 [0-9a-f]{64} but .* says 0{64}"):
        read_model_card(folder)


def test_missing_model_file_refuses(bundled_models_dir: Path, tmp_path: Path) -> None:
    folder = copy_card(bundled_models_dir, tmp_path, {"classifier": {"file": "gone.onnx"}})
    with pytest.raises(ModelFolderError, match=r"classifier model file .*gone\.onnx .* does not exist"):
        read_model_card(folder)


def test_missing_or_broken_card_refuses(tmp_path: Path) -> None:
    with pytest.raises(ModelFolderError, match=r"no model_card\.json"):
        read_model_card(tmp_path)
    (tmp_path / CARD_FILE).write_text('{"version": "x"}')
    with pytest.raises(ModelFolderError, match=r"does not follow the model card schema: name: Field required"):
        read_model_card(tmp_path)


def test_the_bundled_card_round_trips_through_the_schema(bundled_models_dir: Path, tmp_path: Path) -> None:
    # Written by the same code export uses: nothing in the file is outside the schema or lost by it.
    card = ModelCardSchema.model_validate_json((bundled_models_dir / CARD_FILE).read_text())
    written = write_card(card, tmp_path)
    assert json.loads(written.read_text()) == json.loads((bundled_models_dir / CARD_FILE).read_text())


@pytest.mark.parametrize(
    ("edit", "top", "message"),
    [
        ({"classifier": {"threshold": -0.1}}, None, r"models\.classifier\.threshold: Input should be greater than"),
        ({"segmenter": {"sha256": "not-a-digest"}}, None, r"models\.segmenter\.sha256: String should match pattern"),
        ({"classifier": {"unknown_key": 1}}, None, r"models\.classifier\.unknown_key: Extra inputs are not permitted"),
        (None, {"input": {"size": 96}}, r"models\.classifier\.input\.shape .* does not match input\.size 96"),
    ],
)
def test_a_card_outside_the_schema_refuses_with_the_key_in_the_message(
    bundled_models_dir: Path, tmp_path: Path, edit: dict | None, top: dict | None, message: str
) -> None:
    with pytest.raises(ModelFolderError, match=message):
        read_model_card(copy_card(bundled_models_dir, tmp_path, edit, top))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("normalization", NORMALIZATION.replace("max(std, 1.0)", "std")),
        ("channel_order", ["FLAIR", "pre-contrast", "post-contrast"]),
        ("preprocessing", "training.dataset.other_preprocessing"),
    ],
)
def test_a_card_made_for_other_preprocessing_refuses(
    bundled_models_dir: Path, tmp_path: Path, field: str, value: object
) -> None:
    folder = copy_card(bundled_models_dir, tmp_path, top={"input": {field: value}})
    with pytest.raises(ModelFolderError, match=rf"another preprocessing .*input\.{field} is .*refusing to serve"):
        read_model_card(folder)


def test_an_onnx_input_of_another_size_than_the_card_refuses(bundled_models_dir: Path, tmp_path: Path) -> None:
    # The card agrees with itself (size 96 everywhere) but the ONNX graphs take 128 x 128.
    card = json.loads((bundled_models_dir / CARD_FILE).read_text())
    edit = {kind: {"input": card["models"][kind]["input"] | {"shape": ["batch", 3, 96, 96]}} for kind in card["models"]}
    folder = copy_card(bundled_models_dir, tmp_path, edit, top={"input": {"size": 96}})
    settings = Settings(model_dir=folder, providers=CPU, warmup_runs=0)
    with pytest.raises(ModelFolderError, match=r"takes 'image' of shape \['batch', 3, 128, 128\], .* input size is 96"):
        load_models(read_model_card(folder), settings)


def test_app_refuses_to_start_on_a_bad_model_folder(bundled_models_dir: Path, tmp_path: Path) -> None:
    folder = copy_card(bundled_models_dir, tmp_path, {"classifier": {"sha256": "f" * 64}})
    app = create_app(Settings(model_dir=folder, providers="CPUExecutionProvider"))
    with pytest.raises(ModelFolderError, match="refusing to serve"), TestClient(app):
        pass


def test_wrong_io_names_in_the_card_refuse(bundled_models_dir: Path, tmp_path: Path) -> None:
    folder = copy_card(
        bundled_models_dir, tmp_path, {"classifier": {"output": {"name": "logits", "shape": ["batch", 1]}}}
    )
    settings = Settings(model_dir=folder, providers="CPUExecutionProvider", warmup_runs=0)
    with pytest.raises(ModelFolderError, match="the card expects 'image' -> 'logits'"):
        load_models(read_model_card(folder), settings)


def test_sessions_report_the_providers_taken(bundled_models_dir: Path) -> None:
    settings = Settings(model_dir=bundled_models_dir, providers="CPUExecutionProvider", warmup_runs=1, max_batch_size=2)
    models = load_models(read_model_card(bundled_models_dir), settings)
    assert models.providers == {"classifier": ["CPUExecutionProvider"], "segmenter": ["CPUExecutionProvider"]}


def test_settings_come_from_lgg_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LGG_MODEL_DIR", "/somewhere/models")
    monkeypatch.setenv("LGG_BATCHING", "false")
    monkeypatch.setenv("LGG_MAX_BATCH_SIZE", "12")
    monkeypatch.setenv("LGG_API_KEY", "s3cret")
    monkeypatch.setenv("LGG_PROVIDERS", "CUDAExecutionProvider, CPUExecutionProvider")
    settings = Settings()
    assert settings.model_dir == Path("/somewhere/models")
    assert settings.batching is False and settings.max_batch_size == 12
    assert settings.api_key is not None and settings.api_key.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    assert settings.providers == "CUDAExecutionProvider, CPUExecutionProvider"
    assert settings.warmup_batch_sizes == [1, 2, 4, 8, 12]
    assert Settings().max_upload_bytes == 20 * 1024 * 1024


def test_listed_providers_are_asked_for_as_listed(fresh_provider_choice: None) -> None:
    choice = choose_providers("CUDAExecutionProvider, CPUExecutionProvider")
    assert choice.providers == (CUDA, CPU) and "LGG_PROVIDERS" in choice.reason


@pytest.mark.parametrize("providers", ["cpu", "CUDAExecutionProvider,CPUExecutonProvider", " , "])
def test_a_misspelt_provider_is_refused_at_start_not_silently_replaced(providers: str) -> None:
    with pytest.raises(ValidationError, match="unknown ONNX Runtime execution provider"):
        Settings(providers=providers)


def test_auto_without_a_cuda_device_asks_for_the_cpu_only(
    monkeypatch: pytest.MonkeyPatch, fresh_provider_choice: None
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(onnx_sessions, "cuda_device_count", lambda: (0, "no NVIDIA driver (libcuda.so.1 not found)"))
    choice = choose_providers("auto")
    assert choice.providers == (CPU,)
    assert choice.reason == (
        "auto: onnxruntime lists TensorrtExecutionProvider, CUDAExecutionProvider "
        "but no NVIDIA driver (libcuda.so.1 not found)"
    )


def test_auto_with_a_device_asks_for_each_gpu_provider_whose_libraries_load(
    monkeypatch: pytest.MonkeyPatch, fresh_provider_choice: None
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: [TENSORRT, CUDA, CPU])
    monkeypatch.setattr(onnx_sessions, "cuda_device_count", lambda: (1, "1 CUDA device(s)"))
    missing = {TENSORRT: "libnvinfer.so.10: cannot open shared object file: No such file or directory"}
    monkeypatch.setattr(onnx_sessions, "provider_library_error", missing.get)
    choice = choose_providers("auto")
    assert choice.providers == (CUDA, CPU)
    assert choice.reason == f"auto: 1 CUDA device(s); {TENSORRT} cannot load ({missing[TENSORRT]})"
    choose_providers.cache_clear()
    monkeypatch.setattr(onnx_sessions, "provider_library_error", lambda provider: None)
    assert choose_providers("auto").providers == (TENSORRT, CUDA, CPU)


def test_provider_libraries_that_cannot_load_say_which_library_is_missing() -> None:
    # Real libraries: onnxruntime-gpu's CUDA provider needs CUDA's own libraries, absent without a CUDA install.
    if CUDA not in ort.get_available_providers():
        pytest.skip("this onnxruntime build has no CUDA provider")
    error = onnx_sessions.provider_library_error(CUDA)
    if error is not None:
        assert "cannot open shared object file" in error and ".so" in error.split(":")[0]


def test_auto_on_this_machine_starts_without_provider_errors(
    bundled_models_dir: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
    fresh_provider_choice: None,
) -> None:
    # On a machine without a usable GPU onnxruntime-gpu prints "EP Error" blocks for every GPU provider asked for.
    settings = Settings(model_dir=bundled_models_dir, providers="auto", warmup_runs=0)
    with caplog.at_level(logging.INFO, logger="app.core.onnx_sessions"):
        models = load_models(read_model_card(bundled_models_dir), settings)
    choice = choose_providers("auto")
    assert "EP Error" not in capfd.readouterr().out
    assert models.providers["classifier"] == list(choice.providers)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("providers ")]
    assert len(lines) == 1 and choice.reason in lines[0]


def test_gpu_provider_options_avoid_cold_start_traps(tmp_path: Path) -> None:
    settings = Settings(trt_cache_dir=tmp_path / "trt", cuda_mem_limit_bytes=2**30)
    cuda = provider_options("CUDAExecutionProvider", settings)
    assert cuda["cudnn_conv_algo_search"] == "HEURISTIC"
    assert cuda["arena_extend_strategy"] == "kSameAsRequested"
    assert cuda["gpu_mem_limit"] == str(2**30)
    trt = provider_options("TensorrtExecutionProvider", settings)
    assert trt["trt_engine_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == str(tmp_path / "trt") and (tmp_path / "trt").is_dir()
    assert provider_options("CPUExecutionProvider", settings) == {}
