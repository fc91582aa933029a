"""Triton Inference Server: the model repository export, and a session that runs the networks on a Triton.

With `LGG_TRITON_URL=host:8001` the service keeps decoding, preprocessing and postprocessing and sends only the
(N,3,S,S) float32 tensors to Triton over gRPC (KServe v2 protocol), so many service replicas share a pool of
GPUs. `TritonModel` is the seam: a session-like object with the same `run(images) -> np.ndarray` as OnnxModel.

`write_repository` writes what Triton loads (`tritonserver --model-repository=OUT`):
  OUT/lgg_classifier/config.pbtxt, OUT/lgg_classifier/1/model.onnx, and the same for lgg_segmenter.
Each config.pbtxt is built as Triton's own ModelConfig protobuf (tritonclient ships model_config_pb2) and
records the ONNX file's sha256: a service only talks to a Triton serving the export its model card names.
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.core.onnx_sessions import ModelCard, ModelFolderError, ModelSpec

MODEL_NAME_PREFIX = "lgg_"
MODEL_FILE = "model.onnx"  # Triton's default file name for the onnxruntime backend
CONFIG_FILE = "config.pbtxt"
SHA256_PARAMETER = "lgg_onnx_sha256"
ONNX_TO_TRITON_TYPE = {"tensor(float)": "TYPE_FP32", "tensor(float16)": "TYPE_FP16"}


def model_name(kind: str) -> str:
    return f"{MODEL_NAME_PREFIX}{kind}"


@dataclass(frozen=True)
class RepositoryOptions:
    max_batch_size: int = 128  # the batch the H100 run found fastest for both networks
    max_queue_delay_us: int = 100  # how long Triton's dynamic batcher waits to fill a batch
    instances: int = 1  # model instances (ONNX Runtime sessions) per device
    kind: str = "KIND_GPU"  # or KIND_CPU
    version: int = 1


def model_config(spec: ModelSpec, options: RepositoryOptions):  # -> model_config_pb2.ModelConfig
    """Triton's ModelConfig for one ONNX file, tensors as the file declares them (batch axis left out)."""
    import onnxruntime as ort
    from tritonclient.grpc import model_config_pb2 as pb

    session = ort.InferenceSession(str(spec.path), providers=["CPUExecutionProvider"])
    config = pb.ModelConfig(
        name=model_name(spec.kind),
        backend="onnxruntime",
        max_batch_size=options.max_batch_size,
        version_policy=pb.ModelVersionPolicy(specific=pb.ModelVersionPolicy.Specific(versions=[options.version])),
        dynamic_batching=pb.ModelDynamicBatching(max_queue_delay_microseconds=options.max_queue_delay_us),
        instance_group=[
            pb.ModelInstanceGroup(count=options.instances, kind=pb.ModelInstanceGroup.Kind.Value(options.kind))
        ],
        parameters={SHA256_PARAMETER: pb.ModelParameter(string_value=spec.sha256)},
    )
    for tensors, field in ((session.get_inputs(), config.input), (session.get_outputs(), config.output)):
        for tensor in tensors:
            if tensor.type not in ONNX_TO_TRITON_TYPE or not all(isinstance(d, int) for d in tensor.shape[1:]):
                raise ModelFolderError(f"{spec.path}: {tensor.name} is {tensor.type} {tensor.shape}, not exportable")
            field.add(name=tensor.name, data_type=ONNX_TO_TRITON_TYPE[tensor.type], dims=tensor.shape[1:])
    # Triton runs these before it reports the model ready: no slow first request per batch size.
    for batch_size in sorted({1, options.max_batch_size}):
        warmup = config.model_warmup.add(name=f"zeros_batch_{batch_size}", batch_size=batch_size)
        for tensor in config.input:
            warmup.inputs[tensor.name].CopyFrom(
                pb.ModelWarmup.Input(data_type=tensor.data_type, dims=tensor.dims, zero_data=True)
            )
    return config


def write_repository(card: ModelCard, out: Path, options: RepositoryOptions) -> list[Path]:
    """Both networks as a Triton model repository under out; returns the config files written."""
    from google.protobuf import text_format

    written = []
    for spec in (card.classifier, card.segmenter):
        config = model_config(spec, options)
        folder = out / config.name
        (folder / str(options.version)).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec.path, folder / str(options.version) / MODEL_FILE)
        (folder / CONFIG_FILE).write_text(text_format.MessageToString(config))
        written.append(folder / CONFIG_FILE)
    return written


class TritonUnavailable(RuntimeError):
    """A Triton call failed (unreachable, timed out, refused): the service answers 503, the client may retry."""


class TritonModel:
    """One network served by Triton; run() takes (N,3,S,S) float32 and returns the network's output, like OnnxModel."""

    def __init__(self, spec: ModelSpec, url: str, max_batch_size: int, timeout_s: float) -> None:
        import tritonclient.grpc as grpcclient
        from tritonclient.utils import InferenceServerException

        self.spec, self.name, self.url, self.timeout_s = spec, model_name(spec.kind), url, timeout_s
        self.providers = [f"triton:{url}/{self.name}"]
        self._grpc = grpcclient  # imported here, not at module level: only a service with a Triton needs it
        self._client = grpcclient.InferenceServerClient(url)
        try:
            ready = self._client.is_model_ready(self.name, client_timeout=timeout_s)
            config = self._client.get_model_config(self.name, client_timeout=timeout_s).config
        except InferenceServerException as error:
            raise ModelFolderError(f"Triton at {url} cannot serve {self.name}: {error.message()}") from error
        served = config.parameters[SHA256_PARAMETER].string_value if SHA256_PARAMETER in config.parameters else None
        if not ready or served != spec.sha256:
            raise ModelFolderError(
                f"Triton at {url}: {self.name} is {'ready' if ready else 'not ready'} with ONNX sha256 {served}, "
                f"the model card names {spec.sha256}: export the card's models with `lgg-tumor triton-export`"
            )
        if config.max_batch_size < max_batch_size:
            raise ModelFolderError(
                f"Triton at {url}: {self.name} takes batches of at most {config.max_batch_size}, "
                f"the service sends up to LGG_MAX_BATCH_SIZE={max_batch_size}"
            )

    def run(self, images: np.ndarray) -> np.ndarray:
        from tritonclient.utils import InferenceServerException

        tensor = self._grpc.InferInput(self.spec.input_name, list(images.shape), "FP32")
        tensor.set_data_from_numpy(np.ascontiguousarray(images, np.float32))
        output = self._grpc.InferRequestedOutput(self.spec.output_name)
        try:
            result = self._client.infer(self.name, [tensor], outputs=[output], client_timeout=self.timeout_s)
        except InferenceServerException as error:
            raise TritonUnavailable(f"the inference server (Triton at {self.url}) failed: {error.message()}") from error
        return result.as_numpy(self.spec.output_name)
