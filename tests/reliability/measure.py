"""The reliability figures of issue 12, measured against a real uvicorn (tables on stdout, JSON with --json):

    python -m tests.reliability.measure overload [--seconds 30]   # 1, bound and 64 clients at the default bound
    python -m tests.reliability.measure soak [--seconds 300]      # 8 clients, 10% bad input, RSS every 5 s

For timing, pause other CPU users first (the brief's CV job: kill -STOP / -CONT).
"""

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from tests.reliability import loadgen
from tests.reliability.harness import Service, latencies_ms, malformed_requests, prediction_load, service

OVERLOAD_CLIENTS = 64
SOAK_CLIENTS = 8
SOAK_BAD_SHARE = 0.10  # drawn from the malformed corpus: crafted cases and SOAK_MUTATED mutations
SOAK_MUTATED = 300
RSS_EVERY_S = 5.0
WARM_UP_S = 60.0  # the soak target counts growth after the first minute


def counts(records: list[loadgen.Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for record in records:
        key = str(record[2]) if record[2] is not None else (record[4] or "error").split(":")[0]
        out[key] = out.get(key, 0) + 1
    return out


def overload(seconds: float) -> list[dict]:
    """Rows: 1 client, `bound` clients, then 64 clients that wait the Retry-After (1 s) after a 503, as the
    header asks, and 64 that retry at once (a storm: every refusal costs the server and the client CPU)."""
    rows = []
    with service(Path(tempfile.mkdtemp()), "--no-access-log") as server:
        bound = int(server.metric("lgg_admission_capacity_slices"))
        for clients, pause_s in ((1, 0.0), (bound, 0.0), (OVERLOAD_CLIENTS, 1.0), (OVERLOAD_CLIENTS, 0.0)):
            records = loadgen.run(prediction_load(server.url, pause_after_503_s=pause_s), clients, seconds)
            rows.append(
                {
                    "clients": clients,
                    "bound": bound,
                    "after_503": f"wait {pause_s:g} s",
                    "answers": counts(records),
                    "accepted_p50_ms": latencies_ms(records, 50, 200),
                    "accepted_p99_ms": latencies_ms(records, 99, 200),
                    "rejected_p50_ms": latencies_ms(records, 50, 503),
                    "rejected_p99_ms": latencies_ms(records, 99, 503),
                    "rejected_max_ms": latencies_ms(records, 100, 503),
                }
            )
            print(rows[-1], flush=True)
    at_bound = rows[1]["accepted_p99_ms"]
    for row in rows[2:]:
        print(f"\n{row['clients']} clients, {row['after_503']} after a 503:")
        accepted, rejected = row["accepted_p99_ms"], row["rejected_p99_ms"]
        print(f"  target accepted p99 < 2 x p99 at the bound ({at_bound} ms): {accepted} ms, ", end="")
        print("met" if accepted < 2 * at_bound else "MISSED")
        print(f"  target 503 p99 < 50 ms: {rejected} ms, {'met' if rejected and rejected < 50 else 'MISSED'}")
    return rows


def soak(seconds: float) -> dict:
    samples: list[tuple[float, float]] = []
    with service(Path(tempfile.mkdtemp()), "--no-access-log") as server:
        done = threading.Event()
        started = time.monotonic()

        def sample(server: Service) -> None:
            while not done.wait(RSS_EVERY_S):
                samples.append((round(time.monotonic() - started), round(server.rss_mib(), 1)))
                print(f"  {samples[-1][0]:>5} s  RSS {samples[-1][1]} MiB", flush=True)

        idle = round(server.rss_mib(), 1)
        sampler = threading.Thread(target=sample, args=(server,))
        sampler.start()
        try:
            bad = malformed_requests(SOAK_MUTATED)
            load = prediction_load(server.url, bad, bad_share=SOAK_BAD_SHARE, pause_after_503_s=1.0)
            records = loadgen.run(load, SOAK_CLIENTS, seconds)
        finally:
            done.set()
            sampler.join()
        server_errors = int(sum(v for k, v in counts(records).items() if k.startswith("5") and k != "503"))
    after_warm_up = next((rss for t, rss in samples if t >= WARM_UP_S), samples[0][1])
    end = samples[-1][1]
    result = {
        "seconds": seconds,
        "requests": len(records),
        "answers": counts(records),
        "server_errors": server_errors,
        "p99_ms": latencies_ms(records, 99, 200),
        "rss_idle_mib": idle,
        "rss_at_1_min_mib": after_warm_up,
        "rss_end_mib": end,
        "rss_max_mib": max(rss for _, rss in samples),
        "growth_after_1_min": round(end / after_warm_up - 1, 4),
    }
    print(json.dumps(result, indent=1))
    print(f"target: RSS growth after the first minute < 10%: {result['growth_after_1_min']:.1%}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["overload", "soak"])
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    figures = overload(args.seconds or 30) if args.what == "overload" else soak(args.seconds or 300)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
