"""The per-request time budget (LGG_REQUEST_TIMEOUT_S) against a real uvicorn: a request past its budget gets a 504
at the deadline, its work stops at the next step (between slices or inference batches), its admission stays taken
until that work has really ended, and the service keeps serving.

The slow work is real: a model folder whose classifier spins for seconds on any slice that is not blank (a Loop
of matrix products in the ONNX graph), so one inference batch lasts several budgets; blank slices run at once.
"""

import gzip
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.core.onnx_sessions import CARD_FILE, sha256_of
from bench.null_model import write_null_models
from tests.reliability.harness import Service, service
from tests.service.conftest import encode, synthetic_slice

pytestmark = pytest.mark.slow

BUDGET_S = 1.0
MARGIN_S = 1.0  # the 504 is sent by the event loop at the deadline, whatever the work's thread is doing
MAX_BATCH_SIZE = 4
SLICES = 6  # per multi-slice request: two inference batches, of which only the first may run
SPIN_ITERATIONS = 12_000  # ~4-5 s per classifier call on the 2-core machine (256 x 256 products)
SPIN_SIDE = 256


def spinning(model: onnx.ModelProto, iterations: int) -> onnx.ModelProto:
    """The model with `iterations` chained matrix products added to its output (times 0) when its input is not
    all zeros (a blank slice's z-scores are): outputs unchanged, any real slice takes seconds."""
    graph = model.graph
    input_name, output_name = graph.input[0].name, graph.output[0].name
    for node in graph.node:
        node.output[:] = ["unspun" if name == output_name else name for name in node.output]
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["condition"], ["condition_out"]),
            helper.make_node("MatMul", ["state", "weights"], ["product"]),
            helper.make_node("Tanh", ["product"], ["state_out"]),
        ],
        "spin",
        [
            helper.make_tensor_value_info("iteration", TensorProto.INT64, []),
            helper.make_tensor_value_info("condition", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state", TensorProto.FLOAT, [SPIN_SIDE, SPIN_SIDE]),
        ],
        [
            helper.make_tensor_value_info("condition_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("state_out", TensorProto.FLOAT, [SPIN_SIDE, SPIN_SIDE]),
        ],
        [numpy_helper.from_array(np.full((SPIN_SIDE, SPIN_SIDE), 0.01, np.float32), "weights")],
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMax", [input_name], ["spin_peak"], keepdims=0),
            helper.make_node("Greater", ["spin_peak", "half"], ["not_blank"]),
            helper.make_node("Cast", ["not_blank"], ["spins"], to=TensorProto.INT64),
            helper.make_node("Mul", ["spins", "iterations"], ["trips"]),
            helper.make_node("Loop", ["trips", "", "start"], ["end"], body=body),
            helper.make_node("ReduceMax", ["end"], ["spun"], keepdims=0),
            helper.make_node("Mul", ["spun", "zero"], ["nothing"]),
            helper.make_node("Add", ["unspun", "nothing"], [output_name]),
        ]
    )
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array(0.5, np.float32), "half"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(iterations, np.int64), "iterations"),
            numpy_helper.from_array(np.full((SPIN_SIDE, SPIN_SIDE), 0.01, np.float32), "start"),
        ]
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def slow_models(folder: Path) -> Path:
    """bench/null_model.py's folder (the real card's shapes) with a classifier that spins on non-blank slices."""
    write_null_models(folder)
    card = json.loads((folder / CARD_FILE).read_text())
    entry = card["models"]["classifier"]
    path = folder / entry["file"]
    onnx.save(spinning(onnx.load(path), SPIN_ITERATIONS), path)
    entry["sha256"] = sha256_of(path)
    (folder / CARD_FILE).write_text(json.dumps(card))
    return folder


