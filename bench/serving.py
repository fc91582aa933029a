"""Serving benchmark: the service over HTTP against raw ONNX Runtime, with the real and a null model.

    python -m bench.serving            # about 10 minutes on 2 cores
    python -m bench.serving --quick    # smoke run; its numbers mean nothing
    python -m bench.serving --service-only --routes single --concurrency 16 --batching off on:1 on --hogs 2
                                       # the batcher under CPU contention, side by side

The same slices (real LGG slices in the dataset's tumor proportion; synthetic phantoms when ../shared is
absent) go through, for the real models and a null model (bench/null_model.py: the real shapes, near-zero
compute), on the CPU and, where onnxruntime-gpu finds a GPU, on CUDA:
  (a) raw ONNX Runtime in this process: decode + the service's own Pipeline.predict_batch, one slice per
      call, concurrency emulated by threads; no HTTP. The ceiling at batch 1.
  (b) bench/naive_service.py (real models, CPU only): FastAPI + PyTorch eager, both networks on every slice.
  (c) this service (app.main) under uvicorn with 1..N worker processes, dynamic batching off and on (on:K:
      K batches at once, LGG_BATCH_CONCURRENCY), on the single-slice route at each concurrency and on the
      batch route (--batch-slices per request).
HTTP load comes from several load-generator processes (bench/loadgen.py) so the client is not the limit; the
table gives their CPU. With the null model, the server's CPU per slice is the serving overhead outside the
networks (decoding, preprocessing, HTTP, multipart, JSON, threads): cores / overhead bounds the slices/s any
accelerator can be fed. docs/benchmarks.md has the results and what they show.
"""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from app.core.batching import batch_concurrency
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
from bench.loadgen import LoadJob, default_processes, http_load
from bench.null_model import write_null_models

