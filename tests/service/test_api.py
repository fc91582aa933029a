"""Every route and every error case, in process (TestClient re-raises any server exception, so a bug fails here)."""

import base64
import io
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import app.core.service
from app.core.config import Settings
from app.main import create_app
from tests.service.conftest import coco_decode, encode, synthetic_slice, wait_until_ready

GIF = encode(synthetic_slice(32, 32), "GIF")


def upload(data: bytes, name: str = "slice.png", content_type: str = "image/png") -> dict:
    return {"file": (name, data, content_type)}


def metric_value(text: str, sample: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(sample + " ")]
    return values[0] if values else 0.0


# --- predictions -------------------------------------------------------------------------------------------


def test_predict_returns_probability_versions_and_timings(client: TestClient, slice_png: bytes) -> None:
    response = client.post("/v1/predict", files=upload(slice_png))
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body["tumor_probability"], float) and 0 <= body["tumor_probability"] <= 1
    threshold = client.get("/v1/models").json()["thresholds"]["classifier"]
    assert body["tumor_detected"] == (body["tumor_probability"] >= threshold)
    assert (body["mask"] is None) == (not body["tumor_detected"])
    assert body["image_size"] == [256, 256]
    assert len(body["models"]["classifier_sha256"]) == 64 and body["models"]["card_version"]
    timings = body["timings"]
    assert timings["batch_size"] >= 1
    assert timings["total_ms"] >= timings["decode_ms"] + timings["classifier_ms"]


def test_predict_without_tumor_has_no_mask(no_tumor_client: TestClient, slice_png: bytes) -> None:
    body = no_tumor_client.post("/v1/predict", files=upload(slice_png)).json()
    assert body["tumor_detected"] is False
    assert body["mask"] is None and body["bbox"] is None and body["area_pixels"] == 0


def test_predict_rle_mask_decodes_with_pycocotools(tumor_client: TestClient, tumor_models_dir: Path) -> None:
    image = synthetic_slice(300, 220)
    response = tumor_client.post("/v1/predict", files=upload(encode(image)))
    assert response.status_code == 200
    body = response.json()
    assert body["tumor_detected"] is True
    mask = coco_decode(body["mask"])
    assert body["mask"]["format"] == "rle" and body["mask"]["size"] == [300, 220]
    assert 0 < mask.sum() < mask.size
    assert body["area_pixels"] == int(mask.sum())
    x, y, width, height = body["bbox"]
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert (x, y, x + width - 1, y + height - 1) == (columns[0], rows[0], columns[-1], rows[-1])


def test_predict_png_and_none_mask_formats(tumor_client: TestClient) -> None:
    data = encode(synthetic_slice(300, 220))
    rle = coco_decode(tumor_client.post("/v1/predict", files=upload(data)).json()["mask"])
    png = tumor_client.post("/v1/predict?mask_format=png", files=upload(data)).json()
    assert png["mask"]["format"] == "png" and png["mask"]["size"] == [300, 220]
    with Image.open(io.BytesIO(base64.b64decode(png["mask"]["data"]))) as image:
        assert image.mode == "1"
        np.testing.assert_array_equal(np.asarray(image), rle)
    none = tumor_client.post("/v1/predict?mask_format=none", files=upload(data)).json()
    assert none["mask"] is None and none["area_pixels"] == int(rle.sum()) and none["bbox"] == png["bbox"]


@pytest.mark.parametrize(
    ("image", "image_format", "content_type"),
    [
        (synthetic_slice(), "TIFF", "image/tiff"),
        (synthetic_slice(), "JPEG", "image/jpeg"),
        (synthetic_slice(), "WEBP", "image/webp"),
        (synthetic_slice()[..., 1], "PNG", "application/octet-stream"),
        ((synthetic_slice()[..., 1].astype(np.uint16) * 257), "PNG", "image/png"),
        (synthetic_slice(1024, 768), "PNG", "image/png"),
    ],
)
def test_predict_accepts_every_supported_input(
    client: TestClient, image: np.ndarray, image_format: str, content_type: str
) -> None:
    response = client.post("/v1/predict", files=upload(encode(image, image_format), "x", content_type))
    assert response.status_code == 200, response.text
    assert response.json()["image_size"] == list(image.shape[:2])


