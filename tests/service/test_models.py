"""Settings, model card verification and ONNX Runtime session options."""

import json
from pathlib import Path

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.core.onnx_sessions import ModelFolderError, load_models, provider_options, read_model_card
from app.main import create_app


def copy_card(bundled_models_dir: Path, folder: Path, edit: dict | None = None) -> Path:
    """A model folder with the bundled ONNX files (symlinked) and a card changed by `edit`."""
    card = json.loads((bundled_models_dir / "model_card.json").read_text())
    for kind in ("classifier", "segmenter"):
        name = card["models"][kind]["file"]
        (folder / name).symlink_to(bundled_models_dir / name)
        card["models"][kind] |= (edit or {}).get(kind, {})
    (folder / "model_card.json").write_text(json.dumps(card))
    return folder


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
    (tmp_path / "model_card.json").write_text('{"version": "x"}')
    with pytest.raises(ModelFolderError, match="lacks or mistypes a required field"):
        read_model_card(tmp_path)


def test_app_refuses_to_start_on_a_bad_model_folder(bundled_models_dir: Path, tmp_path: Path) -> None:
    folder = copy_card(bundled_models_dir, tmp_path, {"classifier": {"sha256": "f" * 64}})
    app = create_app(Settings(model_dir=folder, providers="CPUExecutionProvider"))
    with pytest.raises(ModelFolderError, match="refusing to serve"), TestClient(app):
        pass


def test_wrong_io_names_in_the_card_refuse(bundled_models_dir: Path, tmp_path: Path) -> None:
    folder = copy_card(bundled_models_dir, tmp_path, {"classifier": {"output": {"name": "logits"}}})
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
    assert settings.provider_list == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.warmup_batch_sizes == [1, 2, 4, 8, 12]
    assert Settings().max_upload_bytes == 20 * 1024 * 1024


def test_auto_providers_keep_the_preferred_order_of_what_is_available() -> None:
    available = ort.get_available_providers()
    taken = Settings(providers="auto").provider_list
    assert set(taken) <= set(available)
    order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert taken == [p for p in order if p in taken]
    assert taken[-1] == "CPUExecutionProvider"


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
