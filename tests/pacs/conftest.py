"""The DICOM tests' phantom models and in-process apps, for the route tests that need no PACS."""

from tests.dicom.conftest import dicom_settings, make_dicom_client, phantom_models_dir  # noqa: F401  (fixtures)
