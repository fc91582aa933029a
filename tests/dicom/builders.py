"""DICOM files built in the tests with pydicom, and phantom ONNX models with known behaviour.

Every file carries a canary patient name and ID so the privacy tests can look for them in logs,
metrics and responses.
"""

import hashlib
import io
import json
import zipfile
from copy import deepcopy
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from tests.conftest import REPO_ROOT

CANARY_NAME = "CANARY^PRIVATE^PATIENT"
CANARY_ID = "CANARY-ID-0042"
CANARY_BIRTH_DATE = "19010203"
# An oblique stack: rows along x tilted about the z axis, columns straight down y; normal = row x column.
OBLIQUE = (np.cos(0.3), np.sin(0.3), 0.0, 0.0, 0.0, -1.0)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(np.array(orientation[:3]), np.array(orientation[3:]))


def mr_slice(
    pixels: np.ndarray,
    *,
    series_uid: str,
    study_uid: str,
    frame_of_reference_uid: str,
    instance_number: int | None = 1,
    position: tuple[float, ...] | None = (0.0, 0.0, 0.0),
    orientation: tuple[float, ...] | None = AXIAL,
    pixel_spacing: tuple[float, float] | None = (0.5, 0.7),
    slice_thickness: float | None = 3.0,
    spacing_between_slices: float | None = None,
    photometric: str | None = None,
    bits_stored: int | None = None,
    signed: bool = False,
) -> Dataset:
    """A single-frame MR Image Storage instance around `pixels` (HxW monochrome or HxWx3 RGB)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = CANARY_NAME
    ds.PatientID = CANARY_ID
    ds.PatientBirthDate = CANARY_BIRTH_DATE
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "ACC-CANARY"
    ds.ReferringPhysicianName = ""
    ds.Modality = "MR"
    ds.SeriesNumber = 7
    ds.Manufacturer = "tests"
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
    ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength = 100, 9000, 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SeriesDescription = "AX FLAIR"
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if slice_thickness is not None:
        ds.SliceThickness = slice_thickness
    if spacing_between_slices is not None:
        ds.SpacingBetweenSlices = spacing_between_slices
    if photometric is None:
        photometric = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    ds.PixelRepresentation = int(signed)
    return ds


def mr_series(
    volume: np.ndarray,
    *,
    slice_spacing: float = 3.3,
    pixel_spacing: tuple[float, float] = (0.5, 0.7),
    orientation: tuple[float, ...] = OBLIQUE,
    origin: tuple[float, float, float] = (-60.0, -70.0, 20.0),
    **options: object,
) -> list[Dataset]:
    """One instance per slice of `volume`, positioned `slice_spacing` mm apart along the slice normal."""
    series_uid, study_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    normal = slice_normal(orientation)
    return [
        mr_slice(
            pixels,
            series_uid=series_uid,
            study_uid=study_uid,
            frame_of_reference_uid=frame_uid,
            instance_number=n + 1,
            position=tuple(np.array(origin) + n * slice_spacing * normal),
            orientation=orientation,
            pixel_spacing=pixel_spacing,
            **options,
        )
        for n, pixels in enumerate(volume)
    ]


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def changed(ds: Dataset, **attributes: object) -> bytes:
    """The file of a deep copy of `ds` with some attributes set (the fixtures' datasets stay untouched)."""
    copy = deepcopy(ds)
    for keyword, value in attributes.items():
        setattr(copy, keyword, value)
    return to_bytes(copy)


def zip_of(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def write_phantom_models(folder: Path, size: int = 64, flair_z: float = 1.5) -> Path:
    """Tiny ONNX models with the service's I/O that segment what is bright in FLAIR.

    Segmenter: sigmoid(8 * (z-scored FLAIR - flair_z)); classifier: the largest value of that map.
    The synthetic phantoms' tumors are bright in FLAIR, so masks are non-empty and deterministic whatever
    the trained models in models/ are.
    """
    import onnx
    from onnx import TensorProto, helper

    def constant(name: str, values: list, dtype: int) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, dtype, [len(values)], values))

    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, size, size])
    segmenter_nodes = [
        constant("starts", [1], TensorProto.INT64),
        constant("ends", [2], TensorProto.INT64),
        constant("axes", [1], TensorProto.INT64),
        constant("offset", [flair_z], TensorProto.FLOAT),
        constant("gain", [8.0], TensorProto.FLOAT),
        helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["flair"]),
        helper.make_node("Sub", ["flair", "offset"], ["centered"]),
        helper.make_node("Mul", ["centered", "gain"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["tumor_probability_map"]),
    ]
    graphs = {
        "segmenter.onnx": (
            segmenter_nodes,
            helper.make_tensor_value_info("tumor_probability_map", TensorProto.FLOAT, ["batch", 1, size, size]),
        ),
        "classifier.onnx": (
            [
                *segmenter_nodes[:-1],
                helper.make_node("Sigmoid", ["logits"], ["map"]),
                helper.make_node("ReduceMax", ["map"], ["tumor_probability"], axes=[2, 3], keepdims=0),
            ],
            helper.make_tensor_value_info("tumor_probability", TensorProto.FLOAT, ["batch", 1]),
        ),
    }
    folder.mkdir(parents=True, exist_ok=True)
    models = {}
    for file, (nodes, output) in graphs.items():
        graph = helper.make_graph(nodes, file.removesuffix(".onnx"), [image], [output])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        (folder / file).write_bytes(model.SerializeToString())
        kind = file.removesuffix(".onnx")
        models[kind] = {
            "file": file,
            "sha256": hashlib.sha256((folder / file).read_bytes()).hexdigest(),
            "input": {"name": "image", "shape": ["batch", 3, size, size], "dtype": "float32"},
            "output": {
                "name": output.name,
                "shape": ["batch", 1] if kind == "classifier" else ["batch", 1, size, size],
            },
            "threshold": 0.5,
            "gflops_per_slice": 0.0,
        }
    # The bundled card (a valid one under the service's schema) with the phantom's name, size and files.
    card = json.loads((REPO_ROOT / "models" / "model_card.json").read_text())
    card |= {"name": "phantom-flair-threshold", "version": "test.1", "input": card["input"] | {"size": size}}
    for kind, entry in models.items():
        card["models"][kind] |= entry
    (folder / "model_card.json").write_text(json.dumps(card, indent=2))
    return folder