def test_mask_png_is_the_mask_at_input_size(tumor_client: TestClient) -> None:
    data = encode(synthetic_slice(300, 220))
    rle = coco_decode(tumor_client.post("/v1/predict", files=upload(data)).json()["mask"])
    response = tumor_client.post("/v1/predict/mask.png", files=upload(data))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert response.headers["x-tumor-detected"] == "true"
    assert 0 <= float(response.headers["x-tumor-probability"]) <= 1
    with Image.open(io.BytesIO(response.content)) as image:
        np.testing.assert_array_equal(np.asarray(image), rle)


def test_mask_png_without_tumor_is_all_background(no_tumor_client: TestClient) -> None:
    response = no_tumor_client.post("/v1/predict/mask.png", files=upload(encode(synthetic_slice(50, 70))))
    assert response.headers["x-tumor-detected"] == "false"
    with Image.open(io.BytesIO(response.content)) as image:
        assert image.size == (70, 50) and not np.asarray(image).any()


def test_overlay_without_tumor_is_the_plain_slice(no_tumor_client: TestClient) -> None:
    image = synthetic_slice(50, 70)
    response = no_tumor_client.post("/v1/predict/overlay.png", files=upload(encode(image)))
    with Image.open(io.BytesIO(response.content)) as overlay:
        np.testing.assert_array_equal(np.asarray(overlay.convert("RGB"))[..., 0], image[..., 1])


def test_overlay_png_outlines_the_tumor_on_the_slice(tumor_client: TestClient) -> None:
    image = synthetic_slice(300, 220)
    response = tumor_client.post("/v1/predict/overlay.png", files=upload(encode(image)))
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(response.content)) as overlay:
        pixels = np.asarray(overlay.convert("RGB"))
    assert pixels.shape == (300, 220, 3)
    red = (pixels[..., 0] == 255) & (pixels[..., 1] < 64)
    assert red.any()
    np.testing.assert_array_equal(pixels[~red][:, 1], image[..., 1][~red])


def test_batch_answers_every_file_in_order_and_isolates_failures(client: TestClient, slice_png: bytes) -> None:
    files = [
        ("files", ("a.png", slice_png, "image/png")),
        ("files", ("broken.png", slice_png[:100], "image/png")),
        ("files", ("b.tif", encode(synthetic_slice(100, 120), "TIFF"), "image/tiff")),
        ("files", ("anim.gif", GIF, "image/gif")),
        ("files", ("empty.png", b"", "image/png")),
        ("files", ("c.png", encode(synthetic_slice(seed=5)[..., 1]), "image/png")),
    ]
    response = client.post("/v1/predict/batch", files=files)
    assert response.status_code == 200
    body = response.json()
    results = body["results"]
    assert [r["filename"] for r in results] == ["a.png", "broken.png", "b.tif", "anim.gif", "empty.png", "c.png"]
    assert [r["status_code"] for r in results] == [200, 400, 200, 415, 400, 200]
    assert (body["succeeded"], body["failed"]) == (3, 3)
    for result in results:
        assert (result["prediction"] is None) == (result["status_code"] != 200)
        assert (result["detail"] is None) == (result["status_code"] == 200)
    assert results[2]["prediction"]["image_size"] == [100, 120]
    single = client.post("/v1/predict", files=upload(slice_png)).json()
    assert results[0]["prediction"]["tumor_probability"] == pytest.approx(single["tumor_probability"], abs=1e-5)


def test_batch_with_only_bad_files_still_answers(client: TestClient) -> None:
    response = client.post("/v1/predict/batch", files=[("files", ("x.png", b"nope", "image/png"))])
    assert response.status_code == 200
    assert response.json()["results"][0]["status_code"] == 400


def test_batch_limits(make_client: Callable[..., TestClient], slice_png: bytes) -> None:
    limited = make_client(max_batch_files=2, max_upload_bytes=len(slice_png) + 10)
    big = encode(synthetic_slice(400, 400))
    response = limited.post("/v1/predict/batch", files=[("files", ("a.png", slice_png)), ("files", ("big.png", big))])
    assert [r["status_code"] for r in response.json()["results"]] == [200, 413]
    response = limited.post("/v1/predict/batch", files=[("files", ("a.png", slice_png))] * 3)
    assert response.status_code == 413 and "3 files" in response.json()["detail"]


# --- bad requests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("files", "status", "words"),
    [
        (upload(b"", "empty.png"), 400, "empty"),
        (upload(b"\x89PNG\r\n\x1a\n garbage", "x.png"), 400, "not a decodable image"),
        (upload(b"hello", "notes.txt", "text/plain"), 415, "text/plain"),
        (upload(GIF, "a.gif", "image/gif"), 415, "GIF"),
    ],
)
def test_bad_images_get_clear_errors(client: TestClient, files: dict, status: int, words: str) -> None:
    for route in ("/v1/predict", "/v1/predict/mask.png", "/v1/predict/overlay.png"):
        response = client.post(route, files=files)
        assert response.status_code == status, (route, response.text)
        assert words in response.json()["detail"]


