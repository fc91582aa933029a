"""The Triton path: the exported model repository checked against Triton's own ModelConfig protobuf, then the
service's Triton session (tritonclient over gRPC) against a real tritonserver (tests/scaleout/triton_server.py:
release 2.51, CPU, the exported configs served with the Python backend running the ONNX files)."""

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from app.core.config import Settings
from app.core.onnx_sessions import ModelCard, ModelFolderError, OnnxModel, sha256_of
from app.core.preprocessing import preprocess_slice
from app.core.triton import (
    CONFIG_FILE,
    MODEL_FILE,
    SHA256_PARAMETER,
    RepositoryOptions,
    TritonModel,
    TritonUnavailable,
    model_name,
)
from tests.conftest import REPO_ROOT
from tests.live_server import live_server, stop
from tests.scaleout.triton_server import free_port, python_backend_repository, running_triton
from tests.service.conftest import encode, synthetic_slice

MAX_BATCH = 16
QUEUE_DELAY_US = 50_000  # long enough that concurrent one-slice requests meet in one batch on a busy 2-core box
SERVED = RepositoryOptions(MAX_BATCH, QUEUE_DELAY_US, instances=1, kind="KIND_CPU")


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, bundled_models_dir: Path) -> Path:
    """Exported by the real command, as a user would."""
    out = tmp_path_factory.mktemp("triton") / "repository"
    command = [sys.executable, "-m", "app.cli", "triton-export", str(out), "--model-dir", str(bundled_models_dir)]
    command += ["--max-batch-size", "32", "--instances", "2"]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(scope="module")
def served_repository(card: ModelCard, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return python_backend_repository(card, tmp_path_factory.mktemp("served"), SERVED)


@pytest.fixture(scope="module")
def triton(served_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_triton(served_repository, tmp_path_factory.mktemp("tritonserver")) as (url, _):
        yield url


def parsed_config(repository: Path, kind: str) -> pb.ModelConfig:
    # Parse (not Merge): an unknown field name or a wrong type fails here, as it would in tritonserver.
    return text_format.Parse((repository / model_name(kind) / CONFIG_FILE).read_text(), pb.ModelConfig())


@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_repository_config_is_a_valid_triton_model_config(repository: Path, card: ModelCard, kind: str) -> None:
    config = parsed_config(repository, kind)
    spec = getattr(card, kind)
    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    assert config.name == model_name(kind) == (repository / model_name(kind)).name  # Triton requires the match
    assert config.backend == "onnxruntime" and config.max_batch_size == 32
    assert config.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, pb.ModelInstanceGroup.KIND_GPU)]
    assert list(config.version_policy.specific.versions) == [1]
    model_file = repository / model_name(kind) / "1" / MODEL_FILE
    assert sha256_of(model_file) == spec.sha256 == config.parameters[SHA256_PARAMETER].string_value
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        # Without the batch axis, which max_batch_size > 0 adds.
        assert [(t.name, list(t.dims)) for t in declared] == [(t.name, t.shape[1:]) for t in actual]
        assert all(t.data_type == pb.TYPE_FP32 for t in declared)
    assert {w.batch_size for w in config.model_warmup} == {1, 32}
    assert all(w.inputs[spec.input_name].zero_data for w in config.model_warmup)


def test_a_misspelled_config_field_is_refused_by_the_protobuf() -> None:
    """The check above would catch what tritonserver refuses: text_format knows Triton's schema."""
    with pytest.raises(text_format.ParseError, match="max_batchsize"):
        text_format.Parse('name: "x" max_batchsize: 8', pb.ModelConfig())


def slices(count: int, size: int) -> np.ndarray:
    return np.stack([preprocess_slice(synthetic_slice(seed=seed), size) for seed in range(count)])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classifier", "segmenter"])
def test_triton_session_answers_like_the_onnx_runtime_session(triton: str, card: ModelCard, kind: str) -> None:
    spec = getattr(card, kind)
    images = slices(5, card.input_size)
    local = OnnxModel(spec, card.input_size, Settings(providers="CPUExecutionProvider")).run(images)
    remote = TritonModel(spec, triton, max_batch_size=MAX_BATCH, timeout_s=30).run(images)
    assert remote.shape == local.shape and remote.dtype == np.float32
    np.testing.assert_allclose(remote, local, rtol=0, atol=1e-5)
    config = grpcclient.InferenceServerClient(triton).get_model_config(model_name(kind)).config
    assert config.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US  # Triton serves what we exported


