"""`python -m training train/evaluate/export` end to end on synthetic data: tiny nets, one or two epochs."""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from app.core.config import Settings
from app.core.onnx_sessions import load_models, read_model_card
from app.core.pipeline import Pipeline
from app.core.preprocessing import preprocess_slice
from tests.training.conftest import TINY_TRAINING, TrainedRuns, copy_run, run_training
from tests.training.test_models import TORCHVISION_RESNET18_KEYS, torchvision_like_resnet18_state
from training.checkpoints import load_model, load_run
from training.dataset import find_slices, read_image, read_mask
from training.metrics import per_volume_dice, roc_auc

pytestmark = pytest.mark.slow
MODELS = ("classifier", "joint")


def train_args(trained: TrainedRuns, model: str, out: Path, *extra: str | Path) -> list[str | Path]:
    return [
        "train", "--model", model, "--data", trained.data, "--out", out, "--split", trained.split,
        "--cache-dir", trained.cache_dir, *TINY_TRAINING, *extra,
    ]  # fmt: skip


def history(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "history.json").read_text())


def test_train_writes_checkpoints_log_history_and_split(trained_runs: TrainedRuns) -> None:
    split = json.loads(trained_runs.split.read_text())
    patients = [name for part in ("train", "val", "test") for name in split[part]]
    assert len(patients) == len(set(patients)) == 10
    for model in MODELS:
        run_dir = trained_runs.runs / model
        assert [h["epoch"] for h in history(run_dir)] == [1]
        assert np.isfinite(history(run_dir)[0]["train_loss"])
        log = (run_dir / "train.log").read_text()
        assert f"{model}: 72 train slices (6 patients), 24 val slices (2 patients)" in log
        checkpoint = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=False)
        assert checkpoint["state"]["epoch"] == 1 and checkpoint["config"]["model"] == model
        assert {"optimizer", "rng"} <= set(checkpoint)
        exported, _ = load_model(run_dir / "model.pt")  # the moving average of the weights
        ema = checkpoint["ema"]
        for name, value in exported.state_dict().items():
            assert torch.equal(value, ema[f"module.{name}"]), name


@dataclass(frozen=True)
class Resumed:
    runs: Path
    log: str
    first_history: list[dict]
    first_checkpoint: dict


@pytest.fixture(scope="module")
def resumed(trained_runs: TrainedRuns, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Resumed]:
    """A copy of each one-epoch run, resumed with `--resume --epochs 2`."""
    result = {}
    for model in MODELS:
        runs = copy_run(trained_runs, tmp_path_factory.mktemp("resumed") / "runs")
        first_history = history(runs / model)
        first_checkpoint = torch.load(runs / model / "last.pt", map_location="cpu", weights_only=False)
        log = run_training(*train_args(trained_runs, model, runs, "--epochs", "2", "--resume"))
        result[model] = Resumed(runs / model, log, first_history, first_checkpoint)
    return result


@pytest.mark.parametrize("model", MODELS)
def test_resume_continues_from_the_last_checkpoint(resumed: dict[str, Resumed], model: str) -> None:
    run = resumed[model]
    assert "resumed from" in run.log and "at epoch 1" in run.log
    history_after = history(run.runs)
    assert [h["epoch"] for h in history_after] == [1, 2]  # epoch 2 was trained, epoch 1 not again
    assert history_after[0] == run.first_history[0]
    assert torch.load(run.runs / "last.pt", map_location="cpu", weights_only=False)["state"]["epoch"] == 2


@pytest.mark.parametrize("model", MODELS)
def test_resumed_epochs_still_learn(resumed: dict[str, Resumed], model: str) -> None:
    """Extending a run (`--resume --epochs 2` after `--epochs 1`) must train epoch 2 with a learning rate > 0,
    so the weights move. The restored cosine schedule keeps the old T_max (1), whose lr after epoch 1 is 0."""
    after = torch.load(resumed[model].runs / "last.pt", map_location="cpu", weights_only=False)["model"]
    before = resumed[model].first_checkpoint["model"]
    name = "conv1.weight" if model == "classifier" else "head.weight"  # the joint network's mask head
    assert not torch.equal(after[name], before[name])


def test_pretrained_loads_a_torchvision_checkpoint(trained_runs: TrainedRuns, tmp_path: Path) -> None:
    state = torchvision_like_resnet18_state(seed=5)
    torch.save(state, tmp_path / "resnet18.pth")
    # lr 0: the weights after one epoch are the loaded ones (BatchNorm statistics still move).
    log = run_training(
        *train_args(trained_runs, "classifier", tmp_path / "runs", "--pretrained", tmp_path / "resnet18.pth"),
        "--width", "64", "--lr", "0", "--epochs", "1",
    )  # fmt: skip
    assert f"loaded {len(TORCHVISION_RESNET18_KEYS) - 2} tensors" in log  # all but the 1000-class fc
    model, _ = load_model(tmp_path / "runs" / "classifier" / "model.pt")
    for name, parameter in model.named_parameters():
        if not name.startswith("fc."):
            assert torch.equal(parameter, state[name]), name


