"""/metrics under `uvicorn --workers 2` with PROMETHEUS_MULTIPROC_DIR: every scrape, whichever worker answers
it, sums all workers' values (real uvicorn, real HTTP)."""

import time
from pathlib import Path

import httpx
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from tests.live_server import START_TIMEOUT_S, live_server
from tests.service.conftest import encode, synthetic_slice

REQUESTS = 24
PREDICTIONS = 6
SCRAPES = 8
CAPACITY = 7  # LGG_MAX_IN_FLIGHT_SLICES per worker
MODELS_REQUESTS = 'http_requests_total{handler="/v1/models",method="GET",status="200"}'


def samples(text: str) -> dict[str, float]:
    """'name{label="value",...}' (labels sorted) -> value."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return found


def both_ready(url: str, directory: Path) -> bool:
    """Two workers have made their metrics, and the lowest lgg_ready of the live ones is 1."""
    started = len(list(directory.glob("gauge_livemin_*.db"))) == 2
    return started and samples(httpx.get(f"{url}/metrics", timeout=10).text).get("lgg_ready") == 1


def per_worker_requests(directory: Path) -> list[float]:
    """Each worker's own count of GET /v1/models, read from its file (counter_<pid>.db)."""
    counts = []
    for path in sorted(directory.glob("counter_*.db")):
        for metric in MultiProcessCollector.merge([str(path)]):
            for sample in metric.samples:
                if sample.name == "http_requests_total" and sample.labels.get("handler") == "/v1/models":
                    counts.append(sample.value)
    return counts


def test_two_workers_scrapes_sum_both(tmp_path: Path) -> None:
    directory = tmp_path / "prometheus"  # does not exist yet: the service makes it (an emptyDir /tmp in pods)
    with live_server(
        tmp_path, workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}, warmup_runs=0,
        max_in_flight_slices=CAPACITY,
    ) as server:  # fmt: skip
        body = encode(synthetic_slice())
        # A new connection per request, so the kernel hands them to both workers.
        deadline = time.monotonic() + START_TIMEOUT_S
        while not both_ready(server.url, directory):  # each worker loads its own models
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.2)
        for _ in range(REQUESTS):
            assert httpx.get(f"{server.url}/v1/models", timeout=30).status_code == 200
        for i in range(PREDICTIONS):
            files = {"file": (f"{i}.png", body, "image/png")}
            assert httpx.post(f"{server.url}/v1/predict", files=files, timeout=60).status_code == 200
        scrapes = [samples(httpx.get(f"{server.url}/metrics", timeout=10).text) for _ in range(SCRAPES)]

        served = per_worker_requests(directory)
        assert len(served) == 2 and all(count > 0 for count in served), f"one worker took every request: {served}"
        for scrape in scrapes:
            assert scrape[MODELS_REQUESTS] == REQUESTS
            assert scrape["lgg_slices_processed_total"] == PREDICTIONS
            assert scrape['lgg_inference_batch_size_count{model="classifier"}'] == PREDICTIONS
            assert scrape["lgg_admission_capacity_slices"] == 2 * CAPACITY
            assert scrape["lgg_ready"] == 1
            assert scrape["lgg_in_flight_slices"] == 0
            assert any(name.startswith("lgg_model_info") for name in scrape)
    # Both workers exited cleanly: their live gauges are gone, their counters stay.
    assert not list(directory.glob("gauge_live*.db"))
    assert len(list(directory.glob("counter_*.db"))) == 2


def test_one_process_without_the_directory_keeps_its_own_registry(tmp_path: Path) -> None:
    with live_server(tmp_path, warmup_runs=0) as server:
        httpx.get(f"{server.url}/v1/models", timeout=30)
        scrape = samples(httpx.get(f"{server.url}/metrics", timeout=10).text)
    assert scrape[MODELS_REQUESTS] == 1
    assert "process_cpu_seconds_total" in scrape and "lgg_ready" in scrape
