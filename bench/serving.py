"""Serving benchmark: the service over HTTP against raw ONNX Runtime and a naive FastAPI + PyTorch service.

    python -m bench.serving            # about 5 minutes on 2 cores
    python -m bench.serving --quick    # smoke run, under a minute; its numbers mean nothing

The same slices (real LGG slices in the dataset's tumor proportion; synthetic phantoms when ../shared is
absent) go through, at each concurrency:
  (a) raw ONNX Runtime in this process: decode + the service's own Pipeline.predict_batch, one slice per
      call, concurrency emulated by threads; no HTTP. The ceiling for this machine.
  (b) bench/naive_service.py in its own uvicorn process: FastAPI + PyTorch eager, both networks on every slice.
  (c) this service (app.main) in its own uvicorn process, dynamic batching off and on (LGG_BATCHING).
HTTP load comes from a separate process (bench/loadgen.py): a closed loop of N clients, bounded in time and
count. Throughput is slices/s; each row also gives its ratio to (a) at the same concurrency. Then the compute
per slice: the pipeline as deployed against both networks on every slice and against the course design.
"""

import os
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.core.codecs import decode_image
from app.core.config import Settings
from app.core.limits import ImageLimits
from app.core.onnx_sessions import ModelCard, load_models, read_model_card
from app.core.pipeline import Pipeline
from bench.common import (
    LoadShape,
    SliceSet,
    bench_arguments,
    closed_loop_threads,
    finish_report,
    load_slices,
    multipart_body,
    print_table,
    start_report,
    uvicorn_server,
)
from bench.loadgen import LoadJob, http_load

