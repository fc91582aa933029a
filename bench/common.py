"""What every benchmark shares: the slices it sends, servers it starts, statistics, tables, JSON results."""

import argparse
import io
import itertools
import json
import os
import platform
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO_ROOT.parent / "shared" / "data" / "lgg"
DEFAULT_MODELS = REPO_ROOT / "models"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
T = TypeVar("T")
# ../shared/README.md: 1,062 of the 2,980 slices have a tumor; every slice set keeps this share.
DATASET_TUMOR_SHARE = 1062 / 2980


@dataclass(frozen=True)
class BenchSlice:
    name: str
    data: bytes  # the file as a client would send it
    content_type: str
    has_tumor: bool


@dataclass(frozen=True)
class SliceSet:
    slices: list[BenchSlice]
    source: str  # where they came from, printed with every table

    @property
    def tumor_share(self) -> float:
        return sum(s.has_tumor for s in self.slices) / len(self.slices)


def fill_quota(candidates: Iterable[tuple[T, bool]], count: int, seed: int) -> list[tuple[T, bool]]:
    """The first round(count * DATASET_TUMOR_SHARE) candidates with a tumor and the first others up to count,
    shuffled. Candidates are (item, has_tumor), consumed lazily: only as many are decoded as needed."""
    quota = {True: round(count * DATASET_TUMOR_SHARE), False: count - round(count * DATASET_TUMOR_SHARE)}
    picked: list[tuple[T, bool]] = []
    for item, has_tumor in candidates:
        if quota[has_tumor] > 0:
            quota[has_tumor] -= 1
            picked.append((item, has_tumor))
        if len(picked) == count:
            break
    random.Random(seed).shuffle(picked)
    return picked


def real_slices(data_dir: Path, count: int, seed: int) -> SliceSet:
    from training.dataset import find_slices, read_mask

    records = find_slices(data_dir)
    shuffled = random.Random(seed).sample(records, len(records))
    slices = []
    for record, has_tumor in fill_quota(((r, bool(read_mask(r.mask_path).any())) for r in shuffled), count, seed):
        path = record.image_path
        content_type = Image.MIME.get(Image.registered_extensions().get(path.suffix.lower(), ""), "")
        slices.append(BenchSlice(path.name, path.read_bytes(), content_type or "application/octet-stream", has_tumor))
    source = (
        f"real LGG slices from {data_dir}: {len(slices)} of {len(records)}, "
        f"{sum(s.has_tumor for s in slices)} with tumor, drawn at random"
    )
    return SliceSet(slices, source)


def synthetic_slices(count: int, seed: int) -> SliceSet:
    """Phantoms from training/synthetic.py encoded as lossless WebP, like ../shared/data/lgg."""
    from training.synthetic import make_patient

    def candidates() -> Iterator[tuple[np.ndarray, bool]]:
        for index in itertools.count():
            phantom = make_patient(index, slices=20, seed=seed, tumor=index % 5 != 4)
            yield from zip(phantom.images, phantom.masks.any(axis=(1, 2)).tolist(), strict=True)

    slices = []
    for n, (image, has_tumor) in enumerate(fill_quota(candidates(), count, seed)):
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="WEBP", lossless=True)
        slices.append(BenchSlice(f"synthetic_{n}.webp", buffer.getvalue(), "image/webp", has_tumor))
    source = (
        f"SYNTHETIC phantoms (training/synthetic.py), real data absent: {len(slices)} slices, "
        f"{sum(s.has_tumor for s in slices)} with tumor"
    )
    return SliceSet(slices, source)


def load_slices(data_dir: Path, count: int, seed: int = 0) -> SliceSet:
    """Real slices in the dataset's tumor proportion, or synthetic ones (said so in `source`) without ../shared."""
    if Path(data_dir).is_dir():
        return real_slices(Path(data_dir), count, seed)
    return synthetic_slices(count, seed)


