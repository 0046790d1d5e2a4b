"""Typed Python client for the vitserve gRPC service (proto/vitserve.proto).

`ViTClient` wraps the VitServe stub: it turns numpy arrays and image files into
requests, turns responses into plain dataclasses, and turns every gRPC failure
into a `ClientError` carrying the status code name and the server's message.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Union

import grpc
import numpy as np

from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import vitserve_pb2, vitserve_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"
SERVICE = vitserve_pb2.DESCRIPTOR.services_by_name["VitServe"].full_name  # for health checks

# DataType enum <-> little-endian numpy dtype.
_DTYPES: dict[int, np.dtype] = {
    vitserve_pb2.FLOAT32: np.dtype("<f4"),
    vitserve_pb2.FLOAT64: np.dtype("<f8"),
    vitserve_pb2.FLOAT16: np.dtype("<f2"),
    vitserve_pb2.INT64: np.dtype("<i8"),
    vitserve_pb2.INT32: np.dtype("<i4"),
    vitserve_pb2.UINT8: np.dtype("u1"),
}

ImageFile = Union[str, os.PathLike, bytes, bytearray, memoryview]
ImagesArg = Union[np.ndarray, ImageFile, Sequence[ImageFile]]


class ClientError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode name, `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def tensor_to_proto(array: np.ndarray) -> vitserve_pb2.Tensor:
    """Encode an array as a Tensor in its own dtype (raw little-endian, C order)."""
    array = np.asarray(array)
    for enum, dtype in _DTYPES.items():
        if array.dtype.kind == dtype.kind and array.dtype.itemsize == dtype.itemsize:
            data = np.ascontiguousarray(array, dtype=dtype).tobytes()
            return vitserve_pb2.Tensor(dtype=enum, shape=array.shape, data=data)
    supported = ", ".join(str(d.newbyteorder("=")) for d in _DTYPES.values())
    raise ValueError(f"unsupported tensor dtype {array.dtype}; supported: {supported}")


def tensor_from_proto(tensor: vitserve_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor into a (writable, native byte order) numpy array."""
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"tensor has unsupported dtype {tensor.dtype}")
    dtype = _DTYPES[tensor.dtype]
    shape = tuple(tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(f"tensor of shape {list(shape)} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def _jsonable(value: Any) -> Any:
    """Recursively turn numpy arrays/scalars and tuples into JSON-friendly values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


class _AsDict:
    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-serializable dict (arrays become nested lists)."""
        return _jsonable(dataclasses.asdict(self))  # type: ignore[call-overload]


@dataclass
class ModelVersion(_AsDict):
    """One inference model version: 0 is the exported model, each Publish adds one."""
    version: int
    step: int
    created_unix: float


@dataclass
class ModelInfo(_AsDict):
    name: str
    config: dict[str, Any]
    input_name: str
    input_shape: tuple[int, ...]
    input_dtype: str
    preprocessing: dict[str, Any]
    class_names: list[str]
    parameters: list[dict[str, Any]]
    execution_providers: list[str]
    device: str
    opset: int
    optimizer: str
    step: int
    learning_rate: float
    max_batch_size: int
    export_versions: dict[str, str]
    loss_node: str
    loss_op_type: str
    model_version: int = 0
    versions: list[ModelVersion] = field(default_factory=list)
    checkpoint_every_steps: int = 0
    checkpoint_every_seconds: float = 0.0
    publish_every_steps: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class PredictResult(_AsDict):
    predictions: list[list[tuple[int, str, float]]]
    logits: np.ndarray | None = None
    model_version: int = 0


@dataclass
class GradientSummary(_AsDict):
    name: str
    shape: tuple[int, ...]
    l2_norm: float
    mean: float
    std: float
    min: float
    max: float
    max_abs: float
    zero_fraction: float
    nonfinite_count: int
    param_norm: float
    update_ratio: float


@dataclass
class QkvGradient(_AsDict):
    name: str
    block: int
    heads: int
    dim_head: int
    q_norm: float
    k_norm: float
    v_norm: float
    q_head_norms: tuple[float, ...]
    k_head_norms: tuple[float, ...]
    v_head_norms: tuple[float, ...]


@dataclass
class TrainStepResult(_AsDict):
    loss: float
    step: int
    learning_rate: float
    grad_norm: float
    step_seconds: float
    gradients: list[GradientSummary] = field(default_factory=list)
    attention: list[QkvGradient] = field(default_factory=list)
    applied: bool = True
    skipped_reason: str = ""
    accumulated_batches: int = 1
    clip_coefficient: float = 1.0

    @property
    def status(self) -> str:
        """'applied', 'accumulated (n batches)' or 'SKIPPED: reason'."""
        if self.applied:
            return "applied"
        if self.skipped_reason:
            return f"SKIPPED: {self.skipped_reason}"
        n = self.accumulated_batches
        return f"accumulated ({n} batch{'es' if n != 1 else ''})"


@dataclass
class EvalResult(_AsDict):
    """Loss and accuracy of the training weights on one labelled batch (EvalStep)."""
    loss: float
    accuracy: float
    correct: int
    count: int
    step: int


@dataclass
class LinearSchedule(_AsDict):
    """Linear warmup from 0 to peak_lr over warmup_steps, then linear decay to end_lr over decay_steps."""
    peak_lr: float
    warmup_steps: int
    decay_steps: int
    end_lr: float = 0.0

    def to_proto(self) -> vitserve_pb2.LinearSchedule:
        return vitserve_pb2.LinearSchedule(peak_lr=self.peak_lr, warmup_steps=self.warmup_steps,
                                           decay_steps=self.decay_steps, end_lr=self.end_lr)


@dataclass
class OptimizerState(_AsDict):
    """GetOptimizer/SetOptimizer: what the next step will do. `schedule` is None for a constant rate."""
    optimizer: str
    learning_rate: float
    schedule: LinearSchedule | None
    schedule_position: int
    clip_grad_norm: float
    step: int
    accumulated_batches: int


@dataclass
class CheckpointInfo(_AsDict):
    """A checkpoint in the server's data directory; reason is "manual", "auto" or "shutdown"."""
    name: str
    step: int
    created_unix: float
    size_bytes: int
    reason: str


@dataclass
class CheckpointList(_AsDict):
    """ListCheckpoints: the complete checkpoints, oldest first, and the newest one's name ("" if none).

    Unpacks like a pair: `checkpoints, latest = client.list_checkpoints()`.
    """
    checkpoints: list[CheckpointInfo]
    latest: str

    def __iter__(self):
        return iter((self.checkpoints, self.latest))


@dataclass
class GraphNode(_AsDict):
    """A node of the training graph: name, (domain-qualified) op type, input and output tensor names."""
    name: str
    op_type: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"{self.name} ({self.op_type})"


@dataclass
class QkvPartGradient(_AsDict):
    """Where the q, k or v part of a fused qkv projection gets its gradient."""
    part: str
    tensor: str
    gradient_tensor: str
    gradient_node: GraphNode | None


@dataclass
class ParameterGradientPath(_AsDict):
    """How one trainable parameter's gradient is computed (ExplainGradients)."""
    name: str
    shape: tuple[int, ...]
    block: int
    sublayer: str
    gradient_tensor: str
    gradient_node: GraphNode | None
    ops_from_loss: int
    path: list[GraphNode] = field(default_factory=list)
    qkv_parts: list[QkvPartGradient] = field(default_factory=list)


@dataclass
class Explanation(_AsDict):
    """ExplainGradients: the loss node, the node that starts backpropagation, and each parameter's gradient path."""
    loss: GraphNode | None
    loss_gradient: GraphNode | None
    parameters: list[ParameterGradientPath]
    forward_nodes: int
    backward_nodes: int

    def parameter(self, name: str) -> ParameterGradientPath:
        """The entry for parameter `name` (KeyError when absent)."""
        for p in self.parameters:
            if p.name == name:
                return p
        raise KeyError(name)


def _f32(x: float) -> float:
    """A float32 proto value as the short decimal it was written as (0.485, not 0.48500001)."""
    return float(f"{x:.7g}")


def _model_info_from_proto(m: vitserve_pb2.ModelInfo) -> ModelInfo:
    p = m.preprocessing
    return ModelInfo(
        name=m.name,
        config=json.loads(m.config_json) if m.config_json else {},
        input_name=m.input_name,
        input_shape=tuple(m.input_shape),
        input_dtype=vitserve_pb2.DataType.Name(m.input_dtype),
        preprocessing={"height": p.height, "width": p.width, "channels": p.channels,
                       "mean": [_f32(v) for v in p.mean], "std": [_f32(v) for v in p.std]},
        class_names=list(m.class_names),
        parameters=[{"name": q.name, "shape": tuple(q.shape), "trainable": q.trainable}
                    for q in m.parameters],
        execution_providers=list(m.execution_providers),
        device=m.device,
        opset=m.opset,
        optimizer=m.optimizer,
        step=m.step,
        learning_rate=m.learning_rate,
        max_batch_size=m.max_batch_size,
        export_versions=dict(m.export_versions),
        loss_node=m.loss_node,
        loss_op_type=m.loss_op_type,
        model_version=m.model_version,
        versions=[_from_proto(ModelVersion, v) for v in m.versions],
        checkpoint_every_steps=m.checkpoint_every_steps,
        checkpoint_every_seconds=m.checkpoint_every_seconds,
        publish_every_steps=m.publish_every_steps,
    )


def _from_proto(cls: type, message: Any, **overrides: Any) -> Any:
    """Build dataclass `cls` from the same-named fields of a proto message."""
    values = {f.name: getattr(message, f.name) for f in dataclasses.fields(cls)
              if f.name not in overrides}
    return cls(**values, **overrides)


def _node_from_proto(node: vitserve_pb2.GraphNode) -> GraphNode:
    return GraphNode(name=node.name, op_type=node.op_type, inputs=list(node.inputs), outputs=list(node.outputs))


def _optional_node(message: Any, name: str) -> GraphNode | None:
    """The GraphNode in `message.<name>`, or None when the server left it unset."""
    return _node_from_proto(getattr(message, name)) if message.HasField(name) else None


def _explanation_from_proto(r: vitserve_pb2.ExplainGradientsResponse) -> Explanation:
    parameters = []
    for p in r.parameters:
        parts = [_from_proto(QkvPartGradient, q, gradient_node=_optional_node(q, "gradient_node"))
                 for q in p.qkv_parts]
        parameters.append(_from_proto(ParameterGradientPath, p, shape=tuple(p.shape),
                                      gradient_node=_optional_node(p, "gradient_node"),
                                      path=[_node_from_proto(n) for n in p.path], qkv_parts=parts))
    return Explanation(loss=_optional_node(r, "loss"), loss_gradient=_optional_node(r, "loss_gradient"),
                       parameters=parameters, forward_nodes=r.forward_nodes, backward_nodes=r.backward_nodes)


def _optimizer_from_proto(r: vitserve_pb2.OptimizerState) -> OptimizerState:
    schedule = _from_proto(LinearSchedule, r.schedule) if r.HasField("schedule") else None
    return _from_proto(OptimizerState, r, schedule=schedule)


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
    """Class indices as an INT64 tensor; non-integer labels are rejected locally."""
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

    def model_info(self) -> ModelInfo:
        return _model_info_from_proto(self._call(self._stub.GetModelInfo,
                                                 vitserve_pb2.GetModelInfoRequest()))

    def predict(self, images: ImagesArg, top_k: int = 5, return_logits: bool = False) -> PredictResult:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        request = vitserve_pb2.PredictRequest(images=images_to_proto(images), top_k=top_k,
                                              return_logits=return_logits)
        response = self._call(self._stub.Predict, request)
        predictions = [[(s.index, s.label, s.probability) for s in p.top]
                       for p in response.predictions]
        logits = tensor_from_proto(response.logits) if response.HasField("logits") else None
        return PredictResult(predictions=predictions, logits=logits, model_version=response.model_version)

    def train_step(self, images: ImagesArg, labels: Any, summaries: bool = True,
                   accumulate_only: bool = False) -> TrainStepResult:
        """One training step; with accumulate_only the gradients are added up and the weights stay put
        until the next step without it."""
        request = vitserve_pb2.TrainStepRequest(images=images_to_proto(images),
                                                labels=labels_to_proto(labels),
                                                omit_gradient_summaries=not summaries,
                                                accumulate_only=accumulate_only)
        r = self._call(self._stub.TrainStep, request)
        gradients = [_from_proto(GradientSummary, g, shape=tuple(g.shape)) for g in r.gradients]
        attention = [_from_proto(QkvGradient, a, q_head_norms=tuple(a.q_head_norms),
                                 k_head_norms=tuple(a.k_head_norms),
                                 v_head_norms=tuple(a.v_head_norms)) for a in r.attention]
        return _from_proto(TrainStepResult, r, gradients=gradients, attention=attention)

    def eval_step(self, images: ImagesArg, labels: Any) -> EvalResult:
        """Loss and accuracy of the current training weights on a labelled batch; changes nothing."""
        request = vitserve_pb2.EvalStepRequest(images=images_to_proto(images), labels=labels_to_proto(labels))
        return _from_proto(EvalResult, self._call(self._stub.EvalStep, request))

    def get_optimizer(self) -> OptimizerState:
        return _optimizer_from_proto(self._call(self._stub.GetOptimizer, vitserve_pb2.GetOptimizerRequest()))

    def set_optimizer(self, learning_rate: float | None = None,
                      schedule: LinearSchedule | dict[str, Any] | None = None,
                      clip_grad_norm: float | None = None) -> OptimizerState:
        """Change the learning rate (constant), the schedule and/or clipping; None leaves a setting as it is."""
        request = vitserve_pb2.SetOptimizerRequest()
        if learning_rate is not None:
            request.learning_rate = float(learning_rate)
        if schedule is not None:
            request.schedule.CopyFrom(_schedule_arg(schedule).to_proto())
        if clip_grad_norm is not None:
            request.clip_grad_norm = float(clip_grad_norm)
        return _optimizer_from_proto(self._call(self._stub.SetOptimizer, request))

    def save_checkpoint(self, name: str = "") -> CheckpointInfo:
        """Write a checkpoint; "" lets the server name it manual-<step>. An existing name is replaced."""
        response = self._call(self._stub.SaveCheckpoint, vitserve_pb2.SaveCheckpointRequest(name=name))
        return _from_proto(CheckpointInfo, response)

    def list_checkpoints(self) -> CheckpointList:
        response = self._call(self._stub.ListCheckpoints, vitserve_pb2.ListCheckpointsRequest())
        return CheckpointList(checkpoints=[_from_proto(CheckpointInfo, c) for c in response.checkpoints],
                              latest=response.latest)

    def restore_checkpoint(self, name: str) -> CheckpointInfo:
        """Replace the training state with checkpoint `name`'s (ClientError NOT_FOUND when unknown)."""
        response = self._call(self._stub.RestoreCheckpoint, vitserve_pb2.RestoreCheckpointRequest(name=name))
        return _from_proto(CheckpointInfo, response)

    def publish(self) -> ModelVersion:
        """Make the current training weights the model Predict serves; returns the new version."""
        return _from_proto(ModelVersion, self._call(self._stub.Publish, vitserve_pb2.PublishRequest()))

    def explain(self, parameter: str = "") -> Explanation:
        """Where the loss and each trainable parameter's gradient are computed ("" for all parameters)."""
        request = vitserve_pb2.ExplainGradientsRequest(parameter=parameter)
        return _explanation_from_proto(self._call(self._stub.ExplainGradients, request))