# The course design (peers.md): a ResNet-50 classifier on every slice at 256x256 and a
# ResUNet 16-32-64-128-256 on the slices with a tumor; forward GFLOPs per slice.
COURSE_CLASSIFIER_GFLOPS = 10.7
COURSE_SEGMENTER_GFLOPS = 3.7
CEILING = "a_onnxruntime_in_process"
NAIVE = "b_naive_fastapi_pytorch"
SERVICE = "c_service"
SERVICE_APP = "app.main:app"
LIMITS = ImageLimits()  # the service's defaults
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider,CPUExecutionProvider"}
# The targets for this service's overhead outside ONNX Runtime (server CPU per slice, null model).
OVERHEAD_TARGET_MS = {"single": 2.0, "batch": 1.0}
COLUMNS = [
    ("system", "system"),
    ("models", "models"),
    ("provider", "EP"),
    ("workers", "workers"),
    ("batching", "batching"),
    ("batch_concurrency", "batches at once"),
    ("route", "route"),
    ("concurrency", "clients"),
    ("slices_per_s", "slices/s"),
    ("x_ceiling", "x (a)"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("errors", "errors"),
    ("cpu_ms_per_slice", "server CPU ms/slice"),
    ("client_cpu_ms_per_slice", "client CPU ms/slice"),
    ("client_processes", "client procs"),
    ("cpu_busy", "CPU busy"),
    ("mean_onnx_batch", "mean batch"),
    ("peak_rss_mib", "peak RSS MiB"),
]


@dataclass(frozen=True)
class ModelSet:
    name: str  # "real" or "null"
    path: Path
    card: ModelCard


def usable_providers(null_dir: Path) -> list[str]:
    """ "cpu", and "cuda" where ONNX Runtime really takes the CUDA EP (not only lists it) for a null model."""
    import onnxruntime as ort

    found = ["cpu"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        try:
            session = ort.InferenceSession(
                str(null_dir / "null_classifier.onnx"), providers=PROVIDERS["cuda"].split(",")
            )
            if session.get_providers()[0] == "CUDAExecutionProvider":
                found.append("cuda")
        except Exception:  # no CUDA libraries or no device (onnxruntime raises untyped errors): CPU rows only
            pass
    return found


def measure_ceiling(slice_set: SliceSet, models: ModelSet, provider: str, shapes: list[LoadShape]) -> tuple:
    """(a): rows per concurrency, and the share of these slices the classifier passes to the segmenter."""
    settings = Settings(model_dir=models.path, providers=PROVIDERS[provider])
    pipeline = Pipeline(load_models(models.card, settings), settings.max_batch_size)
    decoded = [decode_image(s.data, LIMITS, s.content_type) for s in slice_set.slices]
    pass_share = sum(p.classifier_probability >= pipeline.classifier_threshold for p in pipeline.predict_batch(decoded))

    def one_slice(index: int) -> int:
        s = slice_set.slices[index]
        pipeline.predict_batch([decode_image(s.data, LIMITS, s.content_type)])
        return 1

    rows = []
    for shape in shapes:
        result = closed_loop_threads(one_slice, len(slice_set.slices), shape)
        row = {"system": CEILING, "models": models.name, "provider": provider, "route": "in-process"}
        rows.append(row | {"concurrency": shape.concurrency, **result})
        print(
            f"  {CEILING} {models.name} {provider} c={shape.concurrency}: {result['slices_per_s']} slices/s", flush=True
        )
    return rows, pass_share / len(decoded)


def classifier_batches(url: str) -> tuple[float, float]:
    """(slices, calls) of the classifier so far, from the service's lgg_inference_batch_size histogram."""
    totals = {"lgg_inference_batch_size_sum": 0.0, "lgg_inference_batch_size_count": 0.0}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in totals and sample.labels.get("model") == "classifier":
                totals[sample.name] = sample.value
    return totals["lgg_inference_batch_size_sum"], totals["lgg_inference_batch_size_count"]


def batching_concurrency(mode: str) -> str:
    """A --batching mode's LGG_BATCH_CONCURRENCY: "on:K" -> K; "on" -> 0, the service's default."""
    return mode.partition(":")[2] or "0"


def service_env(models: ModelSet, provider: str, workers: int, batching: str, quick: bool) -> dict[str, str]:
    cores = os.cpu_count() or 1
    return ({"LGG_WARMUP_RUNS": "0"} if quick else {}) | {
        "LGG_MODEL_DIR": str(models.path),
        "LGG_PROVIDERS": PROVIDERS[provider],
        "LGG_BATCHING": str(batching != "off").lower(),
        "LGG_BATCH_CONCURRENCY": batching_concurrency(batching),
        # Several workers split the cores between their ONNX Runtime thread pools instead of oversubscribing them.
        "LGG_INTRA_OP_THREADS": str(max(1, cores // workers) if workers > 1 else 0),
        # No admission bound: this measures capacity; shedding beyond the bound is tests/reliability's.
        "LGG_MAX_IN_FLIGHT_SLICES": "100000",
        "LGG_LOG_LEVEL": "WARNING",
    }


def measure_service(
    slice_set: SliceSet, models: ModelSet, provider: str, workers: int, batching: str, shapes: list[LoadShape],
    batch_slices: int, routes: list[str], quick: bool,
) -> list[dict]:  # fmt: skip
    """(c) with one configuration (batching: a --batching mode): the single-slice route at each concurrency,
    then the batch route."""
    singles = [multipart_body("file", [s]) for s in slice_set.slices]
    per_request = min(batch_slices, len(slice_set.slices))
    batches = [
        multipart_body("files", [slice_set.slices[(start + i) % len(slice_set.slices)] for i in range(per_request)])
        for start in range(0, len(slice_set.slices), per_request)
    ]
    top = shapes[-1]
    # The batch route: two requests in flight per worker, so one decodes while the other computes.
    batch_shape = LoadShape(
        2 * workers, top.warmup_s, top.duration_s, max(2 * workers, top.max_requests // per_request)
    )
    runs = [("single", "/v1/predict", singles, 1, shape) for shape in shapes if "single" in routes]
    if "batch" in routes:
        runs.append(("batch", "/v1/predict/batch", batches, per_request, batch_shape))
    config = {"system": SERVICE, "models": models.name, "provider": provider, "workers": workers}
    config["batching"] = batching
    env = service_env(models, provider, workers, batching, quick)
    if batching != "off":  # the count the service will take (same machine, same settings)
        intra_op_threads = int(env["LGG_INTRA_OP_THREADS"])
        concurrency = int(env["LGG_BATCH_CONCURRENCY"])
        settings = Settings(intra_op_threads=intra_op_threads, batch_concurrency=concurrency)
        config["batch_concurrency"] = batch_concurrency(settings, PROVIDERS[provider].split(","))
    rows = []
    metrics_dir = tempfile.TemporaryDirectory(prefix="lgg-bench-metrics-")
    if workers > 1:  # /metrics sums the workers (prometheus_client's multiprocess mode)
        env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir.name
    name = f"service-{models.name}-{provider}-{workers}"
    with metrics_dir, uvicorn_server(name, SERVICE_APP, env, workers=workers) as server:
        # What the server says it serves: the null card's version ends in "-null".
        config["card_version"] = httpx.get(server.url + "/v1/models", timeout=10).json()["card"]["version"]
        for route, path, bodies, slices_per_request, shape in runs:
            before = classifier_batches(server.url)
            processes = default_processes(shape.concurrency)
            result = http_load(
                LoadJob(server.url + path, bodies, slices_per_request, shape, server.pid, processes=processes)
            )
            slices, calls = (a - b for a, b in zip(classifier_batches(server.url), before, strict=True))
            result["mean_onnx_batch"] = round(slices / calls, 2) if calls else None
            rows.append(config | {"route": route, **result})
            label = " ".join(str(v) for v in config.values())
            print(f"  {label} {route} c={shape.concurrency}: {result['slices_per_s']} slices/s", flush=True)
        for row in rows:
            row["peak_rss_mib"] = round(server.peak_rss_mib(), 1)  # the master's; each worker has its own
    return rows


def measure_naive(slice_set: SliceSet, models: ModelSet, shapes: list[LoadShape]) -> list[dict]:
    bodies = [multipart_body("file", [s]) for s in slice_set.slices]
    rows = []
    env = {"LGG_MODEL_DIR": str(models.path)}
    with uvicorn_server(NAIVE, "bench.naive_service:app", env, "/healthz") as server:
        for shape in shapes:
            processes = default_processes(shape.concurrency)
            result = http_load(LoadJob(server.url + "/v1/predict", bodies, 1, shape, server.pid, processes=processes))
            row = {"system": NAIVE, "models": "real", "provider": "cpu", "workers": 1, "route": "single"}
            rows.append(row | result)
            print(f"  {NAIVE} c={shape.concurrency}: {result['slices_per_s']} slices/s", flush=True)
        for row in rows:
            row["peak_rss_mib"] = round(server.peak_rss_mib(), 1)
    return rows


def add_ratios(rows: list[dict]) -> None:
    """x (a): throughput over (a) with the same models and provider at the same concurrency (the batch route:
    at the highest); where the CPU went: server and client CPU per slice and how busy the cores were."""
    ceiling = {(r["models"], r["provider"], r["concurrency"]): r for r in rows if r["system"] == CEILING}
    top = max((r["concurrency"] for r in rows if r["system"] == CEILING), default=0)
    for row in rows:
        concurrency = top if row["route"] == "batch" else row["concurrency"]
        base = ceiling.get((row["models"], row["provider"], concurrency))  # none with --service-only
        if base is not None and base["slices_per_s"]:
            row["x_ceiling"] = round(row["slices_per_s"] / base["slices_per_s"], 3)
        if not row["slices"]:
            continue
        client_cpu_s = row.get("client_cpu_s", 0.0)
        row["client_cpu_ms_per_slice"] = round(1000 * client_cpu_s / row["slices"], 2)
        row["cpu_busy"] = round((row["cpu_s"] + client_cpu_s) / (row["seconds"] * (os.cpu_count() or 1)), 2)


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
    """The issue's targets, on the CPU rows (GPU rows are printed, their targets are read off the table).
    A target whose rows this run did not measure (--service-only, --routes, --batching) is left out."""
    service = [r for r in rows if r["system"] == SERVICE and r["provider"] == "cpu"]
    key = {(r["models"], r["workers"], r["batching"], r["route"], r["concurrency"]): r for r in service}
    singles = [r["concurrency"] for r in service if r["route"] == "single"]
    top = max(singles, default=0)
    worker_counts = sorted({r["workers"] for r in service})
    modes = list(dict.fromkeys(r["batching"] for r in service))
    targets = []
    for workers in worker_counts:
        measured = [r for b in modes if (r := key.get(("real", workers, b, "single", top))) and "x_ceiling" in r]
        if measured:
            best = max(measured, key=lambda r: r["slices_per_s"])
            targets.append(
                {
                    "target": f"real models, {workers} worker(s), batching {best['batching']}: c={top} >= 0.9 x (a)",
                    "value": best["x_ceiling"],
                    "met": best["x_ceiling"] >= 0.9,
                }
            )
        for models in ("real", "null"):
            for concurrency in sorted({c for c in singles if c >= 16}):
                off = key.get((models, workers, "off", "single", concurrency))
                for mode in (m for m in modes if m != "off"):
                    on = key.get((models, workers, mode, "single", concurrency))
                    if off is None or on is None:
                        continue
                    ratio = on["slices_per_s"] / off["slices_per_s"] if off["slices_per_s"] else None
                    targets.append(
                        {
                            "target": f"{models} models, {workers} worker(s), c={concurrency}: batching {mode} >= off",
                            "value": None if ratio is None else round(ratio, 3),
                            "met": on["slices_per_s"] >= off["slices_per_s"],
                        }
                    )
    fewest = worker_counts[0] if worker_counts else 1
    for route, limit in OVERHEAD_TARGET_MS.items():
        concurrency = top if route == "single" else 2 * fewest
        row = key.get(("null", fewest, "off", route, concurrency))
        if row is not None:
            targets.append(
                {
                    "target": f"null model, {fewest} worker(s), {route} route: server CPU <= {limit} ms/slice "
                    "outside ORT",
                    "value": row["cpu_ms_per_slice"],
                    "met": row["cpu_ms_per_slice"] is not None and row["cpu_ms_per_slice"] <= limit,
                }
            )
    naive = next((r for r in rows if r["system"] == NAIVE and r["concurrency"] == top), None)
    real = [r["slices_per_s"] for b in modes if (r := key.get(("real", fewest, b, "single", top)))]
    if naive is not None and naive["slices_per_s"] and real:
        value = round(max(real) / naive["slices_per_s"], 2)
        target = f"real models, {fewest} worker(s): c={top} >= 3 x naive (b)"
        targets.append({"target": target, "value": value, "met": value >= 3})
    if compute:
        share = compute[0]["share_of_course"]
        targets.append(
            {"target": "pipeline compute per slice <= 1/3 of the course design", "value": share, "met": share <= 1 / 3}
        )
    return targets


@contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """`count` busy-looping processes for the duration: a machine others are using, reproducibly. They are
    children of this benchmark, so they share its scheduler autogroup with the server and the load generators."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def batching_mode(value: str) -> str:
    """--batching values: off, on (the service's default concurrency), on:K (K batches at once)."""
    if value in ("off", "on") or (value.startswith("on:") and value[3:].isdigit() and int(value[3:]) > 0):
        return value
    raise ValueError(value)


def default_workers() -> list[int]:
    """1, 2, 4, 8 worker processes, as far as there are cores."""
    return [n for n in (1, 2, 4, 8) if n <= max(2, os.cpu_count() or 1)]


def main() -> None:
    parser = bench_arguments("serving", __doc__)
    parser.add_argument("--concurrency", type=int, nargs="+", help="clients on the single route (1 4 16; quick 1 16)")
    parser.add_argument(
        "--workers", type=int, nargs="+", help="uvicorn worker counts (1 2 4 8 up to the cores; quick 1)"
    )
    parser.add_argument("--batch-slices", type=int, default=64, help="slices per batch-route request")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds per row")
    parser.add_argument(
        "--batching", type=batching_mode, nargs="+", default=["off", "on"],
        help="service configurations: off, on (the default LGG_BATCH_CONCURRENCY), on:K (K batches at once)",
    )  # fmt: skip
    parser.add_argument("--model-sets", nargs="+", choices=["real", "null"], default=["real", "null"])
    parser.add_argument("--routes", nargs="+", choices=["single", "batch"], default=["single", "batch"])
    parser.add_argument("--service-only", action="store_true", help="only (c): no (a), (b) or compute table")
    parser.add_argument("--hogs", type=int, default=0, help="busy-looping processes while (c) is measured")
    args = parser.parse_args()
    count, warmup_s, seconds, max_requests = (32, 0.0, 1.0, 40) if args.quick else (256, 2.0, args.seconds, 100_000)
    concurrency = args.concurrency or ([1, 16] if args.quick else [1, 4, 16])
    args.workers = args.workers or ([1] if args.quick else default_workers())
    shapes = [LoadShape(c, warmup_s, seconds, max_requests) for c in sorted(concurrency)]

    report = start_report("serving", args.quick)
    slice_set = load_slices(args.data, count)
    null_dir = write_null_models(Path(tempfile.mkdtemp(prefix="lgg-null-model-")), args.models)
    atexit.register(shutil.rmtree, null_dir, True)
    model_sets = [
        ModelSet(name, path, read_model_card(path))
        for name, path in (("real", args.models), ("null", null_dir))
        if name in args.model_sets
    ]
    providers = usable_providers(null_dir)
    settings = Settings(model_dir=args.models)
    print(f"slices: {slice_set.source}")
    real_card = read_model_card(args.models)
    print(f"models: {args.models} (card {real_card.version}, input {real_card.input_size}); null: {null_dir}")
    print(f"providers: {', '.join(providers)}; workers {args.workers}; ORT intra-op threads: all cores / workers")
    print(f"service: max batch {settings.max_batch_size}, max wait {settings.max_wait_ms} ms\n")
    report["notes"] += [
        f"slices: {slice_set.source}",
        "(a) = decode + app.core.pipeline.Pipeline.predict_batch on one slice per call, in threads of the "
        "benchmark process; no HTTP, no JSON. x (a): throughput over (a) with the same models and EP at the same "
        "concurrency (batch route: at the highest).",
        "(b) uses random-init weights with the card's architectures: the timing does not depend on weight values.",
        "null models: bench/null_model.py, the real shapes and card, a few element-wise nodes; server CPU per slice "
        "with them is the serving overhead outside ONNX Runtime (decode, preprocess, HTTP, multipart, JSON, threads).",
        "server CPU: all of the service's processes (uvicorn master and workers) over the measured phase, per slice; "
        "client CPU: all load-generator processes, which share the machine's cores with the server; CPU busy: both "
        "over all cores. mean batch: slices per classifier call, over all workers.",
        "batch route: 2 requests in flight per worker, --batch-slices slices each.",
        "batches at once: the batcher's inference threads (LGG_BATCH_CONCURRENCY, or the service's default).",
    ]
    if args.hogs:
        report["notes"].append(f"{args.hogs} busy-looping processes ran while the service rows were measured.")

    rows: list[dict] = []
    pass_share = 0.0
    for provider in providers:
        for models in model_sets:
            if not args.service_only:
                ceiling, share = measure_ceiling(slice_set, models, provider, shapes)
                rows += ceiling
                if models.name == "real" and provider == "cpu":
                    pass_share = share
                    rows += measure_naive(slice_set, models, shapes[:1] if args.quick else shapes)
            with cpu_hogs(args.hogs):
                for workers in sorted(args.workers):
                    for batching in args.batching:
                        config = (provider, workers, batching, shapes, args.batch_slices, args.routes, args.quick)
                        rows += measure_service(slice_set, models, *config)
    add_ratios(rows)
    real = next((m for m in model_sets if m.name == "real"), None)
    with_compute = real is not None and not args.service_only
    compute = compute_per_slice(real.card, pass_share, slice_set.tumor_share) if with_compute else []
    targets = check_targets(rows, compute)
    report |= {
        "slices": {"source": slice_set.source, "count": len(slice_set.slices), "tumor_share": slice_set.tumor_share},
        "models": {
            "dir": str(args.models),
            "card_version": real_card.version,
            "input_size": real_card.input_size,
        },
        "providers": providers,
        "settings": settings.model_dump(mode="json", exclude={"api_key"}),
        "rows": rows,
        "compute_per_slice": compute,
        "targets": targets,
    }

    print()
    print_table(rows, COLUMNS)
    if compute:
        columns = [("design", "design"), ("gflops_per_slice", "GFLOPs/slice"), ("share_of_course", "x course")]
        print_table(compute, columns)
    print_table(targets, [("target", "target"), ("value", "value"), ("met", "met")])
    finish_report(report, args.results_dir)


if __name__ == "__main__":
    main()