# The course design (peers.md): a ResNet-50 classifier on every slice at 256x256 and a
# ResUNet 16-32-64-128-256 on the slices with a tumor; forward GFLOPs per slice.
COURSE_CLASSIFIER_GFLOPS = 10.7
COURSE_SEGMENTER_GFLOPS = 3.7
CEILING = "a_onnxruntime_in_process"
SERVICE_APP = "app.main:app"
SERVICES = [
    # (system, uvicorn app, environment, readiness path)
    ("b_naive_fastapi_pytorch", "bench.naive_service:app", {}, "/healthz"),
    ("c_service_batching_off", SERVICE_APP, {"LGG_BATCHING": "false"}, "/readyz"),
    ("c_service_batching_on", SERVICE_APP, {"LGG_BATCHING": "true"}, "/readyz"),
]
COLUMNS = [
    ("system", "system"),
    ("concurrency", "clients"),
    ("slices_per_s", "slices/s"),
    ("x_ceiling", "x (a)"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
    ("p99_minus_ceiling_ms", "p99 - (a) ms"),
    ("errors", "errors"),
    ("requests", "requests"),
    ("cpu_ms_per_slice", "CPU ms/slice"),
    ("client_cpu_ms_per_slice", "client CPU ms/slice"),
    ("cpu_busy", "CPU busy"),
    ("x_ceiling_at_full_cpu", "x (a) at full CPU"),
    ("mean_onnx_batch", "mean batch"),
    ("peak_rss_mib", "peak RSS MiB"),
]


def measure_ceiling(slice_set: SliceSet, card: ModelCard, settings: Settings, shapes: list[LoadShape]) -> tuple:
    """(a): rows per concurrency, and the share of these slices the classifier passes to the segmenter."""
    pipeline = Pipeline(load_models(card, settings), settings.max_batch_size)
    limits = ImageLimits.from_settings(settings)
    decoded = [decode_image(s.data, limits, s.content_type) for s in slice_set.slices]
    pass_share = sum(p.tumor_detected for p in pipeline.predict_batch(decoded)) / len(decoded)

    def one_slice(index: int) -> int:
        s = slice_set.slices[index]
        pipeline.predict_batch([decode_image(s.data, limits, s.content_type)])
        return 1

    rows = []
    for shape in shapes:
        result = closed_loop_threads(one_slice, len(slice_set.slices), shape)
        rows.append({"system": CEILING, "concurrency": shape.concurrency, **result})
        print(f"  {CEILING} c={shape.concurrency}: {result['slices_per_s']} slices/s", flush=True)
    return rows, pass_share


def classifier_batches(url: str) -> tuple[float, float]:
    """(slices, calls) of the classifier so far, from the service's lgg_inference_batch_size histogram."""
    totals = {"lgg_inference_batch_size_sum": 0.0, "lgg_inference_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("model") == "classifier":
                totals[sample.name] = sample.value
    return totals["lgg_inference_batch_size_sum"], totals["lgg_inference_batch_size_count"]


def measure_services(slice_set: SliceSet, models_dir: Path, shapes: list[LoadShape]) -> list[dict]:
    bodies = [multipart_body("file", [s]) for s in slice_set.slices]
    rows = []
    for system, app, env, ready_path in SERVICES:
        # No admission bound: this measures capacity; shedding beyond the bound is tests/reliability's.
        env = {
            "LGG_MODEL_DIR": str(models_dir),
            "LGG_LOG_LEVEL": "WARNING",
            "LGG_MAX_IN_FLIGHT_SLICES": "100000",
            **env,
        }
        with uvicorn_server(system, app, env, ready_path) as server:
            for shape in shapes:
                before = classifier_batches(server.url) if app == SERVICE_APP else None
                result = http_load(LoadJob(server.url + "/v1/predict", bodies, 1, shape, server.pid))
                if before is not None:  # warm-up included
                    slices, calls = (a - b for a, b in zip(classifier_batches(server.url), before, strict=True))
                    result["mean_onnx_batch"] = round(slices / calls, 2) if calls else None
                rows.append({"system": system, **result})
                print(f"  {system} c={shape.concurrency}: {result['slices_per_s']} slices/s", flush=True)
            for row in rows[-len(shapes) :]:
                row["peak_rss_mib"] = round(server.peak_rss_mib(), 1)
    return rows


def add_ratios(rows: list[dict]) -> None:
    ceiling = {r["concurrency"]: r for r in rows if r["system"] == CEILING}
    for row in rows:
        base = ceiling[row["concurrency"]]
        row["x_ceiling"] = round(row["slices_per_s"] / base["slices_per_s"], 3) if base["slices_per_s"] else None
        both = row["p99_ms"] is not None and base["p99_ms"] is not None
        row["p99_minus_ceiling_ms"] = round(row["p99_ms"] - base["p99_ms"], 2) if both else None
        if not row["slices"] or row["cpu_ms_per_slice"] is None:
            continue
        # Where the time goes: CPU per slice of the server and of the load generator (both on these cores),
        # how busy the cores were, and the ratio to (a) this row would reach with the cores kept busy.
        client_cpu_s = row.get("client_cpu_s", 0.0)
        row["client_cpu_ms_per_slice"] = round(1000 * client_cpu_s / row["slices"], 2)
        row["cpu_busy"] = round((row["cpu_s"] + client_cpu_s) / (row["seconds"] * (os.cpu_count() or 1)), 2)
        per_slice = row["cpu_ms_per_slice"] + row["client_cpu_ms_per_slice"]
        row["x_ceiling_at_full_cpu"] = round(base["cpu_ms_per_slice"] / per_slice, 3)


def compute_per_slice(card: ModelCard, pass_share: float, tumor_share: float) -> list[dict]:
    """Forward GFLOPs per slice, counted on the card's architectures (training.networks.count_gflops)."""
    from training.networks import build_model, count_gflops

    gflops = {}
    for kind in ("classifier", "segmenter"):
        hyperparameters = getattr(card.card.models, kind).training.hyperparameters
        network = build_model(kind, hyperparameters.width, tuple(hyperparameters.blocks))
        gflops[kind] = count_gflops(network, card.input_size)
    course = COURSE_CLASSIFIER_GFLOPS + COURSE_SEGMENTER_GFLOPS * tumor_share
    rows = [
        {
            "design": f"as deployed: classifier on every slice, segmenter on the {pass_share:.1%} it passes",
            "gflops_per_slice": gflops["classifier"] + gflops["segmenter"] * pass_share,
        },
        {"design": "both networks on every slice (the naive baseline)", "gflops_per_slice": sum(gflops.values())},
        {
            "design": f"course design: ResNet-50 at 256 ({COURSE_CLASSIFIER_GFLOPS}) on every slice + "
            f"ResUNet ({COURSE_SEGMENTER_GFLOPS}) on the {tumor_share:.1%} with a tumor",
            "gflops_per_slice": course,
        },
    ]
    for row in rows:
        row["gflops_per_slice"] = round(row["gflops_per_slice"], 3)
        row["share_of_course"] = round(row["gflops_per_slice"] / course, 3)
    rows[0] |= {"classifier_gflops": round(gflops["classifier"], 3), "segmenter_gflops": round(gflops["segmenter"], 3)}
    rows[0] |= {"classifier_pass_share": round(pass_share, 4), "input_size": card.input_size}
    return rows


def check_targets(rows: list[dict], compute: list[dict]) -> list[dict]:
    """The issue's targets, for the service with batching off and on."""
    by_key = {(r["system"], r["concurrency"]): r for r in rows}
    concurrency = max(r["concurrency"] for r in rows)
    targets = []
    for system in ("c_service_batching_off", "c_service_batching_on"):
        top = by_key[(system, concurrency)]
        naive = by_key[("b_naive_fastapi_pytorch", concurrency)]
        x_naive = top["slices_per_s"] / naive["slices_per_s"] if naive["slices_per_s"] else float("inf")
        single = by_key.get((system, 1))
        targets += [
            {
                "target": f"{system}: throughput at c={concurrency} >= 0.9 x (a)",
                "value": top["x_ceiling"],
                "met": top["x_ceiling"] is not None and top["x_ceiling"] >= 0.9,
            },
            {
                "target": f"{system}: throughput at c={concurrency} >= 3 x naive (b)",
                "value": round(x_naive, 2),
                "met": x_naive >= 3,
            },
        ]
        if single is not None:
            targets.append(
                {
                    "target": f"{system}: p99 at c=1 within 10 ms of (a)'s p99",
                    "value": single["p99_minus_ceiling_ms"],
                    "met": single["p99_minus_ceiling_ms"] is not None and single["p99_minus_ceiling_ms"] <= 10,
                }
            )
    share = compute[0]["share_of_course"]
    targets.append(
        {"target": "pipeline compute per slice <= 1/3 of the course design", "value": share, "met": share <= 1 / 3}
    )
    return targets


def main() -> None:
    parser = bench_arguments("serving", __doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per row")
    args = parser.parse_args()
    count, warmup_s, seconds, max_requests = (32, 0.0, 1.0, 40) if args.quick else (256, 2.0, args.seconds, 10_000)
    shapes = [LoadShape(c, warmup_s, seconds, max_requests) for c in args.concurrency]

    report = start_report("serving", args.quick)
    slice_set = load_slices(args.data, count)
    card = read_model_card(args.models)
    settings = Settings(model_dir=args.models)
    print(f"slices: {slice_set.source}")
    threads = settings.intra_op_threads or "all cores"
    print(f"models: {args.models} (card {card.version}, input {card.input_size}); ORT intra-op threads {threads}")
    print(f"service: max batch {settings.max_batch_size}, max wait {settings.max_wait_ms} ms\n")
    report["notes"] += [
        f"slices: {slice_set.source}",
        "(a) = decode + app.core.pipeline.Pipeline.predict_batch on one slice per call, in threads of the "
        "benchmark process; no HTTP, no JSON. Ratios x (a) are at the same concurrency.",
        "(b) uses random-init weights with the card's architectures: the timing does not depend on weight values.",
        "HTTP load comes from a separate process on the same 2 cores: its CPU (client_cpu_s) is taken from "
        "the server, which (a) does not pay.",
        "CPU ms/slice: CPU time of the process doing the work (the server; this process for (a)) per slice; "
        "client CPU: the load generator's; CPU busy: both over all cores; x (a) at full CPU: (a)'s CPU per "
        "slice over this row's server + client CPU per slice, the ratio reachable if the cores were kept busy; "
        "mean batch: slices per classifier call in the service (from its metrics, warm-up included).",
    ]

    rows, pass_share = measure_ceiling(slice_set, card, settings, shapes)
    rows += measure_services(slice_set, args.models, shapes)
    add_ratios(rows)
    compute = compute_per_slice(card, pass_share, slice_set.tumor_share)
    targets = check_targets(rows, compute)
    report |= {
        "slices": {"source": slice_set.source, "count": len(slice_set.slices), "tumor_share": slice_set.tumor_share},
        "models": {"dir": str(args.models), "card_version": card.version, "input_size": card.input_size},
        "settings": settings.model_dump(mode="json", exclude={"api_key"}),
        "rows": rows,
        "compute_per_slice": compute,
        "targets": targets,
    }

    print()
    print_table(rows, COLUMNS)
    print_table(compute, [("design", "design"), ("gflops_per_slice", "GFLOPs/slice"), ("share_of_course", "x course")])
    print_table(targets, [("target", "target"), ("value", "value"), ("met", "met")])
    finish_report(report, args.results_dir)


if __name__ == "__main__":
    main()
