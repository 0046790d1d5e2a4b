"""KServe v2 / Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on vitserve's port.

Off-the-shelf v2 clients (tritonclient, KServe's, MLServer's) ask it for liveness, readiness and
metadata and run ModelInfer; Triton's extensions that a one-model server can answer are served too:
ModelConfig (the Triton configuration `python -m engine.store.triton` writes), ModelStatistics (measured
on the inference path) and RepositoryIndex (the versions and their states). Inference goes through
the same data plane, validation and dynamic batcher as Predict; the model version is the published
version being served ("0" before any Publish). Every other method of Triton's service answers
UNIMPLEMENTED saying that vitserve does not support it, and why.

Messages come from proto/open_inference.proto (why their package is not `inference` is written
there); this module registers them under the standard service name, and server/reflection.py
describes the same methods (METHODS) to reflection clients.
"""
from __future__ import annotations

from importlib import metadata

import grpc
import numpy as np

from engine.errors import InvalidArgument, NotFound, Unimplemented
from proto import open_inference_pb2 as v2
from proto.convert import to_proto
from server.dataplane import DataPlane
from server.decode import FP32
from server.grpc_errors import grpc_errors
from server.models import ServedModel

SERVICE_NAME = "inference.GRPCInferenceService"
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX model run by ONNX Runtime
# Triton's names of the extensions served: ModelConfig, ModelStatistics, RepositoryIndex (the index only)
EXTENSIONS = ("model_configuration", "statistics", "model_repository")


def server_name(role: str) -> str:
    """The v2 server name: "vitserve", or "vitserve-train" / "vitserve-predict" for a replica of a fleet."""
    return "vitserve" if role == "all" else f"vitserve-{role}"


def server_version() -> str:
    try:
        return metadata.version("vitserve")
    except metadata.PackageNotFoundError:  # running from a checkout that was not pip-installed
        return "unknown"


def tensor_metadata(model: ServedModel) -> tuple[v2.ModelMetadataResponse.TensorMetadata, ...]:
    """The model's input and output as v2 metadata (the batch axis is -1)."""
    m = model.manifest
    return (v2.ModelMetadataResponse.TensorMetadata(name=m.input_name, datatype=FP32, shape=[-1, *m.input_shape[1:]]),
            v2.ModelMetadataResponse.TensorMetadata(name=m.output_name, datatype=FP32, shape=[-1, m.num_classes]))


class InferenceServicer:
    """The v2 methods, over the same DataPlane as vitserve.v1.VitServe."""

    def __init__(self, plane: DataPlane):
        self.registry = plane.registry

    @grpc_errors
    def ServerLive(self, request: v2.ServerLiveRequest, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @grpc_errors
    def ServerReady(self, request: v2.ServerReadyRequest, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.registry.ready)

    @grpc_errors
    def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        try:
            self.registry.v2_model(request.name, request.version)
        except NotFound:  # readiness is a question, not an error: another model or version is just not ready
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=self.registry.ready)

    @grpc_errors
    def ServerMetadata(self, request: v2.ServerMetadataRequest, context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name=server_name(self.registry.settings.role), version=server_version(),
                                         extensions=EXTENSIONS)

    @grpc_errors
    def ModelMetadata(self, request: v2.ModelMetadataRequest, context) -> v2.ModelMetadataResponse:
        model, version = self.registry.v2_model(request.name, request.version)
        inputs, outputs = tensor_metadata(model)
        return v2.ModelMetadataResponse(name=request.name, versions=[version], platform=PLATFORM,
                                        inputs=[inputs], outputs=[outputs])

    @grpc_errors
    def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        model, _ = self.registry.v2_model(request.model_name, request.model_version)
        output = model.manifest.output_name

        def decode(model) -> np.ndarray:
            images = model.decoder.v2_images(request, model.manifest.input_name)
            for wanted in request.outputs:
                if wanted.name != output:
                    raise InvalidArgument(f"outputs: unknown output '{wanted.name}'; the model's output is "
                                          f"'{output}'")
            return images

        version, logits = self.registry.infer(request.model_name, request.model_version, decode)
        return v2.ModelInferResponse(
            model_name=request.model_name, model_version=str(version), id=request.id,
            outputs=[v2.ModelInferResponse.InferOutputTensor(name=output, datatype=FP32, shape=list(logits.shape))],
            raw_output_contents=[np.ascontiguousarray(logits, dtype="<f4").tobytes()])

    @grpc_errors
    def ModelConfig(self, request: v2.ModelConfigRequest, context) -> v2.ModelConfigResponse:
        self.registry.v2_model(request.name, request.version)
        return v2.ModelConfigResponse(config=self.registry.triton_config(request.name))

    @grpc_errors
    def ModelStatistics(self, request: v2.ModelStatisticsRequest, context) -> v2.ModelStatisticsResponse:
        return to_proto(self.registry.model_statistics(request.name, request.version))

    @grpc_errors
    def RepositoryIndex(self, request: v2.RepositoryIndexRequest, context) -> v2.RepositoryIndexResponse:
        return to_proto(self.registry.repository_index(request.repository_name, request.ready))