def multipart_body(field: str, slices: Sequence[BenchSlice]) -> tuple[str, bytes]:
    """(content type, body) of a multipart form with one part per slice, built once so clients only send bytes."""
    boundary = secrets.token_hex(16)
    parts = []
    for s in slices:
        header = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{s.name}"\r\n'
            f"Content-Type: {s.content_type}\r\n\r\n"
        )
        parts += [header.encode(), s.data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return f"multipart/form-data; boundary={boundary}", b"".join(parts)


# ---------------------------------------------------------------- processes


def proc_status_kib(pid: int, field: str) -> int:
    """A `VmRSS`/`VmHWM`-style field of /proc/<pid>/status, in KiB (0 if the process is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants alive now (uvicorn --workers: the workers)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (FileNotFoundError, ProcessLookupError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        try:
            total += proc_cpu_seconds(current)
        except (FileNotFoundError, ProcessLookupError):
            continue
        todo += children.get(current, [])
    return total


class RssSampler:
    """Largest resident set size of a process while the `with` block runs, sampled every 10 ms."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self.pid, self.interval_s = pid, interval_s
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Server:
    name: str
    url: str
    process: subprocess.Popen

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss_mib(self) -> float:
        return proc_status_kib(self.pid, "VmRSS") / 1024

    def peak_rss_mib(self) -> float:
        """Peak resident memory since the process started (the kernel's high-water mark)."""
        return proc_status_kib(self.pid, "VmHWM") / 1024


@contextmanager
def uvicorn_server(
    name: str,
    app: str,
    env: dict[str, str] | None = None,
    ready_path: str = "/readyz",
    timeout_s: float = 180,
    workers: int = 1,
) -> Iterator[Server]:
    """`python -m uvicorn <app>` on a free loopback port, yielded once `ready_path` answers 200; always stopped.

    With workers > 1 (`--workers`), each worker loads its own models: ready means 4 x workers answers 200
    in a row, each on a new connection (the kernel hands connections to the workers in turn).

    Not `--fd`: uvicorn takes an inherited socket for a Unix socket and leaves Nagle's algorithm on, which
    adds the 40 ms delayed-ACK stall to every response (measured here: median 45 ms instead of 8 ms).
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log"] + (["--workers", str(workers)] if workers > 1 else [])
    log_file = open(Path(tempfile.gettempdir()) / f"bench-{name}-{port}.log", "w")  # noqa: SIM115  closed below
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=log_file, stderr=subprocess.STDOUT
    )
    server = Server(name, f"http://127.0.0.1:{port}", process)
    try:
        deadline = time.monotonic() + timeout_s
        answered = 0
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}; see {log_file.name}")
            try:
                answered = answered + 1 if httpx.get(server.url + ready_path, timeout=2).status_code == 200 else 0
            except httpx.TransportError:
                answered = 0
            if answered >= (1 if workers == 1 else 4 * workers):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {timeout_s:.0f} s; see {log_file.name}")
            if not answered:
                time.sleep(0.2)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log_file.close()


# ---------------------------------------------------------------- measurement

# One request of a closed-loop run: (start, end) in perf_counter seconds, slices it carried, error or None.
Record = tuple[float, float, int, str | None]


@dataclass(frozen=True)
class LoadShape:
    """A closed loop: `concurrency` clients, each sending its next request as soon as the last one returns.

    Two phases: warm-up (new requests for warmup_s seconds, at least one per client, none if warmup_s is 0;
    not counted), then, once every warm-up request has returned, the measured phase: new requests for
    duration_s seconds or until max_requests have been started, at least one per client.
    """

    concurrency: int
    warmup_s: float
    duration_s: float
    max_requests: int


def summarize(records: Sequence[Record], started: float, cpu_s: float) -> dict:
    """Throughput and latency of one measured phase; cpu_s is the CPU time the serving process spent in it."""
    errors = [r[3] for r in records if r[3] is not None]
    good = [r for r in records if r[3] is None]
    latencies_ms = [(end - start) * 1000 for start, end, _, _ in good]
    span = max((r[1] for r in records), default=started) - started
    slices = sum(r[2] for r in good)

    def percentile(q: float) -> float | None:
        return round(float(np.percentile(latencies_ms, q)), 2) if latencies_ms else None

    return {
        "requests": len(records),
        "slices": slices,
        "seconds": round(span, 3),
        "slices_per_s": round(slices / span, 2) if span > 0 else 0.0,
        "requests_per_s": round(len(good) / span, 2) if span > 0 else 0.0,
        "p50_ms": percentile(50),
        "p95_ms": percentile(95),
        "p99_ms": percentile(99),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "cpu_s": round(cpu_s, 2),
        "cpu_ms_per_slice": round(1000 * cpu_s / slices, 2) if slices else None,
    }


def closed_loop_threads(call: Callable[[int], int], n_items: int, shape: LoadShape) -> dict:
    """The closed loop in threads of this process (for in-process baselines); call(item) returns slices done."""

    def phase(seconds: float, max_requests: float) -> tuple[list[Record], float]:
        records: list[Record] = []
        lock = threading.Lock()
        started = time.perf_counter()
        deadline = started + seconds
        begun = 0

        def client(index: int) -> None:
            nonlocal begun
            item = index
            while True:
                now = time.perf_counter()
                with lock:
                    if item != index and (now >= deadline or begun >= max_requests):  # each client sends one
                        return
                    begun += 1
                error = None
                try:
                    slices = call(item % n_items)
                except Exception as exc:  # counted as an error, like a failed HTTP request
                    slices, error = 0, f"{type(exc).__name__}: {exc}"
                with lock:
                    records.append((now, time.perf_counter(), slices, error))
                item += shape.concurrency

        threads = [threading.Thread(target=client, args=(i,)) for i in range(shape.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return records, started

    if shape.warmup_s > 0:
        phase(shape.warmup_s, float("inf"))
    cpu_before = time.process_time()
    records, started = phase(shape.duration_s, shape.max_requests)
    return summarize(records, started, time.process_time() - cpu_before)


# ---------------------------------------------------------------- reporting


def cpu_contenders(interval_s: float = 0.5) -> list[str]:
    """Other processes using much CPU right now (e.g. a training job), which distort every number here."""
    before = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid = int(stat.parent.name)
            before[pid] = (proc_cpu_seconds(pid), time.monotonic())
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    time.sleep(interval_s)
    busy = []
    for pid, (cpu, read_at) in before.items():
        try:
            # Per process: a starved benchmark may read /proc long after it meant to.
            share = (proc_cpu_seconds(pid) - cpu) / (time.monotonic() - read_at)
            if pid != os.getpid() and share > 0.2:
                command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
                busy.append(f"pid {pid} at {share:.0%} CPU: {command}")
        except (FileNotFoundError, ProcessLookupError, ValueError):
            continue
    return busy


def machine_info() -> dict:
    import onnxruntime

    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    contenders = cpu_contenders()
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "avx512": "avx512f" in flags,
        "amx_or_avx512_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "other_busy_processes": contenders,
    }


def print_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> None:
    """Markdown table of rows; columns are (key, heading)."""

    def cell(value: object) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
        return str(value)

    print("| " + " | ".join(heading for _, heading in columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |")
    print()


def bench_arguments(name: str, doc: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; each adds its own."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run in under a minute (numbers mean nothing)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="kaggle_3m-layout folder")
    parser.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model_card.json and the ONNX files")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where <name>.json is written")
    return parser


def start_report(name: str, quick: bool) -> dict:
    # SIGTERM (a timeout, Ctrl-C in a wrapper) unwinds like an exception, so the servers started here are stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    machine = machine_info()
    report = {
        "benchmark": name,
        "quick": quick,
        "command": " ".join(["python", "-m", f"bench.{name}", *sys.argv[1:]]),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine,
        "notes": [],
    }
    print(f"# bench.{name}{' (QUICK smoke run: not a measurement)' if quick else ''}")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_average_1min']}")
    if machine["other_busy_processes"]:
        warning = "other processes are using the CPU; these numbers are distorted: " + "; ".join(
            machine["other_busy_processes"]
        )
        report["notes"].append(warning)
        print("WARNING: " + warning)
    print()
    return report


def finish_report(report: dict, results_dir: Path) -> Path:
    """Print the notes under the tables and write the JSON (`<name>-quick.json` for smoke runs)."""
    for note in report["notes"]:
        print(f"- {note}")
    report["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    name = report["benchmark"] + ("-quick" if report["quick"] else "")
    path = Path(results_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {path}")
    return path
