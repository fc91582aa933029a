"""A real tritonserver process for the tests: release 2.51, the CPU build inside the nvidia-pytriton wheel.

scripts/test.sh unpacks the wheel into .cache/pytriton without its dependencies and makes the numpy<2 Python
environment its Python backend needs in .cache/triton-python. That build has only Triton's Python backend, so the
exported config.pbtxt is served as written except `backend: "python"`, with triton_onnx_model.py (beside this file)
running each exported model.onnx in ONNX Runtime. Everything else is Triton's own: the KServe v2 gRPC frontend,
model-config checks, version policy, warm-up before ready, dynamic batching, its errors.
"""

import ctypes.util
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from app.core.onnx_sessions import ModelCard
from app.core.triton import RepositoryOptions, write_repository
from tests.conftest import REPO_ROOT
from tests.live_server import stop

PYTRITON = REPO_ROOT / ".cache" / "pytriton"
SERVER = PYTRITON / "pytriton" / "tritonserver"
BACKEND_PYTHON = REPO_ROOT / ".cache" / "triton-python" / "bin"  # numpy<2 and onnxruntime, as PyTriton requires
PYTHON_VERSION = f"{sys.version_info.major}.{sys.version_info.minor}"
STUB = SERVER / "python_backend_stubs" / PYTHON_VERSION / "triton_python_backend_stub"
START_TIMEOUT_S = 120


def skip_without_triton() -> None:
    if not os.access(SERVER / "bin" / "tritonserver", os.X_OK) or not STUB.is_file():
        pytest.skip("no tritonserver binary: scripts/test.sh installs nvidia-pytriton into .cache/pytriton")
    if not (BACKEND_PYTHON / "python").is_file():
        pytest.skip("no Python env for Triton's Python backend: scripts/test.sh makes .cache/triton-python")
    if ctypes.util.find_library(f"python{PYTHON_VERSION}") is None:
        pytest.skip(f"Triton's Python backend stub needs libpython{PYTHON_VERSION}.so")


def python_backend_repository(card: ModelCard, root: Path, options: RepositoryOptions) -> Path:
    """The real export, with the one change this Triton build needs: the Python backend runs the ONNX file."""
    repository = root / "repository"
    for config_path in write_repository(card, repository, options):
        config = text_format.Parse(config_path.read_text(), pb.ModelConfig())
        config.backend = "python"
        config_path.write_text(text_format.MessageToString(config))
        shutil.copyfile(Path(__file__).with_name("triton_onnx_model.py"), config_path.parent / "1" / "model.py")
    return repository


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def server_ready(client: grpcclient.InferenceServerClient) -> bool:
    try:
        return client.is_server_ready(client_timeout=2)
    except Exception:  # refused while it starts: tritonclient raises its own exception type
        return False


@contextmanager
def running_triton(repository: Path, workdir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """("127.0.0.1:PORT", process) once Triton reports ready (models loaded and warmed up); stopped on exit."""
    skip_without_triton()
    backends = workdir / "backends"
    shutil.copytree(SERVER / "backends" / "python", backends / "python", dirs_exist_ok=True)
    shutil.copy2(STUB, backends / "python")
    port = free_port()
    command = [str(SERVER / "bin" / "tritonserver"), f"--model-repository={repository}"]
    command += [f"--backend-directory={backends}", f"--grpc-port={port}"]
    command += ["--allow-http=false", "--allow-metrics=false", "--exit-timeout-secs=5"]
    # As PyTriton runs it: the wheel's libraries on the loader path, and a python with numpy<2 first on PATH, so
    # the backend stub's (isolated) Python finds numpy and onnxruntime there; the stub is built against numpy 1.
    libraries = [str(PYTRITON / "nvidia_pytriton.libs"), os.environ.get("LD_LIBRARY_PATH", "")]
    env = os.environ | {
        "LD_LIBRARY_PATH": os.pathsep.join(filter(None, libraries)),
        "PATH": os.pathsep.join([str(BACKEND_PYTHON), os.environ["PATH"]]),
    }
    log_path = workdir / f"tritonserver-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"127.0.0.1:{port}"
    try:
        client = grpcclient.InferenceServerClient(url)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server_ready(client):
            log_text = log_path.read_text(errors="replace")
            assert process.poll() is None, f"tritonserver exited with {process.returncode}:\n{log_text}"
            assert time.monotonic() < deadline, f"tritonserver not ready in {START_TIMEOUT_S} s:\n{log_text}"
            time.sleep(0.2)
        yield url, process
    finally:
        stop(process)
