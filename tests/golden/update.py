"""Writes the golden fixtures: `python -m tests.golden.update` (slices, only if missing) and expected.json.

Run it when the bundled models change on purpose (new training); the golden test then pins the new outputs.
The slices are synthetic phantoms (training/synthetic.py), saved as PNG so that a later change of the
generator does not change them; their three channels differ, so a channel-order mistake changes the outputs.
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.config import Settings
from app.core.onnx_sessions import load_models, read_model_card
from app.core.pipeline import Pipeline
from app.core.preprocessing import preprocess_slice
from training.synthetic import make_patient

HERE = Path(__file__).parent
MODELS = HERE.parents[1] / "models"
# (patient index, slice number, size): a slice through the tumor, one beside it, one tumor-free end slice.
SLICES = {"tumor.png": (0, 9, 160), "edge.png": (1, 5, 192), "no_tumor.png": (2, 0, 128)}


def read_slice(name: str) -> np.ndarray:
    with Image.open(HERE / name) as image:
        return np.asarray(image.convert("RGB"))


def outputs(model_dir: Path = MODELS) -> dict:
    """What the bundled models answer for each golden slice: the service's Pipeline plus the raw map."""
    card = read_model_card(model_dir)
    settings = Settings(model_dir=model_dir, providers="CPUExecutionProvider", warmup_runs=0)
    models = load_models(card, settings)
    pipeline = Pipeline(models)
    result = {}
    for name in SLICES:
        image = read_slice(name)
        [answer] = pipeline.predict_batch([image])
        probability_map = models.segmenter.run(preprocess_slice(image, card.input_size)[None])[0, 0]
        result[name] = {
            "tumor_probability": answer.tumor_probability,
            "tumor_detected": answer.tumor_detected,
            "area_pixels": int(answer.mask.sum()) if answer.mask is not None else 0,
            "segmenter_map_mean": float(probability_map.mean()),
            "segmenter_map_max": float(probability_map.max()),
        }
    return {"models": {kind: getattr(card, kind).sha256 for kind in ("classifier", "segmenter")}, "slices": result}


def main() -> None:
    for name, (index, number, size) in SLICES.items():
        if not (HERE / name).exists():
            Image.fromarray(make_patient(index, slices=12, size=size, seed=11).images[number]).save(HERE / name)
    (HERE / "expected.json").write_text(json.dumps(outputs(), indent=1) + "\n")


if __name__ == "__main__":
    main()
