"""Cost growth: service throughput and memory as batch requests grow, latency as concurrency grows.

    python -m bench.growth            # about 3 minutes on 2 cores
    python -m bench.growth --quick    # smoke run, under a minute; its numbers mean nothing

One service process (app.main, default settings) on loopback, load from a separate process (bench/loadgen.py):
  1. POST /v1/predict/batch with 1, 4, 16, 64, 256 slices per request, one client: slices/s, request
     latency, and the service's peak resident memory while that size ran (sampled every 10 ms).
  2. POST /v1/predict with 1, 4, 16, 32, 64 concurrent clients: slices/s and latency p50/p99.
A cost grows worse than linearly between two neighbouring sizes when log(cost2/cost1) / log(size2/size1)
exceeds 1.15 and the increase is large enough to be more than noise; such steps are flagged.
"""

import math
from collections.abc import Sequence

import httpx

from bench.common import (
    LoadShape,
    RssSampler,
    SliceSet,
    bench_arguments,
    finish_report,
    load_slices,
    multipart_body,
    print_table,
    start_report,
    uvicorn_server,
)
from bench.loadgen import LoadJob, http_load

BATCH_SIZES = [1, 4, 16, 64, 256]
CONCURRENCY = [1, 4, 16, 32, 64]
# 1.0 is linear; the margin absorbs run-to-run noise.
SUPERLINEAR_EXPONENT = 1.15


def batch_bodies(slice_set: SliceSet, size: int, count: int = 4) -> list[tuple[str, bytes]]:
    """`count` different requests of `size` slices each, taken in turn from the slice set."""
    slices = slice_set.slices
    return [
        multipart_body("files", [slices[(start * size + i) % len(slices)] for i in range(size)])
        for start in range(count)
    ]


def growth_flags(label: str, sizes: Sequence[int], costs: Sequence[float | None], min_increase: float) -> list[dict]:
    """Every step between neighbouring sizes whose cost grew faster than the size (and by more than noise)."""
    steps = []
    for i in range(1, len(sizes)):
        (x1, y1), (x2, y2) = (sizes[i - 1], costs[i - 1]), (sizes[i], costs[i])
        if y1 is None or y2 is None or y1 <= 0 or y2 <= 0:
            continue  # no exponent from a zero or missing cost
        exponent = math.log(y2 / y1) / math.log(x2 / x1)
        steps.append(
            {
                "cost": label,
                "from": x1,
                "to": x2,
                "exponent": round(exponent, 2),
                "worse_than_linear": exponent > SUPERLINEAR_EXPONENT and y2 - y1 > min_increase,
            }
        )
    return steps


def main() -> None:
    parser = bench_arguments("growth", __doc__)
    parser.add_argument("--seconds", type=float, default=15, help="measured seconds per row")
    args = parser.parse_args()
    warmup_s, seconds, max_requests = (0.0, 0.5, 64) if args.quick else (2.0, args.seconds, 10_000)

    report = start_report("growth", args.quick)
    slice_set = load_slices(args.data, max(BATCH_SIZES))
    print(f"slices: {slice_set.source}\n")
    single_bodies = [multipart_body("file", [s]) for s in slice_set.slices]
    # No admission bound: this measures how cost grows; shedding beyond the bound is tests/reliability's.
    env = {"LGG_MODEL_DIR": str(args.models), "LGG_LOG_LEVEL": "WARNING", "LGG_MAX_IN_FLIGHT_SLICES": "100000"}
    batch_rows, concurrency_rows = [], []
    with uvicorn_server("growth_service", "app.main:app", env) as server:
        batching = httpx.get(server.url + "/v1/models", timeout=10).json()["batching"]
        idle_rss_mib = round(server.rss_mib(), 1)
        print(f"service: batching {batching}, idle RSS {idle_rss_mib} MiB")
        for size in BATCH_SIZES:
            job = LoadJob(
                server.url + "/v1/predict/batch",
                batch_bodies(slice_set, size),
                size,
                LoadShape(1, warmup_s, seconds, max_requests),
                server.pid,
            )
            with RssSampler(server.pid) as rss:
                result = http_load(job)
            peak = round(rss.peak_kib / 1024, 1)
            memory = {"peak_rss_mib": peak, "rss_above_idle_mib": round(peak - idle_rss_mib, 1)}
            batch_rows.append({"slices_per_request": size, **result, **memory})
            print(f"  batch of {size}: {result['slices_per_s']} slices/s, peak RSS {peak} MiB", flush=True)
        for concurrency in CONCURRENCY:
            job = LoadJob(
                server.url + "/v1/predict",
                single_bodies,
                1,
                LoadShape(concurrency, warmup_s, seconds, max_requests),
                server.pid,
            )
            with RssSampler(server.pid) as rss:
                result = http_load(job)
            concurrency_rows.append({**result, "peak_rss_mib": round(rss.peak_kib / 1024, 1)})
            print(f"  {concurrency} clients: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms", flush=True)

    steps = [
        *growth_flags("batch request latency (p50)", BATCH_SIZES, [r["p50_ms"] for r in batch_rows], 5),
        *growth_flags("peak RSS above idle", BATCH_SIZES, [r["rss_above_idle_mib"] for r in batch_rows], 16),
        *growth_flags("latency p50 vs clients", CONCURRENCY, [r["p50_ms"] for r in concurrency_rows], 5),
        *growth_flags("latency p99 vs clients", CONCURRENCY, [r["p99_ms"] for r in concurrency_rows], 5),
    ]
    flagged = [s for s in steps if s["worse_than_linear"]]
    report |= {
        "slices": {"source": slice_set.source, "count": len(slice_set.slices), "tumor_share": slice_set.tumor_share},
        "service": {"batching": batching, "idle_rss_mib": idle_rss_mib},
        "batch_rows": batch_rows,
        "concurrency_rows": concurrency_rows,
        "growth_steps": steps,
        "worse_than_linear": flagged,
    }

    print()
    print_table(
        batch_rows,
        [
            ("slices_per_request", "slices/request"),
            ("slices_per_s", "slices/s"),
            ("p50_ms", "p50 ms"),
            ("p99_ms", "p99 ms"),
            ("requests", "requests"),
            ("errors", "errors"),
            ("cpu_ms_per_slice", "CPU ms/slice"),
            ("peak_rss_mib", "peak RSS MiB"),
            ("rss_above_idle_mib", "above idle MiB"),
        ],
    )
    print_table(
        concurrency_rows,
        [
            ("concurrency", "clients"),
            ("slices_per_s", "slices/s"),
            ("p50_ms", "p50 ms"),
            ("p95_ms", "p95 ms"),
            ("p99_ms", "p99 ms"),
            ("requests", "requests"),
            ("errors", "errors"),
            ("peak_rss_mib", "peak RSS MiB"),
        ],
    )
    step_columns = [("cost", "cost"), ("from", "from"), ("to", "to"), ("exponent", "exponent")]
    print_table(steps, [*step_columns, ("worse_than_linear", "worse than linear")])
    print("worse than linear: " + ("; ".join(f"{s['cost']} {s['from']}->{s['to']}" for s in flagged) or "nothing"))
    finish_report(report, args.results_dir)


if __name__ == "__main__":
    main()