@contextmanager
def silent_pacs() -> Iterator[dict[str, str]]:
    """A DICOMweb request body for a PACS that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        yield {
            "dicomweb_url": f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web",
            "study_instance_uid": "1.2.3",
            "series_instance_uid": "1.2.3.4",
        }


@pytest.fixture(scope="module")
def slow_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return slow_models(tmp_path_factory.mktemp("slow-models"))


@pytest.fixture(scope="module", params=[False, True], ids=["direct", "batching"])
def server(
    request: pytest.FixtureRequest, slow_models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    with service(
        tmp_path_factory.mktemp("deadline"),
        "--no-access-log",
        model_dir=slow_models_dir,
        request_timeout_s=BUDGET_S,
        max_batch_size=MAX_BATCH_SIZE,
        max_in_flight_slices=64,  # every request here admitted at once
        intra_op_threads=1,
        batching=request.param,
    ) as running:
        yield running


def png_files(field: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [(field, (f"slice_{i}.png", encode(synthetic_slice(seed=i)), "image/png")) for i in range(SLICES)]


def nifti_file() -> list[tuple[str, tuple[str, bytes, str]]]:
    volume = np.stack([synthetic_slice(seed=i)[..., 1] for i in range(SLICES)], axis=-1)
    data = gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes())
    return [("files", ("flair.nii.gz", data, "application/gzip"))]


# route -> (multipart files, slices the first inference batch holds)
SLOW_REQUESTS = {
    "/v1/predict": ([("file", ("slice.png", encode(synthetic_slice()), "image/png"))], 1),
    "/v1/predict/batch": (png_files("files"), MAX_BATCH_SIZE),
    "/v1/series": (png_files("files"), MAX_BATCH_SIZE),
    "/v1/nifti": (nifti_file(), MAX_BATCH_SIZE),
}


def post(url: str, **kwargs: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(url, timeout=60, **kwargs)  # type: ignore[arg-type]
    return response, time.monotonic() - started


def wait_idle(server: Service, timeout_s: float) -> float:
    """Seconds until no slice is in flight any more."""
    started = time.monotonic()
    while server.metric("lgg_in_flight_slices") != 0:
        assert time.monotonic() - started < timeout_s, "the timed-out work never released its admission"
        time.sleep(0.05)
    return time.monotonic() - started


def test_slow_requests_get_504_at_their_deadline_and_hold_admission_until_their_work_stops(
    server: Service, request: pytest.FixtureRequest
) -> None:
    processed_before = server.metric("lgg_slices_processed_total")
    timed_out_before = server.metric("lgg_timed_out_requests_total")
    with ThreadPoolExecutor(len(SLOW_REQUESTS)) as pool:
        futures = {
            route: pool.submit(post, server.url + route, files=files) for route, (files, _) in SLOW_REQUESTS.items()
        }
        answers = {route: future.result() for route, future in futures.items()}
    in_flight_after_the_answers = server.metric("lgg_in_flight_slices")
    for route, (response, seconds) in answers.items():
        assert response.status_code == 504, (route, response.status_code, response.text)
        assert "time budget of 1 s" in response.json()["detail"], response.text
        assert seconds < BUDGET_S + MARGIN_S, (route, seconds)
    # The answers are out, the first inference batches still run: every unit of every request is still held
    # (one per slice).
    sent = 1 + SLICES * (len(SLOW_REQUESTS) - 1)
    assert in_flight_after_the_answers == sent
    assert server.metric("lgg_slices_processed_total") == processed_before
    wait_idle(server, timeout_s=120)
    # Released only once the work ended: by then the first batches had finished. And the work stopped there:
    # no request's second batch ran.
    processed = server.metric("lgg_slices_processed_total") - processed_before
    first_batches = sum(slices for _, slices in SLOW_REQUESTS.values())
    if "direct" in request.node.callspec.id:
        assert processed == first_batches
    else:  # the batcher mixes requests in its batches; what waited past its deadline was dropped, not computed
        assert 0 < processed < sent
    assert server.metric("lgg_timed_out_requests_total") - timed_out_before == len(SLOW_REQUESTS)
    # And the service keeps serving: a blank slice runs at once.
    response, _ = post(server.url + "/v1/predict", files={"file": ("blank.png", encode(np.zeros((64, 64), np.uint8)))})
    assert response.status_code == 200 and response.json()["tumor_detected"] is False, response.text
    assert httpx.get(server.url + "/readyz").status_code == 200
    assert "Traceback" not in server.log()


def test_a_pacs_that_never_answers_costs_the_budget_not_the_client_timeout(server: Service) -> None:
    """DICOMweb: the retrieve waits at most what is left of the budget (the PACS client's own timeout is 60 s)."""
    with silent_pacs() as body:
        response, seconds = post(server.url + "/v1/dicomweb/series", json=body)
        assert response.status_code == 504 and "WADO-RS" in response.json()["detail"], response.text
        assert seconds < BUDGET_S + MARGIN_S
        assert wait_idle(server, timeout_s=30) < 5
