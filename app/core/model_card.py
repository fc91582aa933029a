"""The model card: the one contract between training (training/export.py writes it) and serving (reads it).

`model_card.json` sits beside the ONNX files it names. Every key is declared here; an unknown or missing key, a
wrong type, a negative threshold or a card that contradicts itself (input size vs. tensor shapes) fails
validation with the key's path in the message. What the card says about training (device, seed, pretrained
weights) is copied by export from the checkpoints of the run, never written as a constant.
"""

import hashlib
from pathlib import Path
from typing import Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.core.postprocessing import TumorProbabilityRule
from app.core.preprocessing import CHANNEL_ORDER, NORMALIZATION, preprocess_slice

CARD_FILE = "model_card.json"
MODEL_KINDS = ("classifier", "segmenter")
PREPROCESSING_FUNCTION = f"{preprocess_slice.__module__}.{preprocess_slice.__qualname__}"


class CardModel(BaseModel):
    # forbid: a key the schema does not know is a typo or a newer exporter, not something to ignore.
    model_config = ConfigDict(extra="forbid")


class InputSpec(CardModel):
    size: int = Field(gt=0, description="Side of the square input the networks take, in pixels.")
    channel_order: list[str] = Field(description="What each of the 3 input channels holds.")
    normalization: str = Field(description="The normalization preprocess_slice applies, in words.")
    accepts: str = Field(description="What an uploaded slice may be.")
    preprocessing: str = Field(description="Dotted name of the preprocessing function training and serving share.")


class TensorSpec(CardModel):
    name: str
    shape: list[int | str] = Field(description="Dimensions; 'batch' for the dynamic one.")
    dtype: str | None = None


class OnnxParity(CardModel):
    slices: int = Field(description="Validation slices run through both PyTorch and ONNX Runtime.")
    max_abs_difference: float
    differing_decisions: int = Field(description="Slices whose thresholded decision differs (float noise excluded).")


class Hyperparameters(CardModel):
    size: int
    width: int
    blocks: list[int]
    batch_size: int
    lr: float
    epochs: int | None = None
    warmup_epochs: float | None = None
    weight_decay: float | None = None
    ema_decay: float | None = None
    mask_loss: str | None = Field(None, description="Segmentation loss (training MASK_LOSSES); null: batch_dice.")
    missing_sequences: float | None = Field(
        None, description="Share of training slices shown without pre-/post-contrast (FLAIR in their place); null: 0."
    )
    augmentation: str | None = Field(
        None, description="standard, or scanner (also gamma, bias field, blur, coarser grid, noise); null: standard."
    )
    fill_background: float | None = Field(
        None, description="Share of training slices whose pre- or post-contrast background was filled; null: 0."
    )
    seed: int = Field(description="The --seed the run used.")
    autocast: str
    channels_last: bool
    init_encoder: str | None = Field(description="Checkpoint the encoder started from, or null.")
    pretrained: str | None = Field(description="ImageNet state dict given with --pretrained, or null: from scratch.")


class TrainingRun(CardModel):
    device: str | None = Field(description="Torch device the run trained on, from its checkpoint; null if unrecorded.")
    # Runs that picked a checkpoint by validation score (before the whole-schedule recipe) record it here.
    best_epoch: int | None = None
    best_validation_metric: float | None = None
    seconds_to_best_epoch: int | None = None
    epochs_run: int | None = None
    seconds_run: int | None = None
    final_validation: dict[str, float] | None = Field(
        None, description="Validation scores of the exported weights (the last epoch's), when the run had any."
    )
    hyperparameters: Hyperparameters


class ModelEntry(CardModel):
    file: str = Field(description="ONNX file name, relative to the card's folder.")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    architecture: str
    parameters: int
    gflops_per_slice: float
    input: TensorSpec
    output: TensorSpec
    threshold: float = Field(ge=0, description="Probability at or above which the output means tumor (above 1: never).")
    opset: int
    onnx_parity: OnnxParity
    training: TrainingRun


class Models(CardModel):
    classifier: ModelEntry
    segmenter: ModelEntry


class DetectionMetrics(CardModel):
    roc_auc: float = Field(
        description="Of tumor_probability as the card's postprocessing.tumor_probability reports it."
    )
    classifier_roc_auc: float | None = Field(None, description="Of the classifier's probability alone.")
    threshold: float = Field(description="The classifier's threshold.")
    # The 2026.11.23 card (exported from `evaluate`) counted the classifier's decision alone here.
    sensitivity: float = Field(description="Of tumor_detected (classifier >= threshold AND a non-empty mask).")
    specificity: float
    accuracy: float
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int


