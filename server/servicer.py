"""The vitserve.v1 gRPC servicer: decode the request, call the registry or the trainer, convert the answer. No logic
lives here.

Requests become validated batches in server/decode.py, records become messages in proto/convert.py,
and errors become statuses in server/grpc_errors.py.
"""
from __future__ import annotations

import time

from proto import vitserve_pb2 as pb
from proto import vitserve_pb2_grpc
from proto.convert import from_proto, to_proto
from proto.records.training import LinearSchedule
from server.dataplane import DataPlane
from server.grpc_errors import grpc_errors


def _optional(request, name: str):
    """An `optional` scalar field's value, or None when it was not sent."""
    return getattr(request, name) if request.HasField(name) else None


class VitServeServicer(vitserve_pb2_grpc.VitServeServicer):
    def __init__(self, plane: DataPlane):
        self.plane = plane
        self.registry = plane.registry

    @grpc_errors
    def Predict(self, request: pb.PredictRequest, context) -> pb.PredictResponse:
        return to_proto(self.registry.predict(request.model, lambda model: model.decoder.images(request.images),
                                              request.top_k, request.return_logits))

    @grpc_errors
    def TrainStep(self, request: pb.TrainStepRequest, context) -> pb.TrainStepResponse:
        trainer = self.plane.trainer("train step")
        images, labels = trainer.batches.labelled(request)
        remaining = context.time_remaining()  # None without a client deadline
        return to_proto(trainer.train_step(
            images, labels, summaries=not request.omit_gradient_summaries, accumulate_only=request.accumulate_only,
            deadline=time.monotonic() + remaining if remaining is not None else None,
            head_importance=request.head_importance))

    @grpc_errors
    def HeadImportance(self, request: pb.HeadImportanceRequest, context) -> pb.HeadImportanceResponse:
        trainer = self.plane.trainer("head importance")
        return to_proto(trainer.head_importance(*trainer.batches.labelled(request)))

    @grpc_errors
    def GetGradientHistory(self, request: pb.GradientHistoryRequest, context) -> pb.GradientHistoryResponse:
        return to_proto(self.plane.trainer("gradient history").gradient_history(
            request.first_step, request.last_step, request.parameter))

    @grpc_errors
    def EvalStep(self, request: pb.EvalStepRequest, context) -> pb.EvalStepResponse:
        trainer = self.plane.trainer("eval step")
        return to_proto(trainer.eval_step(*trainer.batches.labelled(request)))

    @grpc_errors
    def GetOptimizer(self, request, context) -> pb.OptimizerState:
        return to_proto(self.plane.trainer("optimizer").optimizer())

    @grpc_errors
    def SetOptimizer(self, request: pb.SetOptimizerRequest, context) -> pb.OptimizerState:
        trainer = self.plane.trainer("set optimizer")
        schedule = from_proto(LinearSchedule, request.schedule) if request.HasField("schedule") else None
        return to_proto(trainer.set_optimizer(_optional(request, "learning_rate"), schedule,
                                              _optional(request, "clip_grad_norm")))

    @grpc_errors
    def SaveCheckpoint(self, request: pb.SaveCheckpointRequest, context) -> pb.CheckpointInfo:
        return to_proto(self.plane.trainer("save checkpoint").save_checkpoint(request.name))

    @grpc_errors
    def ListCheckpoints(self, request, context) -> pb.ListCheckpointsResponse:
        return to_proto(self.plane.trainer("list checkpoints").list_checkpoints())

    @grpc_errors
    def RestoreCheckpoint(self, request: pb.RestoreCheckpointRequest, context) -> pb.CheckpointInfo:
        return to_proto(self.plane.trainer("restore checkpoint").restore_checkpoint(request.name))

    @grpc_errors
    def Publish(self, request, context) -> pb.ModelVersion:
        return to_proto(self.plane.trainer("publish").publish())

    @grpc_errors
    def ExplainGradients(self, request: pb.ExplainGradientsRequest, context) -> pb.ExplainGradientsResponse:
        return to_proto(self.plane.trainer("explain").explain(request.parameter))

    @grpc_errors
    def Attribute(self, request: pb.AttributeRequest, context) -> pb.AttributeResponse:
        return to_proto(self.plane.attribute(request.model, request.images, list(request.targets) or None,
                                             request.method, request.heads, request.training_weights))

    @grpc_errors
    def GetModelInfo(self, request, context) -> pb.ModelInfo:
        return to_proto(self.plane.model_info(request.model))
