"""The Triton path: the exported model repository checked against Triton's own ModelConfig protobuf, and the
service's Triton session (tritonclient over gRPC) against a fake Triton (tests/scaleout/fake_triton.py) that runs
the exported ONNX files in ONNX Runtime. No real Triton can run here: no Triton binaries, no Docker engine."""

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from app.core.config import Settings
from app.core.onnx_sessions import ModelCard, ModelFolderError, OnnxModel, sha256_of
from app.core.preprocessing import preprocess_slice
from app.core.triton import CONFIG_FILE, MODEL_FILE, SHA256_PARAMETER, TritonModel, model_name
from tests.conftest import REPO_ROOT
from tests.live_server import live_server
from tests.scaleout.fake_triton import RunningFake, fake_triton
from tests.service.conftest import encode, synthetic_slice

MAX_BATCH = 32


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, bundled_models_dir: Path) -> Path:
    """Exported by the real command, as a user would."""
    out = tmp_path_factory.mktemp("triton") / "repository"
    command = [sys.executable, "-m", "app.cli", "triton-export", str(out), "--model-dir", str(bundled_models_dir)]
    command += ["--max-batch-size", str(MAX_BATCH), "--instances", "2"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def triton(repository: Path) -> Iterator[RunningFake]:
    with fake_triton(repository) as running:
        yield running


def parsed_config(repository: Path, kind: str) -> pb.ModelConfig:
    # Parse (not Merge): an unknown field name or a wrong type fails here, as it would in tritonserver.
    return text_format.Parse((repository / model_name(kind) / CONFIG_FILE).read_text(), pb.ModelConfig())


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_repository_config_is_a_valid_triton_model_config(repository: Path, card: ModelCard, kind: str) -> None:
    config = parsed_config(repository, kind)
    spec = getattr(card, kind)
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    assert config.name == model_name(kind) == (repository / model_name(kind)).name  # Triton requires the match
    assert config.backend == "onnxruntime" and config.max_batch_size == MAX_BATCH
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, pb.ModelInstanceGroup.KIND_GPU)]
    assert list(config.version_policy.specific.versions) == [1]
    model_file = repository / model_name(kind) / "1" / MODEL_FILE
    assert sha256_of(model_file) == spec.sha256 == config.parameters[SHA256_PARAMETER].string_value
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        # Without the batch axis, which max_batch_size > 0 adds.
        assert [(t.name, list(t.dims)) for t in declared] == [(t.name, t.shape[1:]) for t in actual]
        assert all(t.data_type == pb.TYPE_FP32 for t in declared)
    assert {w.batch_size for w in config.model_warmup} == {1, MAX_BATCH}
    assert all(w.inputs[spec.input_name].zero_data for w in config.model_warmup)


def test_a_misspelled_config_field_is_refused_by_the_protobuf() -> None:
    """The check above would catch what tritonserver refuses: text_format knows Triton's schema."""
    with pytest.raises(text_format.ParseError, match="max_batchsize"):
        text_format.Parse('name: "x" max_batchsize: 8', pb.ModelConfig())


def real_slices(count: int) -> np.ndarray:
    return np.stack([preprocess_slice(synthetic_slice(seed=seed), 128) for seed in range(count)])


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_triton_session_answers_like_the_onnx_runtime_session(triton: RunningFake, card: ModelCard, kind: str) -> None:
    url, servicer = triton.url, triton.servicer
    spec = getattr(card, kind)
    images = real_slices(5)
    local = OnnxModel(spec, card.input_size, Settings(providers="CPUExecutionProvider")).run(images)
    before = servicer.infer_requests[model_name(kind)]
    remote = TritonModel(spec, url, max_batch_size=MAX_BATCH, timeout_s=10).run(images)
    assert servicer.infer_requests[model_name(kind)] == before + 1
    assert remote.shape == local.shape and remote.dtype == np.float32
    np.testing.assert_allclose(remote, local, rtol=0, atol=1e-5)


def test_triton_session_refuses_another_export(triton: RunningFake, card: ModelCard) -> None:
    url = triton.url
    other = card.classifier.__class__(**(card.classifier.__dict__ | {"sha256": "0" * 64}))
    with pytest.raises(ModelFolderError, match="lgg-tumor triton-export"):
        TritonModel(other, url, max_batch_size=MAX_BATCH, timeout_s=10)


def test_triton_session_refuses_batches_triton_would_refuse(triton: RunningFake, card: ModelCard) -> None:
    url = triton.url
    with pytest.raises(ModelFolderError, match=f"at most {MAX_BATCH}"):
        TritonModel(card.classifier, url, max_batch_size=MAX_BATCH + 1, timeout_s=10)


def test_unreachable_triton_is_a_clear_error(card: ModelCard, unused_grpc_address: str) -> None:
    with pytest.raises(ModelFolderError, match=f"Triton at {unused_grpc_address}"):
        TritonModel(card.classifier, unused_grpc_address, max_batch_size=8, timeout_s=2)


@pytest.fixture
def unused_grpc_address() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


@pytest.mark.slow
def test_service_with_triton_url_sends_the_networks_to_triton(repository: Path, tmp_path: Path) -> None:
    """A real uvicorn with LGG_TRITON_URL answers as in-process ONNX Runtime does, computed by the (fake) Triton;
    when Triton goes away, a fast 503 that names it, not a 500."""
    files = {"file": ("slice.png", encode(synthetic_slice()), "image/png")}
    with live_server(tmp_path, warmup_runs=1, max_batch_size=8) as server:
        in_process = httpx.post(f"{server.url}/v1/predict", files=files, timeout=60).json()
    with fake_triton(repository) as triton, live_server(tmp_path, triton_url=triton.url, max_batch_size=8) as server:
        classifier_calls = triton.servicer.infer_requests[model_name("classifier")]
        response = httpx.post(f"{server.url}/v1/predict", files=files, timeout=60)
        assert response.status_code == 200, response.text
        assert triton.servicer.infer_requests[model_name("classifier")] == classifier_calls + 1
        assert triton.url in str(httpx.get(f"{server.url}/v1/models", timeout=10).json())
        with_triton = response.json()
        triton.server.stop(grace=None)
        gone = httpx.post(f"{server.url}/v1/predict", files=files, timeout=60)
        assert gone.status_code == 503 and "Triton" in gone.json()["detail"], gone.text
        assert gone.headers["Retry-After"]
    assert with_triton["tumor_probability"] == pytest.approx(in_process["tumor_probability"], abs=1e-5)
    assert with_triton["tumor_detected"] == in_process["tumor_detected"]
