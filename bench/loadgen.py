"""HTTP load generator, run in its own processes so the client never shares an interpreter with the server.

`http_load()` (in the benchmark) splits a job's clients over `processes` children (`python -m bench.loadgen`,
the job pickled in a file); each runs its share of the closed loop with httpx on asyncio and prints its raw
records as JSON. The children start their measured phase together at an agreed monotonic time, so one slow
client process never caps the row; the parent merges the records and reports the server's CPU (all its
worker processes) and the clients' CPU over the measured phase. The request bodies are built once by the
parent, so a client's per-request work is only sending bytes and reading the answer.
"""

import asyncio
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import httpx

from bench.common import REPO_ROOT, LoadShape, Record, proc_tree_cpu_seconds, summarize

# Children need this long to import httpx and connect before the agreed start.
START_MARGIN_S = 1.5


@dataclass(frozen=True)
class LoadJob:
    url: str
    bodies: Sequence[tuple[str, bytes]]  # (content type, body), sent round-robin
    slices_per_request: int
    shape: LoadShape
    server_pid: int  # whose CPU time (with its child processes) the summary reports
    timeout_s: float = 120
    processes: int = 1  # load-generator processes sharing the clients
    first_client: int = 0  # set per child: its clients' offset into bodies
    start_at: float = 0.0  # set per child: time.monotonic() at which the warm-up begins


def default_processes(concurrency: int) -> int:
    """One load-generator process per core, at most 8, never more than there are clients."""
    return max(1, min(concurrency, os.cpu_count() or 1, 8))


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
    """This child's share of the closed loop: warm-up from start_at, then the measured phase; raw records."""
    shape = job.shape
    limits = httpx.Limits(max_connections=shape.concurrency, max_keepalive_connections=shape.concurrency)
    # httpx writes a request's headers and body separately; without TCP_NODELAY, Nagle's algorithm holds the body
    # until the server's delayed ACK (40 ms) for every request. curl and browsers set it; so does this client.
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    async with httpx.AsyncClient(transport=transport, timeout=job.timeout_s) as client:

        async def phase(until: float, max_requests: float) -> list[Record]:
            records: list[Record] = []
            begun = 0

            async def one_client(index: int) -> None:
                nonlocal begun
                item = job.first_client + index
                while True:
                    now = time.perf_counter()
                    if item != job.first_client + index and (now >= until or begun >= max_requests):
                        return  # each client sends at least one
                    begun += 1
                    content_type, body = job.bodies[item % len(job.bodies)]
                    try:
                        response = await client.post(job.url, content=body, headers={"content-type": content_type})
                        error = answer_error(response, job.slices_per_request)
                    except (httpx.HTTPError, ValueError) as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    slices = job.slices_per_request if error is None else 0
                    records.append((now, time.perf_counter(), slices, error))
                    item += job.processes * shape.concurrency

            await asyncio.gather(*(one_client(i) for i in range(shape.concurrency)))
            return records

        # perf_counter and monotonic are the same clock on Linux, shared by all processes.
        await asyncio.sleep(max(0.0, job.start_at - time.monotonic()))
        measured_from = job.start_at + shape.warmup_s
        if shape.warmup_s > 0:
            await phase(measured_from, float("inf"))
        await asyncio.sleep(max(0.0, measured_from - time.monotonic()))
        client_cpu = time.process_time()
        records = await phase(time.perf_counter() + shape.duration_s, shape.max_requests)
    return {"records": records, "client_cpu_s": time.process_time() - client_cpu}


def http_load(job: LoadJob) -> dict:
    """Run the job in `processes` children at once and return the merged summary."""
    processes = max(1, min(job.processes, job.shape.concurrency))
    share = [job.shape.concurrency // processes + (i < job.shape.concurrency % processes) for i in range(processes)]
    start_at = time.monotonic() + START_MARGIN_S
    children = []
    jobs_dir = tempfile.TemporaryDirectory(prefix="lgg-loadgen-")
    for index, clients in enumerate(share):
        child_shape = replace(job.shape, concurrency=clients, max_requests=max(1, job.shape.max_requests // processes))
        child = replace(job, shape=child_shape, processes=processes, first_client=sum(share[:index]), start_at=start_at)
        job_file = Path(jobs_dir.name) / f"job-{index}.pickle"
        job_file.write_bytes(pickle.dumps(child))
        command = [sys.executable, "-m", "bench.loadgen", str(job_file)]
        children.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO_ROOT))
    time.sleep(max(0.0, start_at + job.shape.warmup_s - time.monotonic()))
    server_cpu = proc_tree_cpu_seconds(job.server_pid)
    timeout = START_MARGIN_S + job.shape.warmup_s + job.shape.duration_s + 2 * job.timeout_s + 60
    outputs = []
    for process in children:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in children:
                other.kill()
            raise
        if process.returncode != 0:
            raise RuntimeError(f"load generator failed: {stderr.decode()[-2000:]}")
        outputs.append(json.loads(stdout))
    server_cpu = proc_tree_cpu_seconds(job.server_pid) - server_cpu
    jobs_dir.cleanup()
    records = sorted((tuple(r) for output in outputs for r in output["records"]), key=lambda r: r[0])
    started = records[0][0] if records else time.perf_counter()
    client_cpu_s = sum(output["client_cpu_s"] for output in outputs)
    return summarize(records, started, server_cpu) | {
        "client_cpu_s": round(client_cpu_s, 2),
        "client_processes": processes,
        "concurrency": job.shape.concurrency,
    }


def main() -> None:
    job: LoadJob = pickle.loads(Path(sys.argv[1]).read_bytes())
    print(json.dumps(asyncio.run(closed_loop_http(job))))


if __name__ == "__main__":
    main()
