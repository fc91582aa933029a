"""The viewer at / in headless Chromium against a real uvicorn: upload, see the overlay, read the numbers.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; skipped with the reason otherwise.
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.browser import WAIT_S, chromium, require_chromium
from tests.dicom.conftest import SLICES
from tests.live_server import LiveServer, live_server
from tests.service.conftest import encode

webdriver = require_chromium()
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.slow
# Canvas pixels the overlay changed: the slice is drawn in gray (R = G), the overlay pulls R up and G down.
COUNT_OVERLAY_PIXELS = """
const canvas = document.getElementById("viewer-canvas");
const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
let count = 0;
for (let i = 0; i < data.length; i += 4) if (data[i] !== data[i + 1]) count++;
return [count, canvas.width, canvas.height];
"""


@pytest.fixture(scope="module")
def server(phantom_models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with live_server(tmp_path_factory.mktemp("viewer-server"), model_dir=phantom_models_dir, warmup_runs=0) as server:
        yield server


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator["webdriver.Chrome"]:
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as driver:
        yield driver


def upload(browser: "webdriver.Chrome", server: LiveServer, paths: list[Path]) -> str:
    """Open the viewer, choose the files, and wait until it reports the result (or an error)."""
    browser.get(server.url + "/")
    browser.find_element(By.ID, "files").send_keys("\n".join(str(p) for p in paths))
    status = browser.find_element(By.ID, "status")
    WebDriverWait(browser, WAIT_S).until(lambda _: status.text.startswith(("Done", "Could not")))
    return status.text


def text(browser: "webdriver.Chrome", element_id: str) -> str:
    return browser.find_element(By.ID, element_id).text


def show_slice(browser: "webdriver.Chrome", index: int) -> None:
    browser.execute_script(
        "const s = document.getElementById('slice-slider'); s.value = arguments[0];"
        "s.dispatchEvent(new Event('input'));",
        index,
    )


def test_a_dicom_series_shows_its_overlay_and_numbers(
    browser: "webdriver.Chrome", server: LiveServer, series_files: list[bytes], tmp_path: Path
) -> None:
    paths = []
    for n, data in enumerate(series_files[::-1]):
        paths.append(tmp_path / f"IM{n:04d}.dcm")
        paths[-1].write_bytes(data)
    status = upload(browser, server, paths)
    assert status.startswith("Done"), status
    expected = httpx.post(
        f"{server.url}/v1/series", files=[("files", (p.name, p.read_bytes())) for p in paths], timeout=WAIT_S
    ).json()
    assert expected["tumor_volume_voxels"] > 0
    assert text(browser, "slice-count") == str(SLICES)
    assert text(browser, "volume-ml") == f"{expected['tumor_volume_ml']:.2f} mL"
    assert text(browser, "volume-voxels") == str(expected["tumor_volume_voxels"])
    assert text(browser, "tumor-slices") == str(expected["tumor_slices"])
    assert browser.find_element(By.ID, "download-seg").is_displayed()
    # The viewer opens on the slice with the largest tumor: its overlay covers exactly the mask's pixels.
    areas = [s["area_pixels"] for s in expected["slices"]]
    shown = int(browser.find_element(By.ID, "slice-slider").get_attribute("value"))
    assert shown == int(np.argmax(areas))
    count, width, height = browser.execute_script(COUNT_OVERLAY_PIXELS)
    assert [height, width] == expected["image_size"] and count == areas[shown] > 0
    assert text(browser, "slice-probability") == f"{expected['slices'][shown]['tumor_probability']:.3f}"
    for index in (0, SLICES // 2, SLICES - 1):
        show_slice(browser, index)
        assert text(browser, "slice-label").startswith(f"slice {index + 1} / {SLICES}")
        assert browser.execute_script(COUNT_OVERLAY_PIXELS)[0] == areas[index]
        assert text(browser, "slice-area") == str(areas[index])
    browser.find_element(By.ID, "overlay-toggle").click()  # overlay off: the plain slice
    assert browser.execute_script(COUNT_OVERLAY_PIXELS)[0] == 0


def test_one_png_slice_shows_its_overlay_without_a_volume_in_ml(
    browser: "webdriver.Chrome", server: LiveServer, patient, tmp_path: Path
) -> None:
    path = tmp_path / "TCGA_XX_0001_20000101_7.png"
    path.write_bytes(encode(patient.images[6]))
    (tmp_path / "TCGA_XX_0001_20000101_7_mask.png").write_bytes(encode(patient.masks[6]))
    status = upload(browser, server, [path, tmp_path / "TCGA_XX_0001_20000101_7_mask.png"])  # the mask is skipped
    assert status.startswith("Done"), status
    assert text(browser, "slice-count") == "1"
    assert text(browser, "volume-ml").startswith("n/a")
    area = int(text(browser, "slice-area"))
    assert area > 0 and browser.execute_script(COUNT_OVERLAY_PIXELS)[0] == area
    assert not browser.find_element(By.ID, "download-seg").is_displayed()


def test_a_refused_file_shows_the_services_message(
    browser: "webdriver.Chrome", server: LiveServer, tmp_path: Path
) -> None:
    path = tmp_path / "notes_1.txt"
    path.write_text("not an image")
    status = upload(browser, server, [path])
    assert status.startswith("Could not analyse: 415") and "notes_1.txt" in status