@pytest.mark.parametrize(
    ("request_kwargs", "words"),
    [
        ({"files": {"image": ("a.png", b"x")}}, "form field 'file': Field required"),
        ({"data": {"file": "not a file"}}, "form field 'file'"),
        ({"json": {"file": "x"}}, "form field 'file'"),
    ],
)
def test_wrong_fields_are_422_with_a_readable_message(client: TestClient, request_kwargs: dict, words: str) -> None:
    response = client.post("/v1/predict", **request_kwargs)
    assert response.status_code == 422
    assert words in response.json()["detail"]


def test_unknown_mask_format_is_422(client: TestClient, slice_png: bytes) -> None:
    response = client.post("/v1/predict?mask_format=jpeg", files=upload(slice_png))
    assert response.status_code == 422
    assert response.json()["detail"] == "query parameter 'mask_format': Input should be 'rle', 'png' or 'none'"


def test_too_many_pixels_is_413(make_client: Callable[..., TestClient]) -> None:
    small = make_client(max_pixels=200 * 200)
    response = small.post("/v1/predict", files=upload(encode(synthetic_slice(201, 200))))
    assert response.status_code == 413
    assert "200 x 201 = 40200 pixels, more than the limit of 40000" in response.json()["detail"]


def test_upload_over_the_cap_is_413_from_the_declared_length(make_client: Callable[..., TestClient]) -> None:
    capped = make_client(max_upload_bytes=100_000)
    response = capped.post("/v1/predict", files=upload(b"\0" * 200_000))
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["detail"]


