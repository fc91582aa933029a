"""Headless Chromium through Selenium for browser tests, with no network beyond this machine.

Needs Debian's `chromium` and `chromium-driver` and the `selenium` package; `require_chromium()` skips the
calling test module with the reason otherwise.
"""

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
INSTALL = "apt-get install -y --no-install-recommends chromium chromium-driver"
WAIT_S = 60
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1200,1000",
    # Offline, as on a hospital network: every host name but the loopback address fails to resolve, so a page
    # that needs a CDN shows it.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
)


def require_chromium() -> Any:
    """The selenium.webdriver module; skips the calling module when Chromium, its driver or selenium is missing."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip(f"headless Chromium not installed (Debian: {INSTALL})", allow_module_level=True)
    return pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install '.[test]')")


@contextmanager
def chromium(profile_dir: Path) -> Iterator[Any]:
    """A headless Chromium driven by Selenium; quit on leaving."""
    webdriver = require_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    # An explicit driver path: Selenium Manager (which would download one) never runs.
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(WAIT_S)
    try:
        yield driver
    finally:
        driver.quit()
