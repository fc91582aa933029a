"""Against a real uvicorn process on 127.0.0.1 with real HTTP: readiness, predictions, batching, API key, limits."""

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import encode, synthetic_slice
from tests.service.test_models import copy_card

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[2]
API_KEY = "live-test-key"
START_TIMEOUT_S = 180  # generous: a nice 15 process gets little CPU while training runs
CONCURRENT_REQUESTS = 50
MAX_UPLOAD_BYTES = 2 * 1024 * 1024


@dataclass
class Server:
    url: str
    readiness: list[int]  # /readyz statuses from the first answer of the process until ready
    log: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_uvicorn(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "wb") as output:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=os.environ | env, stdout=output, stderr=subprocess.STDOUT
        )
    return process, f"http://127.0.0.1:{port}"


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=5)


def metric(text: str, sample: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
    return values[0] if values else 0.0


@pytest.fixture(scope="module")
def server(bundled_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("live") / "uvicorn.log"
    env = {
        "LGG_MODEL_DIR": str(bundled_models_dir),
        "LGG_PROVIDERS": "CPUExecutionProvider",
        "LGG_API_KEY": API_KEY,
        "LGG_BATCHING": "true",
        "LGG_MAX_BATCH_SIZE": "8",
        "LGG_MAX_WAIT_MS": "5",
        "LGG_MAX_UPLOAD_BYTES": str(MAX_UPLOAD_BYTES),
        "LGG_MAX_IN_FLIGHT_SLICES": str(CONCURRENT_REQUESTS),  # all 50 admitted: they must share batches
        "LGG_SHUTDOWN_DRAIN_S": "0",  # stopped at the end: no load balancer to wait for
        # Warm-up (batch sizes 1, 2, 4, 8; 2 runs each: about a second on an idle machine) lasts long enough
        # after the port opens for /readyz to be seen answering 503 first.
        "LGG_WARMUP_RUNS": "2",
    }
    process, url = start_uvicorn(env, log)
    readiness: list[int] = []
    deadline = time.monotonic() + START_TIMEOUT_S
    try:
        with httpx.Client(base_url=url, timeout=5) as http:
            while True:
                assert process.poll() is None, f"uvicorn exited:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"not ready in {START_TIMEOUT_S} s:\n{log.read_text()}"
                with contextlib.suppress(httpx.TransportError):  # not listening yet
                    readiness.append(http.get("/readyz").status_code)
                if readiness and readiness[-1] == 200:
                    break
                time.sleep(0.01)  # fine-grained: warm-up lasts well under a second on a fast machine
        yield Server(url, readiness, log)
    finally:
        stop(process)


def test_ready_only_after_warm_up(server: Server) -> None:
    assert server.readiness[0] == 503, server.readiness
    assert server.readiness[-1] == 200
    assert set(server.readiness) == {503, 200}
    log = server.log.read_text()
    assert "providers CPUExecutionProvider (as listed in LGG_PROVIDERS); sessions took {'classifier': ['CPU" in log
    assert "warm-up: 2 run(s) at batch sizes [1, 2, 4, 8]" in log


def test_single_slice(server: Server) -> None:
    with server.client(headers={"X-API-Key": API_KEY}) as http:
        response = http.post("/v1/predict", files={"file": ("slice.png", encode(synthetic_slice()), "image/png")})
    assert response.status_code == 200
    body = response.json()
    assert body["image_size"] == [256, 256] and 0 <= body["tumor_probability"] <= 1


def test_real_slice_when_present(server: Server, real_data_dir: Path) -> None:
    path = sorted(real_data_dir.glob("*/*_15.webp"))[0]
    with server.client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        response = http.post("/v1/predict", files={"file": (path.name, path.read_bytes(), "image/webp")})
        overlay = http.post("/v1/predict/overlay.png", files={"file": (path.name, path.read_bytes())})
    assert response.status_code == 200 and response.json()["image_size"] == [256, 256]
    assert overlay.status_code == 200 and overlay.content.startswith(b"\x89PNG")


def test_batch_with_one_corrupt_file(server: Server) -> None:
    good = encode(synthetic_slice())
    files = [
        ("files", ("one.png", good, "image/png")),
        ("files", ("corrupt.png", good[: len(good) // 3], "image/png")),
        ("files", ("two.webp", encode(synthetic_slice(seed=3), "WEBP", lossless=True), "image/webp")),
    ]
    with server.client(headers={"X-API-Key": API_KEY}) as http:
        response = http.post("/v1/predict/batch", files=files)
    assert response.status_code == 200
    results = response.json()["results"]
    assert [(r["filename"], r["status_code"]) for r in results] == [
        ("one.png", 200),
        ("corrupt.png", 400),
        ("two.webp", 200),
    ]
    assert "cannot decode this PNG file" in results[1]["detail"]


def test_concurrent_requests_all_succeed_and_share_batches(server: Server) -> None:
    slices = [encode(synthetic_slice(seed=i)) for i in range(CONCURRENT_REQUESTS)]
    bucket = 'lgg_inference_batch_size_bucket{le="1.0",model="classifier"}'
    count = 'lgg_inference_batch_size_count{model="classifier"}'
    total = 'lgg_inference_batch_size_sum{model="classifier"}'

    async def send_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=CONCURRENT_REQUESTS)
        async with httpx.AsyncClient(
            base_url=server.url, timeout=60, limits=limits, headers={"X-API-Key": API_KEY}
        ) as http:
            return await asyncio.gather(
                *(http.post("/v1/predict", files={"file": (f"{i}.png", data)}) for i, data in enumerate(slices))
            )

    with server.client() as http:
        before = http.get("/metrics").text
        responses = asyncio.run(send_all())
        after = http.get("/metrics").text
    assert [r.status_code for r in responses] == [200] * CONCURRENT_REQUESTS
    batches = metric(after, count) - metric(before, count)
    batches_of_one = metric(after, bucket) - metric(before, bucket)
    assert metric(after, total) - metric(before, total) == CONCURRENT_REQUESTS
    assert batches < CONCURRENT_REQUESTS, "every request ran alone"
    assert batches - batches_of_one > 0, "no batch held more than one slice"
    assert max(r.json()["timings"]["batch_size"] for r in responses) > 1


def test_api_key_over_http(server: Server) -> None:
    files = {"file": ("slice.png", encode(synthetic_slice()), "image/png")}
    with server.client() as http:
        assert http.post("/v1/predict", files=files).status_code == 401
        wrong = http.post("/v1/predict", files=files, headers={"X-API-Key": "nope"})
        assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/v1/models", headers={"X-API-Key": API_KEY}).status_code == 200
        for route in ("/healthz", "/readyz", "/metrics"):
            assert http.get(route).status_code == 200, route


def test_oversized_upload_is_413_over_http(server: Server) -> None:
    with server.client(headers={"X-API-Key": API_KEY}) as http:
        response = http.post("/v1/predict", files={"file": ("big.png", b"\0" * (MAX_UPLOAD_BYTES + 200_000))})
        assert response.status_code == 413
        assert "larger than the limit" in response.json()["detail"]
        assert http.get("/healthz").status_code == 200


def test_no_request_ended_in_a_server_error(server: Server) -> None:
    """Runs last in this module: any 500 or traceback during the tests above fails here."""
    with server.client() as http:
        text = http.get("/metrics").text
    assert 'status="500"' not in text
    assert "Traceback" not in server.log.read_text()


def test_refuses_to_start_on_a_tampered_model(bundled_models_dir: Path, tmp_path: Path) -> None:
    folder = copy_card(bundled_models_dir, tmp_path, {"classifier": {"sha256": "0" * 64}})
    process, _ = start_uvicorn({"LGG_MODEL_DIR": str(folder)}, tmp_path / "uvicorn.log")
    try:
        assert process.wait(timeout=START_TIMEOUT_S) != 0
    finally:
        if process.poll() is None:
            stop(process)
    log = (tmp_path / "uvicorn.log").read_text()
    assert "classifier.onnx has sha256" in log and "refusing to serve it" in log
