"""vitserve client package: a typed gRPC client (`ViTClient`) and a CLI (`python -m client`)."""
from client.client import (
    ClientError,
    GradientSummary,
    ModelInfo,
    PredictResult,
    QkvGradient,
    TrainStepResult,
    ViTClient,
    tensor_from_proto,
    tensor_to_proto,
)

__all__ = [
    "ClientError",
    "GradientSummary",
    "ModelInfo",
    "PredictResult",
    "QkvGradient",
    "TrainStepResult",
    "ViTClient",
    "tensor_from_proto",
    "tensor_to_proto",
]
