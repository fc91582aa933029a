"""The benchmarks' quick modes run end to end and report every row with throughput and without errors.

Smoke tests of the benchmark machinery (real uvicorn processes, the separate load generator, the JSON);
they assert nothing about speed. Without ../shared the benchmarks fall back to synthetic slices.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow
CEILING = "a_onnxruntime_in_process"
TIMEOUT_S = 600  # serving: 250 s measured with the machine loaded (load average 12); far less when idle


def run_quick(name: str, results_dir: Path, models_dir: Path, *options: str) -> dict:
    if not (models_dir / "model_card.json").is_file():
        pytest.skip(f"no bundled models in {models_dir}")
    command = [sys.executable, "-m", f"bench.{name}", "--quick", "--results-dir", str(results_dir)]
    command += ["--models", str(models_dir), *options]
    # Its own process group: on a timeout the benchmark and the servers it started all go.
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} took more than {TIMEOUT_S} s:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{stdout[-3000:]}\n{stderr[-3000:]}"
    report = json.loads((results_dir / f"{name}-quick.json").read_text())
    assert report["quick"] is True
    return report


def assert_served(row: dict) -> None:
    assert row["errors"] == 0, row["error_examples"]
    assert row["slices_per_s"] > 0
    assert row["requests"] >= row["concurrency"]  # every client finished at least one request
    assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]


def test_serving_quick_reports_every_system_model_and_configuration(tmp_path: Path, bundled_models_dir: Path) -> None:
    # Two uvicorn workers: the --workers path (readiness of every worker, CPU of the whole process tree).
    report = run_quick("serving", tmp_path, bundled_models_dir, "--workers", "2", "--concurrency", "4")
    rows = report["rows"]
    service = [(r["models"], r["workers"], r["batching"], r["route"]) for r in rows if r["system"] == "c_service"]
    assert service == [
        (m, 2, b, route) for m in ("real", "null") for b in ("off", "on") for route in ("single", "batch")
    ]
    others = [(r["system"], r["models"]) for r in rows if r["system"] != "c_service"]
    assert others == [(CEILING, "real"), ("b_naive_fastapi_pytorch", "real"), (CEILING, "null")]
    assert report["providers"][0] == "cpu"
    for row in rows:
        assert_served(row)
        assert row["x_ceiling"] > 0
        assert row["cpu_ms_per_slice"] > 0
        if row["system"] != CEILING:  # HTTP rows: the load generators' CPU is reported
            assert row["client_cpu_ms_per_slice"] > 0 and row["client_processes"] >= 1
    # Each configuration's server served the model set its row names (not a speed comparison: 1 s per row
    # under load once gave the null model's first requests 215 ms of CPU per slice).
    for row in rows:
        if row["system"] == "c_service":
            assert row["card_version"].endswith("-null") == (row["models"] == "null"), row
    deployed, both, course = (r["gflops_per_slice"] for r in report["compute_per_slice"])
    assert 0 < deployed <= both < course
    assert {t["target"] for t in report["targets"]} and all(isinstance(t["met"], bool) for t in report["targets"])


def test_growth_quick_reports_every_batch_size_and_concurrency(tmp_path: Path, bundled_models_dir: Path) -> None:
    report = run_quick("growth", tmp_path, bundled_models_dir)
    assert [r["slices_per_request"] for r in report["batch_rows"]] == [1, 4, 16, 64, 256]
    assert [r["concurrency"] for r in report["concurrency_rows"]] == [1, 4, 16, 32, 64]
    for row in report["batch_rows"]:
        assert_served(row)
        assert row["slices"] >= row["slices_per_request"]
        assert row["peak_rss_mib"] > report["service"]["idle_rss_mib"] / 2
    for row in report["concurrency_rows"]:
        assert_served(row)
    assert all(step["exponent"] is not None for step in report["growth_steps"])


def test_decode_cost_stages_prints_a_cost_for_every_stage(bundled_models_dir: Path) -> None:
    if not (bundled_models_dir / "model_card.json").is_file():
        pytest.skip(f"no bundled models in {bundled_models_dir}")
    command = [sys.executable, "-m", "bench.decode_cost", "--stages", "--slices", "8", "--passes", "1"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split("|")[1:3] for line in result.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    stages = [name.strip() for name, _ in rows]
    assert [s.split(" ")[0] for s in stages[1:]] == [
        "decode",
        "preprocess",
        "null",
        "finish:",
        "encode:",
        "serialize:",
        "**sum**",
    ]
    assert all(float(cost.strip(" *")) > 0 for _, cost in rows[1:])