def test_upload_over_the_cap_is_413_while_streaming(make_client: Callable[..., TestClient]) -> None:
    capped = make_client(max_upload_bytes=100_000)

    def body() -> Iterator[bytes]:
        # A generator body goes out chunked, without Content-Length: the cap must stop the stream itself.
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(100):
            yield b"\0" * 10_000
        yield b"\r\n--b--\r\n"

    response = capped.post("/v1/predict", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["detail"]


def test_file_just_over_the_cap_inside_the_multipart_slack_is_413(make_client: Callable[..., TestClient]) -> None:
    capped = make_client(max_upload_bytes=100_000)
    response = capped.post("/v1/predict", files=upload(b"\0" * 100_001))
    assert response.status_code == 413
    assert "file is 100001 bytes" in response.json()["detail"]


def test_unknown_route_and_method_are_json(client: TestClient) -> None:
    assert client.get("/v2/nothing").json() == {"detail": "Not Found"}
    response = client.get("/v1/predict")
    assert response.status_code == 405 and response.json()["detail"]


# --- API key -------------------------------------------------------------------------------------------------


def test_api_key_guards_every_route_but_health_and_metrics(
    make_client: Callable[..., TestClient], slice_png: bytes
) -> None:
    guarded = make_client(api_key="s3cret")
    for route in ("/v1/predict", "/v1/predict/mask.png", "/v1/predict/overlay.png"):
        for headers in ({}, {"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
            response = guarded.post(route, files=upload(slice_png), headers=headers)
            assert response.status_code == 401, (route, headers)
            assert "API key" in response.json()["detail"]
    assert guarded.post("/v1/predict/batch", files=[("files", ("a.png", slice_png))]).status_code == 401
    assert guarded.get("/v1/models").status_code == 401
    assert guarded.post("/v1/predict", files=upload(slice_png), headers={"X-API-Key": "s3cret"}).status_code == 200
    ok = guarded.post("/v1/predict", files=upload(slice_png), headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert guarded.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
    for route in ("/healthz", "/readyz", "/metrics"):
        assert guarded.get(route).status_code == 200, route


# --- health, readiness, metrics, models, docs ------------------------------------------------------------------


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_not_ready_until_warm_up_finishes(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, slice_png: bytes
) -> None:
    release = threading.Event()
    real_load = app.core.service.load_models

    def held_load(*args: object) -> object:
        assert release.wait(30)
        return real_load(*args)

    monkeypatch.setattr(app.core.service, "load_models", held_load)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 200
        response = client.get("/readyz")
        assert response.status_code == 503 and "loading" in response.json()["detail"]
        for response in (client.post("/v1/predict", files=upload(slice_png)), client.get("/v1/models")):
            assert response.status_code == 503 and response.headers["retry-after"]
            assert "loading" in response.json()["detail"]
        assert "lgg_ready 0.0" in client.get("/metrics").text
        release.set()
        wait_until_ready(client)
        assert client.post("/v1/predict", files=upload(slice_png)).status_code == 200
        assert "lgg_ready 1.0" in client.get("/metrics").text


def test_failed_loading_is_unhealthy(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_load(*args: object) -> None:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(app.core.service, "load_models", broken_load)
    with TestClient(create_app(settings)) as client:
        for route in ("/healthz", "/readyz"):
            response = client.get(route)
            assert response.status_code == 503
            assert response.json()["detail"] == "model loading failed: CUDA out of memory"


def test_metrics_count_requests_slices_and_batches(make_client: Callable[..., TestClient], slice_png: bytes) -> None:
    fresh = make_client(max_wait_ms=1.0)
    for _ in range(3):
        fresh.post("/v1/predict", files=upload(slice_png))
    fresh.post("/v1/predict", files=upload(b""))
    fresh.post("/v1/predict/batch", files=[("files", ("a.png", slice_png))] * 4)
    response = fresh.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric_value(text, 'http_requests_total{handler="/v1/predict",method="POST",status="200"}') == 3
    assert metric_value(text, 'http_requests_total{handler="/v1/predict",method="POST",status="400"}') == 1
    assert metric_value(text, 'http_requests_total{handler="/v1/predict/batch",method="POST",status="200"}') == 1
    assert metric_value(text, 'http_request_duration_seconds_count{handler="/v1/predict",method="POST"}') == 4
    assert metric_value(text, "lgg_slices_processed_total") == 7
    assert metric_value(text, 'lgg_inference_batch_size_sum{model="classifier"}') == 7
    assert metric_value(text, 'lgg_inference_duration_seconds_count{model="classifier"}') >= 2
    assert metric_value(text, "lgg_queue_wait_seconds_count") == 7
    assert "lgg_tumors_detected_total" in text and "process_cpu_seconds_total" in text
    assert 'lgg_model_info{classifier_sha256="' in text


def test_models_describes_what_is_served(client: TestClient, bundled_models_dir: Path) -> None:
    body = client.get("/v1/models").json()
    assert body["card"] == json.loads((bundled_models_dir / "model_card.json").read_text())
    assert body["providers"] == {"classifier": ["CPUExecutionProvider"], "segmenter": ["CPUExecutionProvider"]}
    assert set(body["thresholds"]) == {"classifier", "segmenter"}
    assert body["input_size"] == body["card"]["input"]["size"]
    assert body["batching"]["max_batch_size"] == 8


def test_openapi_docs_list_every_route(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    expected = {"/v1/predict", "/v1/predict/mask.png", "/v1/predict/overlay.png", "/v1/predict/batch", "/v1/models"}
    assert expected | {"/healthz", "/readyz", "/metrics"} <= set(paths)
    assert "413" in paths["/v1/predict"]["post"]["responses"]


def test_a_genuine_bug_is_a_logged_json_500(settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    buggy = create_app(settings)

    @buggy.get("/bug")
    def bug() -> None:
        raise ZeroDivisionError("a bug")

    with TestClient(buggy, raise_server_exceptions=False) as client:
        response = client.get("/bug")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error; it has been logged"}
    assert "unhandled error on GET /bug" in caplog.text


def test_without_batching_requests_run_alone_with_the_same_answers(
    make_client: Callable[..., TestClient], client: TestClient, slice_png: bytes
) -> None:
    direct = make_client(batching=False)
    alone = direct.post("/v1/predict", files=upload(slice_png)).json()
    batched = client.post("/v1/predict", files=upload(slice_png)).json()
    assert alone["tumor_probability"] == pytest.approx(batched["tumor_probability"], abs=1e-5)
    assert alone["timings"]["batch_size"] == 1
    files = [("files", (f"{i}.png", slice_png)) for i in range(10)] + [("files", ("bad.png", b"x"))]
    results = direct.post("/v1/predict/batch", files=files).json()["results"]
    assert [r["status_code"] for r in results] == [200] * 10 + [400]
    text = direct.get("/metrics").text
    # The batch endpoint still runs the networks in batches of max_batch_size (8 here): 1 + 8 + 2 slices.
    assert metric_value(text, 'lgg_inference_batch_size_count{model="classifier"}') == 3
    assert metric_value(text, "lgg_queue_wait_seconds_count") == 0
    assert direct.get("/v1/models").json()["batching"]["enabled"] is False
