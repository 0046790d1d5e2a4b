"""Typed Python client for the vitserve gRPC service (proto/vitserve.proto).

`ViTClient` wraps the VitServe stub: it turns numpy arrays and image files into
requests, turns responses into the wire records of proto/records/ (the same classes the server
answers from) through the one converter, proto/convert.py, and turns every gRPC failure
into a `ClientError` carrying the status code name and the server's message.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable, Union

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import vitserve_pb2, vitserve_pb2_grpc
from proto.convert import from_proto, to_proto
from proto.records.explain import AttributeResult, Explanation
from proto.records.model import ModelInfo, ModelVersion, PredictResult
from proto.records.training import (
    CheckpointInfo,
    CheckpointList,
    EvalResult,
    GradientHistory,
    HeadImportanceResult,
    LinearSchedule,
    OptimizerState,
)
from proto.records.training import StepResult as TrainStepResult
from proto.tensors import tensor_to_proto

DEFAULT_ADDRESS = "localhost:50051"
SERVICE = vitserve_pb2.DESCRIPTOR.services_by_name["VitServe"].full_name  # for health checks

ImageFile = Union[str, os.PathLike, bytes, bytearray, memoryview]
ImagesArg = Union[np.ndarray, ImageFile, Sequence[ImageFile]]


class ClientError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode name, `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def _schedule_arg(schedule: LinearSchedule | dict[str, Any]) -> LinearSchedule:
    """A LinearSchedule, or a dict with peak_lr, warmup_steps, decay_steps and optionally end_lr."""
    if isinstance(schedule, LinearSchedule):
        return schedule
    if isinstance(schedule, dict):
        unknown = set(schedule) - {f.name for f in dataclasses.fields(LinearSchedule)}
        if unknown:
            raise ValueError(f"schedule: unknown key(s) {', '.join(sorted(unknown))}")
        try:
            return LinearSchedule(**schedule)
        except TypeError as e:
            raise ValueError(f"schedule: {e}") from None
    raise TypeError(f"schedule must be a LinearSchedule or a dict, not {type(schedule).__name__}")


def _read_image(item: ImageFile) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, os.PathLike)):
        return Path(item).read_bytes()
    raise TypeError(f"an image must be a file path or encoded bytes, not {type(item).__name__}")


def images_to_proto(images: ImagesArg) -> vitserve_pb2.Images:
    """A numpy array becomes Images.tensor (own dtype); paths/bytes become Images.encoded."""
    if isinstance(images, np.ndarray):
        return vitserve_pb2.Images(tensor=tensor_to_proto(images))
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
        images = [images]
    encoded = [_read_image(item) for item in images]
    return vitserve_pb2.Images(encoded=vitserve_pb2.EncodedImages(images=encoded))


def labels_to_proto(labels: Any) -> vitserve_pb2.Tensor:
    """Class indices as an INT64 tensor. Non-integer labels are rejected here: converted, they would be
    truncated silently (1.7 -> 1), and the wire would carry the wrong labels."""
    array = np.asarray(labels)
    if array.size == 0 and array.dtype.kind == "f":
        array = array.astype("<i8")
    if array.dtype.kind not in "iu":
        raise ValueError(f"labels must be integer class indices, got dtype {array.dtype}")
    return tensor_to_proto(array.astype("<i8"))


class ViTClient:
    """Client for a VitServe server; use as a context manager or call close()."""

    def __init__(self, address: str | None = None, timeout: float | None = 30.0,
                 max_message_mb: int = 64, token: str | None = None,
                 tls_ca: str | os.PathLike | None = None, tls_cert: str | os.PathLike | None = None,
                 tls_key: str | os.PathLike | None = None) -> None:
        """`token`: bearer token sent with every call. `tls_ca` (PEM file of the CA that signed the server's
        certificate) makes the channel TLS; `tls_cert` and `tls_key` add a client certificate (mutual TLS)."""
        self.address = address or self.default_address()
        self.timeout = timeout
        token = (token or "").strip()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        limit = max_message_mb * 1024 * 1024
        options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if tls_ca is not None or tls_cert is not None:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca is not None else None,
                private_key=Path(tls_key).read_bytes() if tls_key is not None else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert is not None else None)
            self._channel = grpc.secure_channel(self.address, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(self.address, options=options)
        self._stub = vitserve_pb2_grpc.VitServeStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @staticmethod
    def default_address() -> str:
        """$VITSERVE_ADDRESS, else localhost:50051."""
        return os.environ.get("VITSERVE_ADDRESS") or DEFAULT_ADDRESS

    def __enter__(self) -> ViTClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        """Invoke one RPC, translating grpc.RpcError into ClientError."""
        try:
            return method(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") and e.code() is not None else "UNKNOWN"
            details = (e.details() if hasattr(e, "details") else None) or str(e)
            raise ClientError(code, details) from e

    def health(self, service: str = SERVICE) -> str:
        """The standard gRPC health status of `service` ("SERVING", "NOT_SERVING", ...)."""
        response = self._call(self._health.Check, health_pb2.HealthCheckRequest(service=service))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def model_info(self, model: str = "") -> ModelInfo:
        """The model `model` serves under that name ("": the only model, or the trainer's own)."""
        request = vitserve_pb2.GetModelInfoRequest(model=model)
        return from_proto(ModelInfo, self._call(self._stub.GetModelInfo, request))

    def predict(self, images: ImagesArg, top_k: int = 5, return_logits: bool = False,
                model: str = "") -> PredictResult:
        """Top-k classes per image of the model named `model` ("": the only model, or the trainer's own)."""
        if top_k < 0:  # top_k is a uint32 on the wire
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        request = vitserve_pb2.PredictRequest(images=images_to_proto(images), top_k=top_k,
                                              return_logits=return_logits, model=model)
        return from_proto(PredictResult, self._call(self._stub.Predict, request))

    def train_step(self, images: ImagesArg, labels: Any, summaries: bool = True,
                   accumulate_only: bool = False, head_importance: bool = False) -> TrainStepResult:
        """One training step; with accumulate_only the gradients are added up and the weights stay put
        until the next step without it. head_importance: also the step's head importance (of the weights
        before the update) in `.head_importance`."""
        request = vitserve_pb2.TrainStepRequest(images=images_to_proto(images),
                                                labels=labels_to_proto(labels),
                                                omit_gradient_summaries=not summaries,
                                                accumulate_only=accumulate_only,
                                                head_importance=head_importance)
        return from_proto(TrainStepResult, self._call(self._stub.TrainStep, request))

    def head_importance(self, images: ImagesArg, labels: Any) -> HeadImportanceResult:
        """Head importance of the current training weights on a labelled batch, per block and head; changes
        nothing (ClientError FAILED_PRECONDITION while gradients are being accumulated)."""
        request = vitserve_pb2.HeadImportanceRequest(images=images_to_proto(images), labels=labels_to_proto(labels))
        return from_proto(HeadImportanceResult, self._call(self._stub.HeadImportance, request))

    def gradient_history(self, first_step: int = 0, last_step: int = 0, parameter: str = "") -> GradientHistory:
        """The kept applied steps with first_step <= step <= last_step (0 leaves a side open), oldest first;
        `parameter`, a shell-style pattern ("*to_qkv*", "blocks.0.*"), keeps only the matching parameters'
        gradient summaries and the attention modules they belong to ("" keeps all)."""
        request = vitserve_pb2.GradientHistoryRequest(first_step=first_step, last_step=last_step, parameter=parameter)
        return from_proto(GradientHistory, self._call(self._stub.GetGradientHistory, request))

    def eval_step(self, images: ImagesArg, labels: Any) -> EvalResult:
        """Loss and accuracy of the current training weights on a labelled batch; changes nothing."""
        request = vitserve_pb2.EvalStepRequest(images=images_to_proto(images), labels=labels_to_proto(labels))
        return from_proto(EvalResult, self._call(self._stub.EvalStep, request))

    def get_optimizer(self) -> OptimizerState:
        return from_proto(OptimizerState, self._call(self._stub.GetOptimizer, vitserve_pb2.GetOptimizerRequest()))

    def set_optimizer(self, learning_rate: float | None = None,
                      schedule: LinearSchedule | dict[str, Any] | None = None,
                      clip_grad_norm: float | None = None) -> OptimizerState:
        """Change the learning rate (constant), the schedule and/or clipping; None leaves a setting as it is."""
        request = vitserve_pb2.SetOptimizerRequest()
        if learning_rate is not None:
            request.learning_rate = float(learning_rate)
        if schedule is not None:
            request.schedule.CopyFrom(to_proto(_schedule_arg(schedule)))
        if clip_grad_norm is not None:
            request.clip_grad_norm = float(clip_grad_norm)
        return from_proto(OptimizerState, self._call(self._stub.SetOptimizer, request))

    def save_checkpoint(self, name: str = "") -> CheckpointInfo:
        """Write a checkpoint; "" lets the server name it manual-<step>. An existing name is replaced."""
        response = self._call(self._stub.SaveCheckpoint, vitserve_pb2.SaveCheckpointRequest(name=name))
        return from_proto(CheckpointInfo, response)

    def list_checkpoints(self) -> CheckpointList:
        response = self._call(self._stub.ListCheckpoints, vitserve_pb2.ListCheckpointsRequest())
        return from_proto(CheckpointList, response)

    def restore_checkpoint(self, name: str) -> CheckpointInfo:
        """Replace the training state with checkpoint `name`'s (ClientError NOT_FOUND when unknown)."""
        response = self._call(self._stub.RestoreCheckpoint, vitserve_pb2.RestoreCheckpointRequest(name=name))
        return from_proto(CheckpointInfo, response)

    def publish(self) -> ModelVersion:
        """Make the current training weights the model Predict serves; returns the new version."""
        return from_proto(ModelVersion, self._call(self._stub.Publish, vitserve_pb2.PublishRequest()))

    def explain(self, parameter: str = "") -> Explanation:
        """Where the loss and each trainable parameter's gradient are computed ("" for all parameters)."""
        request = vitserve_pb2.ExplainGradientsRequest(parameter=parameter)
        return from_proto(Explanation, self._call(self._stub.ExplainGradients, request))

    def attribute(self, images: ImagesArg, targets: Sequence[int] | None = None, method: str = "rollout",
                  heads: bool = False, training_weights: bool = False, model: str = "") -> AttributeResult:
        """Which patches each image's prediction comes from: a map on the patch grid per image by `method`
        (rollout, chefer or gradxinput) for `targets` (one class per image; None: the predicted classes), on the
        served version or the trainer's current weights; `heads`: also each block's and head's map."""
        request = vitserve_pb2.AttributeRequest(images=images_to_proto(images), targets=list(targets or ()),
                                                method=method, heads=heads, training_weights=training_weights,
                                                model=model)
        return from_proto(AttributeResult, self._call(self._stub.Attribute, request))

    def fit(self, data: str | os.PathLike, out: str | os.PathLike = "fit-output", **options: Any) -> Any:
        """Fine-tune on DATA (an ImageFolder or a CSV of path,label) epoch by epoch; writes fit.json, the curve
        and the run's state into `out`. `options`: client.fit.FitOptions' fields (epochs, batch_size, seed,
        val_split or val, lr or schedule, augment, patience, publish, resume, strict, ...). A client.fit.FitResult."""
        from client.fit import fit

        return fit(self, data, out, **options)

    def evaluate(self, data: str | os.PathLike, **options: Any) -> Any:
        """Accuracy, top-k accuracy, per-class precision, recall and F1 and the confusion matrix of the model
        Predict serves on DATA (an ImageFolder or a CSV); a client.evaluate.Evaluation."""
        from client.evaluate import evaluate

        return evaluate(self, data, **options)

    def predict_folder(self, inputs: Sequence[str | os.PathLike], **options: Any) -> Any:
        """Classify files and every file below folders, in batches (csv_path: also write the table); a
        client.evaluate.FolderPredictions."""
        from client.evaluate import predict_folder

        return predict_folder(self, list(inputs), **options)
