"""Graceful shutdown under load: SIGTERM turns /readyz to 503 at once, requests keep being answered through the
drain, requests in flight when the listener closes finish, and the process exits with code 0 in time.

The clients stand for a load balancer's traffic: they stop opening requests once readiness has been 503 for a
while (half the drain period), as a balancer polling /readyz would. A client that keeps opening connections at
the instant the listening socket closes can still be reset by the kernel (documented in docs/limits.md).
"""

import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

from tests.reliability import loadgen
from tests.reliability.harness import prediction_load, service, slice_upload

CLIENTS = 4  # of each kind: single slices (many requests during the drain) and batches
SLICES_PER_REQUEST = 8  # long enough requests that some are in flight when the listener closes
DRAIN_S = 2.0
GRACE_S = 30.0
LOAD_BEFORE_SIGTERM_S = 3.0
LAST_BATCH_SLICES = 64  # sent just before the listener closes: surely still running when it does


def test_sigterm_under_load_drops_nothing_and_exits_0(tmp_path: Path) -> None:
    settings = {"warmup_runs": 0, "max_in_flight_slices": 256, "shutdown_drain_s": DRAIN_S, "shutdown_grace_s": GRACE_S}
    with service(tmp_path, **settings) as server:
        path = "/v1/predict/batch?mask_format=none"
        files = [("files", (f"{i}.png", slice_upload(i), "image/png")) for i in range(SLICES_PER_REQUEST)]
        request = httpx.Request("POST", "http://x" + path, files=files)
        batches = loadgen.Load(server.url, path, (request.headers["content-type"], request.read()))
        start_at = time.monotonic() + loadgen.SPAWN_S
        sigterm_at = start_at + LOAD_BEFORE_SIGTERM_S
        readiness: list[tuple[float, int | str]] = []
        exited: list[float] = []

        def terminate() -> None:
            time.sleep(max(0.0, sigterm_at - time.monotonic()))
            server.process.send_signal(signal.SIGTERM)
            while server.process.poll() is None:
                try:
                    status: int | str = httpx.get(f"{server.url}/readyz", timeout=5).status_code
                except httpx.TransportError as error:
                    status = type(error).__name__
                readiness.append((time.monotonic() - sigterm_at, status))
                time.sleep(0.05)
            exited.append(time.monotonic() - sigterm_at)

        records: list[loadgen.Record] = []

        def send(load: loadgen.Load) -> None:
            records.extend(loadgen.run(load, CLIENTS, LOAD_BEFORE_SIGTERM_S + DRAIN_S / 2, start_at=start_at))

        last: list[tuple[float, float, int]] = []

        files = [("files", (f"{i}.png", slice_upload(i), "image/png")) for i in range(LAST_BATCH_SLICES)]
        last_request = httpx.Request("POST", f"{server.url}{path}", files=files)
        last_request.read()  # encoded now: sending must not wait for it

        def send_last_batch() -> None:
            with httpx.Client(timeout=GRACE_S) as http:
                time.sleep(max(0.0, sigterm_at + DRAIN_S - 0.5 - time.monotonic()))
                started = time.monotonic()
                response = http.send(last_request)
            last.append((started, time.monotonic(), response.status_code))

        threads = [
            threading.Thread(target=terminate),
            threading.Thread(target=send_last_batch),
            threading.Thread(target=send, args=(batches,)),
            threading.Thread(target=send, args=(prediction_load(server.url),)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        server.process.wait(GRACE_S)
        log = server.log()

    assert server.process.returncode == 0, log[-3000:]
    assert exited[0] < DRAIN_S + GRACE_S
    failed = [r for r in records if r[2] != 200]
    assert not failed, failed[:5]
    after_sigterm = [r for r in records if r[0] >= sigterm_at]
    assert after_sigterm, "no request was sent during the drain"
    [(last_started, last_ended, last_status)] = last
    assert last_status == 200
    assert last_started < sigterm_at + DRAIN_S < last_ended, "the last batch was not in flight at the close"
    assert readiness and readiness[0][1] == 503, readiness[:3]
    assert "Traceback" not in log and "Finished server process" in log


def test_sigterm_when_idle_exits_0_after_the_drain(tmp_path: Path) -> None:
    with service(tmp_path, warmup_runs=0, shutdown_drain_s=0.2) as server:
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        try:
            assert server.process.wait(30) == 0
        except subprocess.TimeoutExpired:
            raise AssertionError(server.log()) from None
        assert time.monotonic() - started < 10
