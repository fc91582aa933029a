"""/docs (Swagger UI) and /redoc render every operation in headless Chromium that cannot reach the internet.

FastAPI's stock pages load Swagger UI and ReDoc from a CDN: offline they stay blank and these tests fail.
"""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser import WAIT_S, chromium, require_chromium
from tests.live_server import LiveServer, live_server

webdriver = require_chromium()
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}
# Scripts, stylesheets, fonts and fetches; images are left out: ReDoc's "API docs by Redocly" footer logo links to
# its CDN and is a broken image offline, nothing more.
RESOURCE_URLS = (
    "return performance.getEntriesByType('resource').filter(e => e.initiatorType !== 'img').map(e => e.name);"
)


@pytest.fixture(scope="module")
def server(bundled_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log_dir = tmp_path_factory.mktemp("docs-server")
    with live_server(log_dir, wait_path="/healthz", model_dir=bundled_models_dir, warmup_runs=0) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


@pytest.fixture(scope="module")
def operations(server: LiveServer) -> set[tuple[str, str]]:
    """(METHOD, path) of every operation the OpenAPI document lists."""
    paths = httpx.get(f"{server.url}/openapi.json", timeout=WAIT_S).json()["paths"]
    found = {(method.upper(), path) for path, item in paths.items() for method in item if method in HTTP_METHODS}
    assert ("POST", "/v1/predict") in found
    return found


def loaded_only_from(browser: Any, server: LiveServer) -> list[str]:
    """The page's resources (but images) not served by the app itself: should be none."""
    return [url for url in browser.execute_script(RESOURCE_URLS) if not url.startswith(server.url + "/")]


def test_swagger_ui_renders_every_operation_offline(
    browser: Any, server: LiveServer, operations: set[tuple[str, str]]
) -> None:
    browser.get(f"{server.url}/docs")
    blocks = WebDriverWait(browser, WAIT_S).until(
        lambda page: page.find_elements(By.CSS_SELECTOR, ".opblock-summary") or False
    )
    shown = {
        (
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-method").text,
            block.find_element(By.CSS_SELECTOR, ".opblock-summary-path").get_attribute("data-path"),
        )
        for block in blocks
    }
    assert shown == operations
    assert loaded_only_from(browser, server) == []


def test_redoc_renders_every_operation_offline(
    browser: Any, server: LiveServer, operations: set[tuple[str, str]]
) -> None:
    browser.get(f"{server.url}/redoc")
    WebDriverWait(browser, WAIT_S).until(
        lambda page: len(page.find_elements(By.CSS_SELECTOR, "[data-section-id*='operation/']")) >= len(operations)
    )
    text = browser.find_element(By.CSS_SELECTOR, ".api-content").text
    summary = httpx.get(f"{server.url}/openapi.json", timeout=WAIT_S).json()["paths"]["/v1/predict"]["post"]["summary"]
    assert summary in text
    assert loaded_only_from(browser, server) == []
