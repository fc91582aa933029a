"""DICOM SEG output: the series' tumor masks as a highdicom BINARY Segmentation referencing the source images.

Follows what MONAI Deploy's DICOM SEG writer does: one segment, the algorithm identified by the model
card's name and version with family DCM "Artificial Intelligence", and "RESEARCH USE ONLY" in the series
and content descriptions. The SEG copies the patient and study attributes of its sources (that is how a
PACS files it beside the images); it goes back only to the caller who sent them and is never logged.
Type 2 attributes the sources lack (anonymizers often drop StudyTime, StudyID, AccessionNumber...) are written
empty, as the standard allows; a SEG is refused (400) only when the sources cannot be referenced
(no usable UIDs or geometry).
"""

import io

import numpy as np
from pydicom.dataset import Dataset

from app.core.dicom_attributes import integer
from app.core.limits import ImageRejected
from app.core.onnx_sessions import ModelCard
from app.core.series import Series

MANUFACTURER = "lgg-tumor-service"
SEG_SERIES_NUMBER = 9901  # after the scanner's series numbers in most studies' listings
SEGMENT_LABEL = "LGG FLAIR abnormality"
RESEARCH_USE = "RESEARCH USE ONLY"
LO_MAX = 64  # DICOM LO value length
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientComments",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "InstitutionName",
    "InstitutionAddress",
    "StudyDescription",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "ContentDate",
)
# Type 2 (present, possibly empty) attributes highdicom copies from the first source into the SEG.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "SeriesNumber",
)
MIN_REDACTED_LENGTH = 3  # shorter values (a sex 'F', a size '2') would blank ordinary characters


def redacted(message: str, sources: list[Dataset]) -> str:
    """The message without the sources' identifying values (highdicom and pydicom quote malformed ones)."""
    for source in sources:
        for keyword in IDENTIFYING:
            value = str(source.get(keyword) or "")
            if len(value) >= MIN_REDACTED_LENGTH:
                message = message.replace(value, "<redacted>")
    return message


def fill_slice_thickness(source: Dataset, thickness_mm: float) -> None:
    """highdicom copies SliceThickness into the SEG and fails without it; some sources leave it empty.

    The datasets are this request's own decoded copies, so filling in the slice spacing changes no one's file.
    """
    shared = source.get("SharedFunctionalGroupsSequence") or []
    measures = [group.PixelMeasuresSequence[0] for group in shared if group.get("PixelMeasuresSequence")]
    for item in [source, *measures]:
        if item.get("SliceThickness") in (None, ""):
            item.SliceThickness = thickness_mm


def fill_type2(source: Dataset) -> None:
    """Missing Type 2 attributes -> present and empty (this request's own copy of the source's attributes)."""
    for keyword in TYPE2_COPIED:
        if keyword not in source:
            setattr(source, keyword, None)


def build_segmentation(series: Series, masks: np.ndarray, card: ModelCard) -> bytes:
    """masks: bool (slices, H, W) in the series' slice order -> the DICOM SEG file's bytes."""
    # Imported here: highdicom takes seconds to import and only SEG requests need it.
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not series.sources:
        raise ImageRejected(400, "output=seg needs DICOM input: a DICOM SEG must reference DICOM source images")
    frame_counts = [integer(s, "NumberOfFrames", 1) or 1 for s in series.sources]
    if len(series.sources) == 1:
        # One (multi-frame) file: highdicom wants the masks in the file's own frame order.
        by_frame = sorted(range(len(series.slices)), key=lambda i: series.slices[i].frame_number or 0)
        source_images, pixel_array = series.sources, masks[by_frame]
    elif max(frame_counts) == 1:
        source_images = [series.sources[s.source] for s in series.slices]
        pixel_array = masks
    else:
        raise ImageRejected(400, "output=seg needs either single-frame DICOM files or one multi-frame file, not a mix")
    name, version = card.card.name, card.version
    algorithm = hd.AlgorithmIdentificationSequence(
        name=name[:LO_MAX], family=codes.DCM.ArtificialIntelligence, version=version[:LO_MAX], source=MANUFACTURER
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=SEGMENT_LABEL,
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    for source in source_images:
        fill_type2(source)
        if series.slice_spacing_mm is not None:
            fill_slice_thickness(source, series.slice_spacing_mm)
    try:
        seg = hd.seg.Segmentation(
            source_images=source_images,
            pixel_array=pixel_array.astype(bool),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            series_instance_uid=hd.UID(),
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=name[:LO_MAX],
            software_versions=version[:LO_MAX],
            device_serial_number=card.segmenter.sha256[:16],
            content_description=f"{RESEARCH_USE}; not for diagnosis"[:LO_MAX],
            content_label="TUMOR",
            omit_empty_frames=False,  # every source slice gets a frame: "no tumor here" is a result too
        )
    # highdicom checks the sources (same series, frame of reference, geometry) and says what is wrong.
    except (ValueError, TypeError, AttributeError, KeyError) as error:
        detail = redacted(str(error), source_images)
        raise ImageRejected(400, f"cannot build a DICOM SEG for these images: {detail}") from error
    seg.SeriesDescription = f"{RESEARCH_USE}: {name} {version}"[:LO_MAX]
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