class SegmentationMetrics(CardModel):
    patients: int
    volume_dice_mean: float
    volume_dice_median: float
    volume_dice_by_patient: dict[str, float]
    tumor_slices: int
    tumor_slice_dice_mean: float


class SplitMetrics(CardModel):
    patients: int
    slices: int
    tumor_slices: int
    detection: DetectionMetrics
    segmentation_pipeline: SegmentationMetrics
    segmentation_segmenter_alone: SegmentationMetrics | None = None
    segmentation_pipeline_largest_3d_component: SegmentationMetrics | None = None


class MetricInterval(CardModel):
    estimate: float
    low: float
    high: float
    level: float = Field(0.95, gt=0, lt=1, description="Coverage of [low, high].")
    method: str = Field(description="How the interval was computed, e.g. 'patient bootstrap, 2000 resamples'.")


class CrossValidationFold(CardModel):
    fold: int = Field(ge=0)
    validation_patients: list[str]
    thresholds: dict[str, float] = Field(default_factory=dict, description="Per model kind, chosen in this fold.")
    metrics: dict[str, float] = Field(default_factory=dict, description="This fold's figures by name.")


class CrossValidation(CardModel):
    k: int = Field(ge=2, description="Number of folds.")
    patients: int
    seed: int
    folds: list[CrossValidationFold]
    pooled: dict[str, MetricInterval] = Field(description="Out-of-fold predictions pooled, by metric name.")
    threshold_selection: str = Field(description="How each fold's thresholds were chosen, on which patients.")


class Postprocessing(CardModel):
    min_component_pixels: int | None = Field(
        None, ge=0, description="Mask regions smaller than this are dropped; null = keep every region."
    )
    detection_rule: str | None = Field(None, description="When a slice counts as having a tumor, in words.")
    tumor_probability: TumorProbabilityRule | None = Field(
        None,
        description="What the reported tumor_probability holds: the classifier's probability, or both networks' "
        "evidence (app.core.postprocessing.tumor_probability); null: the classifier's probability.",
    )


class DataDescription(CardModel):
    dataset: str
    source: str
    patients: int
    slices: int
    tumor_slices: int
    split: str
    split_patients: dict[str, list[str]]
    split_slices: dict[str, int]


class ExportEnvironment(CardModel):
    machine: str
    processor: str
    torch: str
    cpu_threads: int


class ModelCardSchema(CardModel):
    name: str
    version: str
    created: str
    task: str
    pipeline: str
    input: InputSpec
    models: Models
    postprocessing: Postprocessing | None = None
    metrics: dict[str, SplitMetrics] | None = Field(
        None, description="By split: val, test (single-split evaluation); null for models trained on every patient."
    )
    cross_validation: CrossValidation | None = None
    data: DataDescription
    hardware: ExportEnvironment = Field(description="The machine export ran on (training devices: models.*.training).")
    intended_use: str
    limitations: list[str]
    citation: list[str]
    license: str

    @model_validator(mode="after")
    def shapes_match_input_size(self) -> Self:
        size = self.input.size
        for kind in MODEL_KINDS:
            shape = getattr(self.models, kind).input.shape
            if shape[1:] != [3, size, size]:
                raise ValueError(f"models.{kind}.input.shape {shape} does not match input.size {size} with 3 channels")
        return self

    @property
    def input_size(self) -> int:
        return self.input.size


def preprocessing_mismatches(card: ModelCardSchema) -> list[str]:
    """What the card's recorded preprocessing says that app/core/preprocessing.py does not do (empty: they agree)."""
    expected = {
        "channel_order": list(CHANNEL_ORDER),
        "normalization": NORMALIZATION,
        "preprocessing": PREPROCESSING_FUNCTION,
    }
    return [
        f"input.{key} is {getattr(card.input, key)!r}, the code's is {value!r}"
        for key, value in expected.items()
        if getattr(card.input, key) != value
    ]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_card(card: ModelCardSchema, folder: Path) -> Path:
    path = Path(folder) / CARD_FILE
    path.write_text(card.model_dump_json(indent=2, exclude_unset=True) + "\n")
    return path
