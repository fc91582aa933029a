"""Closed-loop HTTP load from several processes, with blocking sockets: cheap enough per request that the
client does not become the bottleneck it is on a 2-core machine with one asyncio client (measured: a curl probe
saw 5 ms 503s while an httpx client with 64 coroutines recorded seconds). Standard library only, so the spawned
workers start fast.

Each record: (start, latency_s, status, retry_after, error). status None means no HTTP answer: error says
whether the connection was refused (never accepted) or broke after the request was sent (dropped).
"""

import http.client
import os
import random
import socket
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from urllib.parse import urlsplit

REFUSED = "refused"  # no connection: the listener is closed; the request was never accepted
DROPPED = "dropped"  # connected and sent, but no answer: a lost request
CLIENTS_PER_PROCESS = 8
SPAWN_S = 3.0  # a spawned Python worker starts in well under a second on an idle machine

Record = tuple[float, float, int | None, str | None, str | None]
Body = tuple[str, bytes]  # (content type, body)


@dataclass(frozen=True)
class Load:
    url: str
    path: str
    good: Body  # a multipart form, sent to `path`
    bad: tuple[tuple[str, Body], ...] = ()  # (path, body): bad_share of the requests are one of these, at random
    bad_share: float = 0.0
    headers: tuple[tuple[str, str], ...] = ()
    pause_after_503_s: float = 0.0
    timeout_s: float = 60.0


def _connect(load: Load) -> http.client.HTTPConnection:
    parts = urlsplit(load.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=load.timeout_s)
    connection.connect()
    connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return connection


def _client(load: Load, seed: int, deadline: float, stop_on_refused: bool, out: list[Record]) -> None:
    rng = random.Random(seed)
    connection: http.client.HTTPConnection | None = None
    while time.monotonic() < deadline:
        path, (content_type, body) = (
            rng.choice(load.bad)
            if load.bad and rng.random() < load.bad_share
            else (
                load.path,
                load.good,
            )
        )
        started = time.monotonic()
        try:
            connection = connection or _connect(load)
        except ConnectionRefusedError:
            out.append((started, time.monotonic() - started, None, None, REFUSED))
            if stop_on_refused:
                return
            time.sleep(0.05)
            continue
        try:
            connection.request("POST", path, body, {"Content-Type": content_type, **dict(load.headers)})
            response = connection.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as error:
            out.append((started, time.monotonic() - started, None, None, f"{DROPPED}: {type(error).__name__}"))
            connection.close()
            connection = None
            continue
        out.append((started, time.monotonic() - started, response.status, response.getheader("retry-after"), None))
        if response.will_close:
            connection.close()
            connection = None
        if response.status == 503 and load.pause_after_503_s:
            time.sleep(load.pause_after_503_s)
    if connection is not None:
        connection.close()


def _process(
    load: Load, first_seed: int, clients: int, start_at: float, deadline: float, stop_on_refused: bool
) -> list[Record]:
    time.sleep(max(0.0, start_at - time.monotonic()))
    out: list[Record] = []
    threads = [
        threading.Thread(target=_client, args=(load, first_seed + i, deadline, stop_on_refused, out))
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return out


def run(
    load: Load, clients: int, duration_s: float, stop_on_refused: bool = False, start_at: float | None = None
) -> list[Record]:
    """`clients` closed-loop clients sending from start_at (time.monotonic, comparable across processes; default:
    once the worker processes have started) for duration_s seconds."""
    processes = max(1, min(os.cpu_count() or 1, -(-clients // CLIENTS_PER_PROCESS)))
    shares = [clients // processes + (i < clients % processes) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        start_at = start_at or time.monotonic() + SPAWN_S  # every worker process started before the first request
        deadline = start_at + duration_s
        futures = [
            pool.submit(_process, load, sum(shares[:i]), share, start_at, deadline, stop_on_refused)
            for i, share in enumerate(shares)
        ]
        return [record for future in futures for record in future.result()]
