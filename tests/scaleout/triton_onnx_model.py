"""A Triton Python-backend model that runs the exported `model.onnx` with ONNX Runtime.

Copied as `<model>/1/model.py` by tests/scaleout/test_triton_server.py: the tritonserver build that pip can
install (inside the nvidia-pytriton wheel) has only the Python backend, not the onnxruntime backend that
production Triton images carry. Everything else in the exported config.pbtxt is served as written.
"""

import itertools
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = config["input"][0]["name"]
        self.outputs = [output["name"] for output in config["output"]]

    def execute(self, requests: list) -> list:
        # Triton's dynamic batcher hands over several requests at once: one ONNX Runtime call, answers split back.
        arrays = [pb_utils.get_input_tensor_by_name(r, self.input).as_numpy() for r in requests]
        results = self.session.run(self.outputs, {self.input: np.concatenate(arrays)})
        bounds = itertools.pairwise(np.cumsum([0] + [len(a) for a in arrays]))
        return [
            pb_utils.InferenceResponse([pb_utils.Tensor(n, r[a:b]) for n, r in zip(self.outputs, results, strict=True)])
            for a, b in bounds
        ]
