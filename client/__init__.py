"""vitserve client package: a typed gRPC client (`ViTClient`) and a CLI (`python -m client`).

The records it answers with are the wire records of proto/records/, the same classes the server answers from;
a few go by the client's names here (ParameterInfo, AttentionModule, UnplacedParameter, TrainStepResult).
"""
from client.client import ClientError, ViTClient
from proto.records.explain import (AttributeResult, Explanation, GraphNode, ImageAttribution, ParameterGradientPath,
                                   QkvPartGradient)
from proto.records.model import ClassScore, ModelInfo, ModelVersion, Prediction, PredictResult, Preprocessing
from proto.records.model import Parameter as ParameterInfo
from proto.records.model import QkvLayout as AttentionModule
from proto.records.model import Unplaced as UnplacedParameter
from proto.records.training import (
    CheckpointInfo,
    CheckpointList,
    EvalResult,
    GradientHistory,
    GradientSummary,
    HeadImportanceResult,
    HeadScores,
    LinearSchedule,
    OptimizerState,
    QkvGradient,
)
from proto.records.training import StepResult as TrainStepResult
from proto.tensors import tensor_from_proto, tensor_to_proto

__all__ = [
    "AttentionModule",
    "AttributeResult",
    "CheckpointInfo",
    "CheckpointList",
    "ClassScore",
    "ClientError",
    "EvalResult",
    "Explanation",
    "GradientHistory",
    "GradientSummary",
    "GraphNode",
    "HeadImportanceResult",
    "HeadScores",
    "ImageAttribution",
    "LinearSchedule",
    "ModelInfo",
    "ModelVersion",
    "OptimizerState",
    "ParameterGradientPath",
    "ParameterInfo",
    "Prediction",
    "PredictResult",
    "Preprocessing",
    "QkvGradient",
    "QkvPartGradient",
    "TrainStepResult",
    "UnplacedParameter",
    "ViTClient",
    "tensor_from_proto",
    "tensor_to_proto",
]
