"""The gRPC servicer: decode the request, call the data plane, encode the answer. No logic lives here.

`grpc_errors` is the one place where VitServeError subclasses become gRPC statuses.
"""
from __future__ import annotations

import functools
import json
import logging

import grpc

from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from server import codec
from server.dataplane import DataPlane
from server.errors import InvalidArgument, VitServeError

log = logging.getLogger(__name__)


def grpc_errors(method):
    """Map VitServeError to its status code and message; anything else to INTERNAL (logged with its traceback)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        try:
            return method(self, request, context)
        except VitServeError as e:
            context.abort(grpc.StatusCode[e.code], str(e))
        except Exception:
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed on the server; see its log")

    return wrapper


def dtype_name(tensor: pb.Tensor) -> str:
    """The DataType name, or the raw number for a value this server's proto does not know."""
    return pb.DataType.Name(tensor.dtype) if tensor.dtype in pb.DataType.values() else str(tensor.dtype)


def tensor_proto(array) -> pb.Tensor:
    dtype, shape, data = codec.encode_tensor(array)
    return pb.Tensor(dtype=pb.DataType.Value(dtype), shape=shape, data=data)


class VitServeServicer(vitserve_pb2_grpc.VitServeServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane

    def _images(self, images: pb.Images):
        source = images.WhichOneof("source")
        if source is None:
            raise InvalidArgument("images: none given (set images.tensor or images.encoded)")
        if source == "encoded":
            return self.plane.images_from_files(list(images.encoded.images))
        t = images.tensor
        return self.plane.images_from_tensor(dtype_name(t), list(t.shape), t.data)

    @grpc_errors
    def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        result = self.plane.predict(self._images(request.images), request.top_k, request.return_logits)
        response = pb.PredictResponse(predictions=[
            pb.Prediction(top=[pb.ClassScore(index=int(i), label=name, probability=float(p))
                               for i, name, p in zip(idx, names, probs)])
            for idx, names, probs in zip(result.indices, result.labels, result.probabilities)
        ])
        if result.logits is not None:
            response.logits.CopyFrom(tensor_proto(result.logits))
        return response

    @grpc_errors
    def TrainStep(self, request: pb.TrainStepRequest, context) -> pb.TrainStepResponse:
        images = self._images(request.images)
        if not request.HasField("labels"):
            raise InvalidArgument("labels: none given (an INT64 tensor [batch])")
        t = request.labels
        labels = self.plane.labels_from_tensor(dtype_name(t), list(t.shape), t.data, batch=len(images))
        r = self.plane.train_step(images, labels, summaries=not request.omit_gradient_summaries)
        return pb.TrainStepResponse(
            loss=r.loss, step=r.step, learning_rate=r.learning_rate, grad_norm=r.grad_norm, step_seconds=r.step_seconds,
            gradients=[pb.GradientSummary(**g.__dict__) for g in r.gradients],
            attention=[pb.QkvGradient(**a.__dict__) for a in r.attention],
        )

    @grpc_errors
    def GetModelInfo(self, request, context) -> pb.ModelInfo:
        info = self.plane.model_info()
        prep = info.pop("preprocessing")
        info["config_json"] = json.dumps(info.pop("config"))
        info["input_dtype"] = pb.FLOAT32
        info["parameters"] = [pb.ParameterInfo(**p) for p in info["parameters"]]
        return pb.ModelInfo(
            preprocessing=pb.Preprocessing(height=prep.height, width=prep.width, channels=prep.channels,
                                           mean=prep.mean, std=prep.std),
            **info,
        )
