"""The gRPC servicer: decode the request, call the data plane, encode the answer. No logic lives here.

`grpc_errors` is the one place where VitServeError subclasses become gRPC statuses.
"""
from __future__ import annotations

import functools
import json
import logging
import time
from dataclasses import asdict

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


def node_proto(node) -> pb.GraphNode:
    return pb.GraphNode(name=node.name, op_type=node.op_type, inputs=node.inputs, outputs=node.outputs)


def optimizer_proto(o) -> pb.OptimizerState:
    return pb.OptimizerState(optimizer=o.optimizer, learning_rate=o.learning_rate,
                             schedule=pb.LinearSchedule(**asdict(o.schedule)) if o.schedule else None,
                             schedule_position=o.schedule_position, clip_grad_norm=o.clip_grad_norm, step=o.step,
                             accumulated_batches=o.accumulated_batches)


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

    def _labelled(self, request):
        images = self._images(request.images)
        if not request.HasField("labels"):
            raise InvalidArgument("labels: none given (an INT64 tensor [batch])")
        t = request.labels
        return images, self.plane.labels_from_tensor(dtype_name(t), list(t.shape), t.data, batch=len(images))

    @grpc_errors
    def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        result = self.plane.predict(self._images(request.images), request.top_k, request.return_logits)
        response = pb.PredictResponse(model_version=result.model_version, predictions=[
            pb.Prediction(top=[pb.ClassScore(index=int(i), label=name, probability=float(p))
                               for i, name, p in zip(idx, names, probs)])
            for idx, names, probs in zip(result.indices, result.labels, result.probabilities)
        ])
        if result.logits is not None:
            response.logits.CopyFrom(tensor_proto(result.logits))
        return response

    @grpc_errors
    def TrainStep(self, request: pb.TrainStepRequest, context) -> pb.TrainStepResponse:
        images, labels = self._labelled(request)
        remaining = context.time_remaining()  # None without a client deadline
        r = self.plane.train_step(images, labels, summaries=not request.omit_gradient_summaries,
                                  accumulate_only=request.accumulate_only,
                                  deadline=time.monotonic() + remaining if remaining is not None else None)
        return pb.TrainStepResponse(
            loss=r.loss, step=r.step, learning_rate=r.learning_rate, grad_norm=r.grad_norm, step_seconds=r.step_seconds,
            gradients=[pb.GradientSummary(**asdict(g)) for g in r.gradients],
            attention=[pb.QkvGradient(**asdict(a)) for a in r.attention],
            applied=r.applied, skipped_reason=r.skipped_reason, accumulated_batches=r.accumulated_batches,
            clip_coefficient=r.clip_coefficient,
        )

    @grpc_errors
    def EvalStep(self, request: pb.EvalStepRequest, context) -> pb.EvalStepResponse:
        r = self.plane.eval_step(*self._labelled(request))
        return pb.EvalStepResponse(loss=r.loss, accuracy=r.accuracy, correct=r.correct, count=r.count, step=r.step)

    @grpc_errors
    def GetOptimizer(self, request, context) -> pb.OptimizerState:
        return optimizer_proto(self.plane.optimizer())

    @grpc_errors
    def SetOptimizer(self, request: pb.SetOptimizerRequest, context) -> pb.OptimizerState:
        schedule = None
        if request.HasField("schedule"):
            s = request.schedule
            schedule = dict(peak_lr=s.peak_lr, warmup_steps=s.warmup_steps, decay_steps=s.decay_steps, end_lr=s.end_lr)
        return optimizer_proto(self.plane.set_optimizer(
            request.learning_rate if request.HasField("learning_rate") else None, schedule,
            request.clip_grad_norm if request.HasField("clip_grad_norm") else None))

    @grpc_errors
    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context) -> pb.CheckpointInfo:
        return pb.CheckpointInfo(**asdict(self.plane.save_checkpoint(request.name)))

    @grpc_errors
    def ListCheckpoints(self, request, context) -> pb.ListCheckpointsResponse:
        checkpoints = self.plane.list_checkpoints()
        return pb.ListCheckpointsResponse(checkpoints=[pb.CheckpointInfo(**asdict(c)) for c in checkpoints],
                                          latest=checkpoints[-1].name if checkpoints else "")

    @grpc_errors
    def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest, context) -> pb.CheckpointInfo:
        return pb.CheckpointInfo(**asdict(self.plane.restore_checkpoint(request.name)))

    @grpc_errors
    def Publish(self, request, context) -> pb.ModelVersion:
        return pb.ModelVersion(**asdict(self.plane.publish()))

    @grpc_errors
    def ExplainGradients(self, request: pb.ExplainGradientsRequest, context) -> pb.ExplainGradientsResponse:
        e = self.plane.explain(request.parameter)
        return pb.ExplainGradientsResponse(
            loss=node_proto(e.loss), loss_gradient=node_proto(e.loss_gradient), forward_nodes=e.forward_nodes,
            backward_nodes=e.backward_nodes,
            parameters=[pb.ParameterGradientPath(
                name=p.name, shape=p.shape, block=p.block, sublayer=p.sublayer, gradient_tensor=p.gradient_tensor,
                gradient_node=node_proto(p.gradient_node), ops_from_loss=p.ops_from_loss,
                path=[node_proto(n) for n in p.path],
                qkv_parts=[pb.QkvPartGradient(part=q.part, tensor=q.tensor, gradient_tensor=q.gradient_tensor,
                                              gradient_node=node_proto(q.gradient_node)) for q in p.qkv_parts],
            ) for p in e.parameters])

    @grpc_errors
    def GetModelInfo(self, request, context) -> pb.ModelInfo:
        info = self.plane.model_info()
        prep = info.pop("preprocessing")
        info["config_json"] = json.dumps(info.pop("config"))
        info["input_dtype"] = pb.FLOAT32
        info["parameters"] = [pb.ParameterInfo(**p) for p in info["parameters"]]
        info["versions"] = [pb.ModelVersion(**asdict(v)) for v in info["versions"]]
        return pb.ModelInfo(
            preprocessing=pb.Preprocessing(height=prep.height, width=prep.width, channels=prep.channels,
                                           mean=prep.mean, std=prep.std),
            **info,
        )