METHODS = {  # served method -> (request, response) message types
    "ServerLive": (v2.ServerLiveRequest, v2.ServerLiveResponse),
    "ServerReady": (v2.ServerReadyRequest, v2.ServerReadyResponse),
    "ModelReady": (v2.ModelReadyRequest, v2.ModelReadyResponse),
    "ServerMetadata": (v2.ServerMetadataRequest, v2.ServerMetadataResponse),
    "ModelMetadata": (v2.ModelMetadataRequest, v2.ModelMetadataResponse),
    "ModelInfer": (v2.ModelInferRequest, v2.ModelInferResponse),
    "ModelConfig": (v2.ModelConfigRequest, v2.ModelConfigResponse),
    "ModelStatistics": (v2.ModelStatisticsRequest, v2.ModelStatisticsResponse),
    "RepositoryIndex": (v2.RepositoryIndexRequest, v2.RepositoryIndexResponse),
}

_ONE_MODEL = ("vitserve loads models itself: a trainer serves its own (vitserve.v1 Publish changes the version), a "
              "predict replica follows its --model-repository (poll mode)")
_IN_MESSAGES = "tensors travel in the request and response messages"
UNSUPPORTED = {  # the rest of Triton's service -> why vitserve does not serve it
    "ModelStreamInfer": "use ModelInfer (one request, one response)",
    "RepositoryModelLoad": _ONE_MODEL,
    "RepositoryModelUnload": _ONE_MODEL,
    "SystemSharedMemoryStatus": _IN_MESSAGES,
    "SystemSharedMemoryRegister": _IN_MESSAGES,
    "SystemSharedMemoryUnregister": _IN_MESSAGES,
    "CudaSharedMemoryStatus": _IN_MESSAGES,
    "CudaSharedMemoryRegister": _IN_MESSAGES,
    "CudaSharedMemoryUnregister": _IN_MESSAGES,
    "TraceSetting": "every RPC is logged with its duration and request id instead (--log-json for JSON lines)",
    "LogSettings": "logging is set at startup (--log-level, --log-json)",
}
STREAMING = {"ModelStreamInfer"}  # bidirectional streams; the others are unary


class Unsupported:
    """A method of Triton's service that vitserve does not serve: UNIMPLEMENTED, saying so and why."""

    def __init__(self, method: str) -> None:
        self.method = method

    @grpc_errors
    def __call__(self, request, context):
        raise Unimplemented(f"{self.method} is not supported by vitserve: {UNSUPPORTED[self.method]}")


def add_to_server(servicer: InferenceServicer, server: grpc.Server) -> None:
    """Register the v2 methods under `inference.GRPCInferenceService`, and UNSUPPORTED's answering UNIMPLEMENTED."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=req.FromString,
                                                  response_serializer=resp.SerializeToString)
        for name, (req, resp) in METHODS.items()
    }
    for name in UNSUPPORTED:  # the request is never read: no deserializer
        kind = grpc.stream_stream_rpc_method_handler if name in STREAMING else grpc.unary_unary_rpc_method_handler
        handlers[name] = kind(Unsupported(name))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
