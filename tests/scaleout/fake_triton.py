"""A stand-in for Triton Inference Server, for tests only: no Triton binary or Docker engine runs here.

It implements the KServe v2 gRPC service (tritonclient's own service_pb2_grpc stubs) over a model repository as
`lgg-tumor triton-export` writes it: each config.pbtxt is parsed into Triton's ModelConfig protobuf, and each
`<version>/model.onnx` runs in a real ONNX Runtime session. Like Triton it refuses unknown models, wrong input
names or shapes and batches above max_batch_size. What it does not do: Triton's own dynamic batching, instance
groups, GPUs, metrics.
"""

from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from app.core.triton import CONFIG_FILE, MODEL_FILE


@dataclass
class ServedModel:
    config: model_config_pb2.ModelConfig
    session: ort.InferenceSession


def load_repository(repository: Path) -> dict[str, ServedModel]:
    models = {}
    for config_path in sorted(repository.glob(f"*/{CONFIG_FILE}")):
        config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
        [version] = config.version_policy.specific.versions
        model_path = config_path.parent / str(version) / MODEL_FILE
        session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        models[config.name] = ServedModel(config, session)
    return models


class FakeTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, repository: Path) -> None:
        self.models = load_repository(repository)
        self.infer_requests: Counter[str] = Counter()  # model name -> ModelInfer calls answered

    def _model(self, name: str, context: grpc.ServicerContext) -> ServedModel:
        if name not in self.models:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{name}' is not found")
        return self.models[name]

    def ServerLive(self, request, context):
        return service_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=request.name in self.models)

    def ModelConfig(self, request, context):
        return service_pb2.ModelConfigResponse(config=self._model(request.name, context).config)

    def ModelInfer(self, request, context):
        model = self._model(request.model_name, context)
        feeds = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents, strict=True):
            [declared] = [i for i in model.config.input if i.name == tensor.name] or [None]
            shape = list(tensor.shape)
            if declared is None or tensor.datatype != "FP32" or shape[1:] != list(declared.dims):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"unexpected input {tensor.name} {shape}")
            if shape[0] > model.config.max_batch_size:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"batch {shape[0]} > {model.config.max_batch_size}")
            feeds[tensor.name] = np.frombuffer(raw, np.float32).reshape(shape)
        names = [o.name for o in request.outputs] or [o.name for o in model.config.output]
        response = service_pb2.ModelInferResponse(model_name=request.model_name, model_version="1", id=request.id)
        for name, array in zip(names, model.session.run(names, feeds), strict=True):
            response.outputs.add(name=name, datatype="FP32", shape=array.shape)
            response.raw_output_contents.append(np.ascontiguousarray(array, np.float32).tobytes())
        self.infer_requests[request.model_name] += 1
        return response


@dataclass
class RunningFake:
    url: str  # host:port, as LGG_TRITON_URL takes it
    servicer: FakeTriton
    server: grpc.Server  # server.stop(None) plays a Triton that went away


@contextmanager
def fake_triton(repository: Path) -> Iterator[RunningFake]:
    """A gRPC server on a free port serving the repository; stopped on exit."""
    servicer = FakeTriton(repository)
    limit = 256 * 1024 * 1024  # a batch of 128 float32 slices is 25 MB, above gRPC's 4 MB default
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=options)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield RunningFake(f"127.0.0.1:{port}", servicer, server)
    finally:
        server.stop(grace=None)