@pytest.mark.slow
def test_triton_batches_concurrent_requests(triton: str, card: ModelCard) -> None:
    """The exported dynamic_batching at work: concurrent one-slice requests run in fewer model executions."""
    session = TritonModel(card.classifier, triton, max_batch_size=MAX_BATCH, timeout_s=30)
    client = grpcclient.InferenceServerClient(triton)

    def counts() -> tuple[int, int]:
        [stats] = client.get_inference_statistics(model_name("classifier")).model_stats
        return stats.inference_count, stats.execution_count

    images = slices(8, card.input_size)
    before = counts()
    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(lambda i: session.run(images[i : i + 1]), range(8)))
    # Triton counts an execution after its responses are sent: a loaded machine can read the statistics first.
    deadline = time.monotonic() + 30
    while (after := counts())[0] - before[0] < 8 and time.monotonic() < deadline:
        time.sleep(0.1)
    inferences, executions = (a - b for a, b in zip(after, before, strict=True))
    assert inferences == 8 and executions < 8, (inferences, executions)
    assert all(output.shape == (1, 1) for output in outputs)


@pytest.mark.slow
def test_a_batch_triton_refuses_is_triton_unavailable(triton: str, card: ModelCard) -> None:
    session = TritonModel(card.classifier, triton, max_batch_size=MAX_BATCH, timeout_s=30)
    with pytest.raises(TritonUnavailable, match="batch"):
        session.run(slices(MAX_BATCH + 1, card.input_size))


@pytest.mark.slow
def test_triton_session_refuses_another_export(triton: str, card: ModelCard) -> None:
    other = card.classifier.__class__(**(card.classifier.__dict__ | {"sha256": "0" * 64}))
    with pytest.raises(ModelFolderError, match="lgg-tumor triton-export"):
        TritonModel(other, triton, max_batch_size=MAX_BATCH, timeout_s=10)


@pytest.mark.slow
def test_triton_session_refuses_batches_triton_would_refuse(triton: str, card: ModelCard) -> None:
    with pytest.raises(ModelFolderError, match=f"at most {MAX_BATCH}"):
        TritonModel(card.classifier, triton, max_batch_size=MAX_BATCH + 1, timeout_s=10)


def test_unreachable_triton_is_a_clear_error(card: ModelCard) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ModelFolderError, match=f"Triton at {address}"):
        TritonModel(card.classifier, address, max_batch_size=8, timeout_s=2)


@pytest.mark.slow
def test_service_with_triton_url_sends_the_networks_to_triton(
    served_repository: Path, card: ModelCard, tmp_path: Path
) -> None:
    """A real uvicorn with LGG_TRITON_URL answers as in-process ONNX Runtime does, computed by Triton; when Triton
    goes away, a fast 503 that names it, not a 500. Its own Triton: this one is stopped."""
    image = synthetic_slice()
    classifier = OnnxModel(card.classifier, card.input_size, Settings(providers="CPUExecutionProvider"))
    expected = float(classifier.run(preprocess_slice(image, card.input_size)[None])[0, 0])
    files = {"file": ("slice.png", encode(image), "image/png")}
    with (
        running_triton(served_repository, tmp_path) as (url, process),
        live_server(tmp_path, triton_url=url, max_batch_size=MAX_BATCH, warmup_runs=0) as server,
    ):
        [before] = grpcclient.InferenceServerClient(url).get_inference_statistics(model_name("classifier")).model_stats
        response = httpx.post(f"{server.url}/v1/predict", files=files, timeout=60)
        assert response.status_code == 200, response.text
        assert response.json()["tumor_probability"] == pytest.approx(expected, abs=1e-5)
        [after] = grpcclient.InferenceServerClient(url).get_inference_statistics(model_name("classifier")).model_stats
        assert after.inference_count == before.inference_count + 1
        assert url in str(httpx.get(f"{server.url}/v1/models", timeout=10).json())
        stop(process)
        gone = httpx.post(f"{server.url}/v1/predict", files=files, timeout=60)
        assert gone.status_code == 503 and "Triton" in gone.json()["detail"], gone.text
        assert gone.headers["Retry-After"]
