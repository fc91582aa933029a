"""HTTP load generator, run in its own process so the client never shares an interpreter with the server.

`http_load()` (in the benchmark) pickles a job to `python -m bench.loadgen` on stdin; the child runs the
closed loop with httpx on asyncio and prints the summary as JSON. The request bodies are built once by
the parent, so a client's per-request work is only sending bytes and reading the answer.
"""

import asyncio
import json
import pickle
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from bench.common import REPO_ROOT, LoadShape, Record, proc_cpu_seconds, summarize


@dataclass(frozen=True)
class LoadJob:
    url: str
    bodies: Sequence[tuple[str, bytes]]  # (content type, body), sent round-robin
    slices_per_request: int
    shape: LoadShape
    server_pid: int  # whose CPU time the summary reports
    timeout_s: float = 120


def answer_error(response: httpx.Response, slices: int) -> str | None:
    """None for a full, successful answer; otherwise what went wrong (a status, or failed batch items)."""
    if response.status_code != 200:
        return f"HTTP {response.status_code}: {response.text[:120]}"
    body = response.json()
    if "results" in body:  # /v1/predict/batch
        if body.get("failed") or body.get("succeeded") != slices:
            return f"batch: {body.get('succeeded')} of {slices} succeeded"
        return None
    return None if "tumor_detected" in body else f"no tumor_detected in {str(body)[:120]}"


async def closed_loop_http(job: LoadJob) -> dict:
    shape = job.shape
    limits = httpx.Limits(max_connections=shape.concurrency, max_keepalive_connections=shape.concurrency)
    # httpx writes a request's headers and body separately; without TCP_NODELAY, Nagle's algorithm holds the body
    # until the server's delayed ACK (40 ms) for every request. curl and browsers set it; so does this client.
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(transport=transport, timeout=job.timeout_s) as client:

        async def phase(seconds: float, max_requests: float) -> tuple[list[Record], float]:
            records: list[Record] = []
            started = time.perf_counter()
            deadline = started + seconds
            begun = 0

            async def one_client(index: int) -> None:
                nonlocal begun
                item = index
                while True:
                    now = time.perf_counter()
                    if item != index and (now >= deadline or begun >= max_requests):  # each client sends one
                        return
                    begun += 1
                    content_type, body = job.bodies[item % len(job.bodies)]
                    try:
                        response = await client.post(job.url, content=body, headers={"content-type": content_type})
                        error = answer_error(response, job.slices_per_request)
                    except (httpx.HTTPError, ValueError) as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    slices = job.slices_per_request if error is None else 0
                    records.append((now, time.perf_counter(), slices, error))
                    item += shape.concurrency

            await asyncio.gather(*(one_client(i) for i in range(shape.concurrency)))
            return records, started

        if shape.warmup_s > 0:
            await phase(shape.warmup_s, float("inf"))
        server_cpu, client_cpu = proc_cpu_seconds(job.server_pid), time.process_time()
        records, started = await phase(shape.duration_s, shape.max_requests)
        server_cpu = proc_cpu_seconds(job.server_pid) - server_cpu
    summary = summarize(records, started, server_cpu)
    return summary | {"client_cpu_s": round(time.process_time() - client_cpu, 2)}


def http_load(job: LoadJob) -> dict:
    """Run the job in a child process and return its summary."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.loadgen"],
        input=pickle.dumps(job),
        capture_output=True,
        cwd=REPO_ROOT,
        timeout=job.shape.warmup_s + job.shape.duration_s + 2 * job.timeout_s + 60,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"load generator failed: {result.stderr.decode()[-2000:]}")
    return json.loads(result.stdout) | {"concurrency": job.shape.concurrency}


def main() -> None:
    job: LoadJob = pickle.loads(sys.stdin.buffer.read())
    print(json.dumps(asyncio.run(closed_loop_http(job))))


if __name__ == "__main__":
    main()
