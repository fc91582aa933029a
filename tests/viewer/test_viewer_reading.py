"""What a radiologist reads in the viewer, in headless Chromium against a real uvicorn: nothing before an
upload; window/level; the slice's tumor area in mm² and volume in mL; its numbers on screen without scrolling.
"""

import base64
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium.webdriver.common.by import By

from tests.dicom.conftest import PIXEL_SPACING_MM, SLICE_SPACING_MM
from tests.dicom.test_viewer_browser import WAIT_S, show_slice, text, upload
from tests.service.conftest import encode

pytestmark = pytest.mark.slow
LAPTOP = (1280, 720)  # a small screen: the slice's numbers must still be on it
SLICE_NUMBER_IDS = ("slice-label", "slice-probability", "slice-decision", "slice-area", "slice-area-mm2",
                    "slice-volume-ml")  # fmt: skip
CANVAS_PIXELS = """
const canvas = document.getElementById("viewer-canvas");
return Array.from(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data);
"""
IN_VIEW = """
const box = document.getElementById(arguments[0]).getBoundingClientRect();
return [window.scrollY, box.top, box.bottom, box.width, window.innerHeight];
"""


def set_range(browser, element_id: str, value: int) -> None:
    browser.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];s.dispatchEvent(new Event('input'));",
        element_id,
        value,
    )


def dicom_paths(series_files: list[bytes], folder: Path) -> list[Path]:
    paths = []
    for n, data in enumerate(series_files):
        paths.append(folder / f"IM{n:04d}.dcm")
        paths[-1].write_bytes(data)
    return paths


def test_nothing_shows_before_an_upload(browser, server) -> None:
    browser.set_window_size(*LAPTOP)
    browser.get(server.url + "/")
    for element_id in ("results", "viewer-canvas", "panel", "download-seg"):
        assert not browser.find_element(By.ID, element_id).is_displayed(), element_id
    assert browser.execute_script("return getComputedStyle(document.getElementById('results')).display") == "none"
    assert text(browser, "status") == "No series loaded."


def test_slice_numbers_in_mm2_and_ml_on_screen_without_scrolling(
    browser, server, series_files: list[bytes], tmp_path: Path
) -> None:
    browser.set_window_size(*LAPTOP)
    paths = dicom_paths(series_files, tmp_path)
    assert upload(browser, server, paths).startswith("Done")
    expected = httpx.post(
        f"{server.url}/v1/series", files=[("files", (p.name, p.read_bytes())) for p in paths], timeout=WAIT_S
    ).json()
    mm2_per_pixel = PIXEL_SPACING_MM[0] * PIXEL_SPACING_MM[1]
    for index in range(len(expected["slices"])):
        show_slice(browser, index)
        area = expected["slices"][index]["area_pixels"]
        assert text(browser, "slice-area") == str(area)
        assert text(browser, "slice-area-mm2") == f"= {area * mm2_per_pixel:.1f} mm²"
        assert text(browser, "slice-volume-ml") == f"{area * mm2_per_pixel * SLICE_SPACING_MM / 1000:.3f} mL"
    areas = [s["area_pixels"] for s in expected["slices"]]
    assert sum(areas) * mm2_per_pixel * SLICE_SPACING_MM / 1000 == pytest.approx(expected["tumor_volume_ml"])
    for element_id in (*SLICE_NUMBER_IDS, "volume-ml"):
        scroll_y, top, bottom, width, height = browser.execute_script(IN_VIEW, element_id)
        assert scroll_y == 0 and top >= 0 and bottom <= height and width > 0, (element_id, top, bottom, height)


def test_window_level_maps_the_slice_as_the_dicom_linear_window(
    browser, server, series_files: list[bytes], tmp_path: Path
) -> None:
    paths = dicom_paths(series_files, tmp_path)
    assert upload(browser, server, paths).startswith("Done")
    browser.find_element(By.ID, "overlay-toggle").click()  # overlay off: only the windowed slice
    index = 5
    show_slice(browser, index)
    expected = httpx.post(
        f"{server.url}/v1/series",
        params={"include_images": "true"},
        files=[("files", (p.name, p.read_bytes())) for p in paths],
        timeout=WAIT_S,
    ).json()
    gray = np.asarray(Image.open(io.BytesIO(base64.b64decode(expected["slices"][index]["image"]))), np.float64)

    def canvas() -> np.ndarray:
        return np.array(browser.execute_script(CANVAS_PIXELS), np.uint8).reshape(*gray.shape, 4)[..., 0]

    assert np.array_equal(canvas(), gray.astype(np.uint8))  # the full window shows the slice unchanged
    width, center = 60, 90
    set_range(browser, "window-width", width)
    set_range(browser, "window-center", center)
    windowed = np.clip(np.floor((gray - center + width / 2) * 255 / width + 0.5), 0, 255).astype(np.uint8)
    shown = canvas()
    assert not np.array_equal(shown, gray.astype(np.uint8))
    assert np.array_equal(shown, windowed)
    assert text(browser, "window-width-value") == str(width) and text(browser, "window-center-value") == str(center)
    browser.find_element(By.ID, "window-reset").click()
    assert np.array_equal(canvas(), gray.astype(np.uint8))
    browser.find_element(By.ID, "overlay-toggle").click()


def test_a_png_slice_has_no_mm2(browser, server, patient, tmp_path: Path) -> None:
    path = tmp_path / "TCGA_XX_0001_20000101_7.png"
    path.write_bytes(encode(patient.images[6]))
    assert upload(browser, server, [path]).startswith("Done")
    assert text(browser, "slice-area-mm2") == "(mm² n/a: no spacing)"
    assert text(browser, "slice-volume-ml") == "n/a"
