"""Security defaults (issue 12 item 7): the API key is checked on the headers before any body is read, header size
is capped, credentials never reach the log, responses carry no-store/nosniff/frame/CSP headers, CORS is closed
unless configured, OpenAPI advertises the key only when there is one, and a client hanging up mid-request is
neither a logged error nor a 500 in the metrics."""

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.core.config import Settings
from app.main import create_app
from tests.conftest import REPO_ROOT
from tests.reliability.harness import Service, multipart, read_response, service, slice_upload

API_KEY = "reliability-key-0123456789"


def dockerfile_uvicorn_options() -> tuple[str, ...]:
    """The uvicorn options of the Dockerfile's CMD but --host/--port: the server runs here as it is shipped
    (--http h11, which caps a request head at 16 KiB; uvicorn's default httptools accepted a 50 MB header)."""
    line = next(x for x in (REPO_ROOT / "Dockerfile").read_text().splitlines() if x.startswith("CMD "))
    options = json.loads(line.removeprefix("CMD "))[2:]
    pairs = list(zip(options[::2], options[1::2], strict=True))
    return tuple(item for name, value in pairs if name not in ("--host", "--port") for item in (name, value))


UVICORN_ARGS = dockerfile_uvicorn_options()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    with service(tmp_path_factory.mktemp("security"), *UVICORN_ARGS, api_key=API_KEY, warmup_runs=0) as running:
        yield running


def connect(server: Service) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_unauthenticated_upload_is_refused_on_its_headers(server: Service) -> None:
    # 200 MB announced, not one byte of it sent: the 401 comes anyway, so nothing was read or spooled.
    with connect(server) as client:
        client.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 209715200\r\n\r\n"
        )
        answer = read_response(client)
    assert answer.startswith("HTTP/1.1 401"), answer
    body = answer.partition("\r\n\r\n")[2]
    # The server closes the connection with 200 MB announced and unread: the kernel may reset it before the
    # body arrives here. Where the body arrived, it names the problem.
    assert not body or "missing or wrong API key" in body, answer


def test_wrong_and_right_keys(server: Service) -> None:
    content_type, body = multipart("/v1/predict", slice_upload())
    headers = {"Content-Type": content_type}
    assert httpx.post(f"{server.url}/v1/predict", content=body, headers=headers).status_code == 401
    wrong = httpx.post(f"{server.url}/v1/predict", content=body, headers={**headers, "X-API-Key": API_KEY[:-1]})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    bearer = httpx.post(
        f"{server.url}/v1/predict", content=body, headers={**headers, "Authorization": f"Bearer {API_KEY}"}, timeout=60
    )
    assert bearer.status_code == 200 and bearer.headers["cache-control"] == "no-store"


def test_oversized_request_head_is_refused(server: Service) -> None:
    with connect(server) as client:
        client.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
        answer = read_response(client)
    assert answer.startswith("HTTP/1.1 400"), answer
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_credentials_in_the_query_never_reach_the_log(server: Service) -> None:
    secret = "query-secret-4711"
    for name in ("api_key", "token", "X-API-Key"):
        httpx.get(f"{server.url}/v1/models?{name}={secret}&mask_format=rle")
    time.sleep(0.5)  # the access log line is written after the response
    log = server.log()
    assert secret not in log and API_KEY not in log
    assert "api_key=[redacted]&mask_format=rle" in log


def test_client_hanging_up_mid_request_is_no_error(server: Service) -> None:
    """Pipelined requests, the last one's body cut short, then the connection closed."""
    content_type, body = multipart("/v1/predict", slice_upload())
    head = f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-API-Key: {API_KEY}\r\nContent-Type: {content_type}\r\n"
    request = f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body
    for _ in range(5):
        with connect(server) as client:
            client.sendall(request + request + request[: len(request) // 2])
        time.sleep(0.2)
    with connect(server) as client:  # hangs up during the body of its only request
        client.sendall(request[: len(request) // 2])
        time.sleep(0.5)
    time.sleep(2)
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'status="500"' not in metrics
    log = server.log()
    assert "Traceback" not in log and "unhandled" not in log.lower()
    assert httpx.get(f"{server.url}/healthz").status_code == 200


@pytest.fixture(scope="module")
def app_without_models(bundled_models_dir: Path) -> TestClient:
    """No lifespan: headers, CORS and OpenAPI need no loaded models."""
    return TestClient(create_app(Settings(model_dir=bundled_models_dir, api_key=API_KEY)))


def test_security_headers(app_without_models: TestClient) -> None:
    viewer = app_without_models.get("/")
    assert viewer.status_code == 200
    assert "frame-ancestors 'none'" in viewer.headers["content-security-policy"]
    assert viewer.headers["x-frame-options"] == "DENY"
    assert viewer.headers["x-content-type-options"] == "nosniff"
    api = app_without_models.get("/v1/models")
    assert api.status_code == 401
    assert api.headers["cache-control"] == "no-store" and api.headers["x-content-type-options"] == "nosniff"
    assert app_without_models.get("/openapi.json").headers["x-content-type-options"] == "nosniff"


def test_cors_closed_by_default_and_configurable(bundled_models_dir: Path, app_without_models: TestClient) -> None:
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    closed = app_without_models.options("/v1/predict", headers=preflight)
    assert "access-control-allow-origin" not in closed.headers
    opened = TestClient(
        create_app(Settings(model_dir=bundled_models_dir, cors_origins=["https://elsewhere.example"]))
    ).options("/v1/predict", headers=preflight)
    assert opened.headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_openapi_advertises_the_key_only_when_there_is_one(
    bundled_models_dir: Path, app_without_models: TestClient
) -> None:
    with_key = app_without_models.get("/openapi.json").json()
    assert set(with_key["components"]["securitySchemes"]) == {"APIKeyHeader", "HTTPBearer"}
    without = TestClient(create_app(Settings(model_dir=bundled_models_dir))).get("/openapi.json").json()
    assert "securitySchemes" not in without.get("components", {})
    assert all("security" not in op for path in without["paths"].values() for op in path.values())
