"""The DICOM tests' phantom models, app and synthetic series, shared so NIfTI results compare with DICOM ones."""

from tests.dicom.conftest import (  # noqa: F401  (fixtures)
    dicom_client,
    dicom_settings,
    flair_volume,
    patient,
    phantom_models_dir,
    series_datasets,
    series_files,
)
