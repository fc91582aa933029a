"""A real `uvicorn app.main:app` process and closed-loop HTTP clients, for the reliability tests and measurements.

Not `--fd` as tests/live_server.py does: an inherited socket keeps Nagle's algorithm on (+40 ms per response),
which would hide the latencies measured here.
"""

import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np

from tests.conftest import REPO_ROOT
from tests.live_server import LiveServer, settings_env, wait_for
from tests.reliability.loadgen import Body, Load, Record
from tests.reliability.malformed import crafted_cases, mutated_cases
from tests.service.conftest import encode, synthetic_slice

START_TIMEOUT_S = 180.0  # a nice 15 training job may hold the CPU
STOP_TIMEOUT_S = 60.0


class Service(LiveServer):
    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def metric(self, sample: str) -> float:
        """One sample of /metrics, e.g. 'lgg_rejected_requests_total' (0 when absent)."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
        return values[0] if values else 0.0


def read_response(connection: socket.socket) -> str:
    """One HTTP/1.1 response read off a raw socket: the head, then Content-Length bytes of body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")]
    while lengths and len(body) < lengths[0] and (chunk := connection.recv(65536)):
        body += chunk
    return (head + b"\r\n\r\n" + body).decode(errors="replace")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def service(log_dir: Path, *uvicorn_args: str, **settings: object) -> Iterator[Service]:
    """The service on a free port, yielded once /readyz answers 200; stopped (SIGTERM, then SIGKILL) at the end."""
    port = free_port()
    log_path = log_dir / f"uvicorn-{port}.log"
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*command, *uvicorn_args], cwd=REPO_ROOT, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT
        )
    server = Service(f"http://127.0.0.1:{port}", process, log_path)
    try:
        wait_for(server, "/readyz", START_TIMEOUT_S)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def multipart(path: str, body: bytes, field: str = "file", content_type: str = "image/png") -> tuple[str, bytes]:
    """(Content-Type, body) of a form with one file, encoded once by httpx so clients only send bytes."""
    request = httpx.Request("POST", "http://x" + path, files={field: ("slice.png", body, content_type)})
    return request.headers["content-type"], request.read()


def slice_upload(seed: int = 0) -> bytes:
    return encode(synthetic_slice(seed=seed))


def prediction_load(url: str, bad: tuple[tuple[str, Body], ...] | None = None, **kwargs: object) -> Load:
    """Single-slice predictions without mask encoding; `bad` (default: a truncated PNG, a 400 by design) are sent
    for bad_share of the requests (a keyword argument of Load, like pause_after_503_s)."""
    path = "/v1/predict?mask_format=none"
    good = slice_upload()
    return Load(url, path, multipart(path, good), bad or ((path, multipart(path, good[:300])),), **kwargs)


def malformed_requests(mutated: int) -> tuple[tuple[str, Body], ...]:
    """Engineer A's malformed corpus (tests/reliability/malformed.py) as ready-to-send requests."""
    requests = []
    for case in [*crafted_cases(), *mutated_cases(mutated, seed=1)]:
        request = httpx.Request("POST", "http://x" + case.route, files=case.multipart())
        requests.append((case.route, (request.headers["content-type"], request.read())))
    return tuple(requests)


def latencies_ms(records: list[Record], q: float, status: int | None) -> float | None:
    """The q-th percentile latency of the records with this status, in ms."""
    chosen = [r[1] for r in records if r[2] == status]
    return round(float(np.percentile(chosen, q)) * 1000, 1) if chosen else None
