"""The DICOM tests' phantom models and synthetic series, and the browser tests' Chromium and live server."""

import contextlib

import pytest

from tests.dicom.conftest import (  # noqa: F401  (fixtures)
    flair_volume,
    patient,
    phantom_models_dir,
    series_datasets,
    series_files,
)

# Without Chromium the test modules skip, with the reason, when they import it themselves.
with contextlib.suppress(pytest.skip.Exception):
    from tests.dicom.test_viewer_browser import browser, server  # noqa: F401  (fixtures)
