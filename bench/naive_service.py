"""The naive baseline the serving benchmark compares against: FastAPI + PyTorch eager, as tutorials end.

One request, one forward pass of each network, no batching, no ONNX Runtime; both networks run on
every slice. The handler is `async def` and computes on the event loop, as tutorials write it: requests
are served one at a time, which on 2 cores is also the fastest way for eager PyTorch (threads would
oversubscribe the cores). The networks have the architectures, widths and blocks of the bundled model
card, with random weights: the timing does not depend on the weight values.

    LGG_MODEL_DIR=models uvicorn bench.naive_service:app
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, UploadFile
from PIL import Image

from app.core.codecs import mask_to_rle
from app.core.preprocessing import mask_to_input_size, preprocess_slice
from training.networks import build_model

card = json.loads((Path(os.environ.get("LGG_MODEL_DIR", "models")) / "model_card.json").read_text())
size = card["input"]["size"]


def random_network(kind: str) -> torch.nn.Module:
    hyperparameters = card["models"][kind]["training"]["hyperparameters"]
    return build_model(kind, hyperparameters["width"], tuple(hyperparameters["blocks"])).eval()


torch.manual_seed(0)
classifier, segmenter = random_network("classifier"), random_network("segmenter")
classifier_threshold = card["models"]["classifier"]["threshold"]
segmenter_threshold = card["models"]["segmenter"]["threshold"]

app = FastAPI(title="Naive baseline: FastAPI + PyTorch eager")


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "alive"}


@app.post("/v1/predict")
async def predict(file: UploadFile) -> dict:
    image = np.asarray(Image.open(io.BytesIO(await file.read())).convert("RGB"))
    x = torch.from_numpy(preprocess_slice(image, size))[None]
    with torch.no_grad():
        tumor_probability = torch.sigmoid(classifier(x))[0, 0].item()
        tumor_probability_map = torch.sigmoid(segmenter(x))[0, 0].numpy()
    mask = mask_to_input_size(tumor_probability_map, *image.shape[:2], segmenter_threshold)
    tumor_detected = tumor_probability >= classifier_threshold
    return {
        "tumor_detected": tumor_detected,
        "tumor_probability": tumor_probability,
        "mask": mask_to_rle(mask) if tumor_detected else None,
        "area_pixels": int(mask.sum()) if tumor_detected else 0,
    }
