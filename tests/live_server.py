"""A real `uvicorn app.main:app` process on 127.0.0.1, for tests that need real HTTP.

    with live_server(tmp_path, model_dir=models, api_key="k", warmup_runs=0) as server:
        httpx.get(f"{server.url}/readyz")

Keyword arguments become LGG_* environment variables (the service's settings); LGG_* variables of the test
run itself are not passed on. The listening socket is bound here, on a free port, and handed to uvicorn with
--fd, so there is no race for the port. Every wait is bounded; the log is kept for failure messages.
"""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx

from tests.conftest import REPO_ROOT

START_TIMEOUT_S = 120.0  # import, checksums, session creation and warm-up, on a loaded 2-core machine
STOP_TIMEOUT_S = 15.0
POLL_S = 0.1


@dataclass
class LiveServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def unused_port_url() -> str:
    """A loopback URL nobody listens on (the port was free a moment ago): for connection-refused cases."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def settings_env(settings: dict[str, object]) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("LGG_")}
    # No drain on SIGTERM (3 s by default): tests stop many servers; tests/reliability tests the drain itself.
    defaults = {"model_dir": REPO_ROOT / "models", "providers": "CPUExecutionProvider", "shutdown_drain_s": 0}
    for name, value in (defaults | settings).items():
        env[f"LGG_{name.upper()}"] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


class Started(Protocol):
    """A server process the tests started: uvicorn (LiveServer), Orthanc, ..."""

    url: str
    process: subprocess.Popen

    def log(self) -> str: ...


def wait_for(server: Started, path: str, timeout_s: float) -> None:
    """Until GET path answers 200; fails early with the log when the process exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.process.args[0]} exited with {server.process.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}{path}", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"GET {path} not 200 after {timeout_s:g} s:\n{server.log()}")
        time.sleep(POLL_S)


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)


@contextmanager
def live_server(
    log_dir: Path, wait_path: str | None = "/readyz", workers: int = 1, env: dict[str, str] | None = None,
    **settings: object,
) -> Iterator[LiveServer]:  # fmt: skip
    """Starts the service (`--workers` when more than 1; env: other variables) and, unless wait_path is None,
    waits until GET wait_path answers 200 (from one worker)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    log_path = log_dir / f"uvicorn-{port}.log"
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--fd", str(listener.fileno())]
    command += ["--workers", str(workers)] if workers > 1 else []
    with log_path.open("wb") as log, listener:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=settings_env(settings) | (env or {}),
            stdout=log,
            stderr=subprocess.STDOUT,
            pass_fds=(listener.fileno(),),
        )
    server = LiveServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        if wait_path is not None:
            wait_for(server, wait_path, START_TIMEOUT_S)
        yield server
    finally:
        stop(process)
