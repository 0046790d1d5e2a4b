"""KServe v2 / Open Inference Protocol over gRPC: `inference.GRPCInferenceService` on vitserve's port.

Off-the-shelf v2 clients (tritonclient, KServe's, MLServer's) ask it for liveness, readiness and
metadata and run ModelInfer. Inference goes through the same data plane, validation and dynamic
batcher as Predict; the model version is the published version being served ("0" before any
Publish). Messages come from proto/open_inference.proto (why their package is not `inference` is
written there); this module registers them under the standard service name.
"""
from __future__ import annotations

from importlib import metadata

import grpc
import numpy as np

from engine.errors import InvalidArgument, NotFound
from proto import open_inference_pb2 as v2
from server.dataplane import DataPlane
from server.decode import FP32
from server.grpc_errors import grpc_errors

SERVICE_NAME = "inference.GRPCInferenceService"
PLATFORM = "onnxruntime_onnx"  # Triton's name for an ONNX model run by ONNX Runtime


def server_version() -> str:
    try:
        return metadata.version("vitserve")
    except metadata.PackageNotFoundError:  # running from a checkout that was not pip-installed
        return "unknown"


class InferenceServicer:
    """The v2 methods, over the same DataPlane as vitserve.v1.VitServe."""

    def __init__(self, plane: DataPlane):
        self.plane = plane
        m = plane.manifest
        self._input = v2.ModelMetadataResponse.TensorMetadata(name=m.input_name, datatype=FP32,
                                                              shape=[-1, *m.input_shape[1:]])
        self._output = v2.ModelMetadataResponse.TensorMetadata(name=m.output_name, datatype=FP32,
                                                               shape=[-1, m.num_classes])

    def _check_model(self, name: str, version: str) -> str:
        """The version string being served, or NotFound naming what is served instead."""
        served = str(self.plane.model_version)
        if name != self.plane.manifest.name:
            raise NotFound(f"model '{name}' is not served here; this server serves '{self.plane.manifest.name}'")
        if version not in ("", served):
            raise NotFound(f"model '{name}' version '{version}' is not served; the version being served is {served} "
                           "(leave the version empty for it)")
        return served

    @grpc_errors
    def ServerLive(self, request: v2.ServerLiveRequest, context) -> v2.ServerLiveResponse:
        return v2.ServerLiveResponse(live=True)

    @grpc_errors
    def ServerReady(self, request: v2.ServerReadyRequest, context) -> v2.ServerReadyResponse:
        return v2.ServerReadyResponse(ready=self.plane.ready)

    @grpc_errors
    def ModelReady(self, request: v2.ModelReadyRequest, context) -> v2.ModelReadyResponse:
        try:
            self._check_model(request.name, request.version)
        except NotFound:  # readiness is a question, not an error: another model or version is just not ready
            return v2.ModelReadyResponse(ready=False)
        return v2.ModelReadyResponse(ready=self.plane.ready)

    @grpc_errors
    def ServerMetadata(self, request: v2.ServerMetadataRequest, context) -> v2.ServerMetadataResponse:
        return v2.ServerMetadataResponse(name="vitserve", version=server_version(), extensions=[])

    @grpc_errors
    def ModelMetadata(self, request: v2.ModelMetadataRequest, context) -> v2.ModelMetadataResponse:
        version = self._check_model(request.name, request.version)
        return v2.ModelMetadataResponse(name=request.name, versions=[version], platform=PLATFORM,
                                        inputs=[self._input], outputs=[self._output])

    @grpc_errors
    def ModelInfer(self, request: v2.ModelInferRequest, context) -> v2.ModelInferResponse:
        self._check_model(request.model_name, request.model_version)
        images = self.plane.decoder.v2_images(request, self._input.name)
        for wanted in request.outputs:
            if wanted.name != self._output.name:
                raise InvalidArgument(f"outputs: unknown output '{wanted.name}'; the model's output is "
                                      f"'{self._output.name}'")
        version, logits = self.plane.logits(images)
        return v2.ModelInferResponse(
            model_name=request.model_name, model_version=str(version), id=request.id,
            outputs=[v2.ModelInferResponse.InferOutputTensor(name=self._output.name, datatype=FP32,
                                                             shape=list(logits.shape))],
            raw_output_contents=[np.ascontiguousarray(logits, dtype="<f4").tobytes()])


METHODS = {  # served method -> (request, response) message types
    "ServerLive": (v2.ServerLiveRequest, v2.ServerLiveResponse),
    "ServerReady": (v2.ServerReadyRequest, v2.ServerReadyResponse),
    "ModelReady": (v2.ModelReadyRequest, v2.ModelReadyResponse),
    "ServerMetadata": (v2.ServerMetadataRequest, v2.ServerMetadataResponse),
    "ModelMetadata": (v2.ModelMetadataRequest, v2.ModelMetadataResponse),
    "ModelInfer": (v2.ModelInferRequest, v2.ModelInferResponse),
}


def add_to_server(servicer: InferenceServicer, server: grpc.Server) -> None:
    """Register the v2 methods under `inference.GRPCInferenceService` (others answer UNIMPLEMENTED)."""
    handlers = {
        name: grpc.unary_unary_rpc_method_handler(getattr(servicer, name), request_deserializer=req.FromString,
                                                  response_serializer=resp.SerializeToString)
        for name, (req, resp) in METHODS.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