def test_segmenter_encoder_starts_from_the_trained_classifier(trained_runs: TrainedRuns, tmp_path: Path) -> None:
    classifier = trained_runs.runs / "classifier" / "model.pt"
    run_training(
        *train_args(trained_runs, "segmenter", tmp_path / "runs", "--init-encoder", classifier),
        "--lr", "0", "--epochs", "1",
    )  # fmt: skip
    segmenter, _ = load_model(tmp_path / "runs" / "segmenter" / "model.pt")
    classifier_model, _ = load_model(classifier)
    encoder = dict(segmenter.encoder.named_parameters())
    for name, parameter in classifier_model.named_parameters():
        if not name.startswith("fc."):
            assert torch.equal(encoder[name], parameter), name


def test_torchrun_two_cpu_processes(trained_runs: TrainedRuns, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    log = run_training(
        *train_args(trained_runs, "joint", tmp_path / "runs", "--epochs", "1"),  # both heads through DDP's forward
        launcher=(str(torchrun), "--standalone", "--nproc-per-node", "2", "-m"),
    )
    assert "world 2" in log
    assert [h["epoch"] for h in history(tmp_path / "runs" / "joint")] == [1]
    _, checkpoint = load_model(tmp_path / "runs" / "joint" / "last.pt")  # no DDP "module." prefix
    assert checkpoint["state"]["epoch"] == 1


def test_evaluate_then_export_then_onnx_runtime_matches_pytorch(trained_runs: TrainedRuns, tmp_path: Path) -> None:
    common = ["--runs", trained_runs.runs, "--data", trained_runs.data, "--split", trained_runs.split]
    common += ["--cache-dir", trained_runs.cache_dir]
    run_training("evaluate", *common, "--out", tmp_path / "evaluation")
    report = json.loads((tmp_path / "evaluation" / "report.json").read_text())
    assert set(report["thresholds"]) == {"classifier", "segmenter", "min_component_pixels"}
    for figure in report["figures"]:
        assert (tmp_path / "evaluation" / figure).stat().st_size > 1000

    run_training("export", *common, "--report", tmp_path / "evaluation" / "report.json", "--out", tmp_path / "models")
    card = json.loads((tmp_path / "models" / "model_card.json").read_text())
    assert card["input"]["size"] == 64
    assert card["postprocessing"]["min_component_pixels"] == report["thresholds"]["min_component_pixels"]
    # The service's path: decode, preprocess_slice, ONNX Runtime, on slices of the test patients.
    records = [r for r in find_slices(trained_runs.data) if r.patient in report["split_patients"]["test"]]
    images = np.stack([preprocess_slice(read_image(r.image_path), 64) for r in records])
    networks = load_run(trained_runs.runs)  # the joint run: its encoder is the classifier
    for kind in ("classifier", "segmenter"):
        entry = card["models"][kind]
        path = tmp_path / "models" / entry["file"]
        assert entry["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert entry["onnx_parity"]["differing_decisions"] == 0
        assert entry["training"]["hyperparameters"]["seed"] == 42 and entry["training"]["device"] == "cpu"
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [entry["input"]["name"]] == ["image"]
        assert [o.name for o in session.get_outputs()] == [entry["output"]["name"]]
        onnx_batch = session.run(None, {"image": images})[0]
        onnx_single = np.concatenate([session.run(None, {"image": images[i : i + 1]})[0] for i in range(3)])
        model = networks[kind][0]
        with torch.no_grad():
            torch_out = torch.sigmoid(model(torch.from_numpy(images))).numpy()
        assert onnx_batch.shape == torch_out.shape == ((len(images), 1) if kind == "classifier" else (24, 1, 64, 64))
        np.testing.assert_allclose(onnx_batch, torch_out, atol=1e-4)
        np.testing.assert_allclose(onnx_single, onnx_batch[:3], atol=1e-5)  # dynamic batch axis

    # The Dice evaluate reports is the Dice of the service's own answers: the exported models in app's Pipeline.
    settings = Settings(model_dir=tmp_path / "models", providers="CPUExecutionProvider", warmup_runs=0)
    pipeline = Pipeline(load_models(read_model_card(tmp_path / "models"), settings))
    answers = pipeline.predict_batch([read_image(r.image_path) for r in records])
    predicted = np.stack([a.mask if a.mask is not None else np.zeros((96, 96), bool) for a in answers])
    truths = np.stack([read_mask(r.mask_path) for r in records])
    service_dice = per_volume_dice(predicted, truths, np.array([r.patient for r in records]))
    reported = report["metrics"]["test"]["segmentation_pipeline"]["volume_dice_by_patient"]
    assert service_dice.keys() == reported.keys()
    for patient, dice in service_dice.items():
        assert dice == pytest.approx(reported[patient], abs=0.02), patient
    # Its detection figures are those of the service's tumor_probability and tumor_detected.
    labels = truths.reshape(len(truths), -1).any(axis=1)
    detection = report["metrics"]["test"]["detection"]
    assert detection["roc_auc"] == pytest.approx(
        roc_auc(np.array([a.tumor_probability for a in answers]), labels), abs=0.01
    )
    flags = np.array([a.tumor_detected for a in answers])
    assert detection["true_positives"] == pytest.approx((flags & labels).sum(), abs=1)
    assert detection["false_positives"] == pytest.approx((flags & ~labels).sum(), abs=1)
