"""Typed Python client for the vitserve gRPC service (proto/vitserve.proto).

`ViTClient` wraps the VitServe stub: it turns numpy arrays and image files into
requests, turns responses into plain dataclasses, and turns every gRPC failure
into a `ClientError` carrying the status code name and the server's message.

Each dataclass is the client's schema of one proto message (MESSAGES) and is
built from it by one generic converter, `from_proto`: fields are read by name,
nested messages become the nested dataclasses of the type hints, repeated fields
the hint's list or tuple, enums their names where the hint is `str`, a Tensor a
numpy array. The few fields whose client shape differs say so in `field(metadata=wire(...))`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import operator
import os
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TypeVar, Union

import grpc
import numpy as np
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto import vitserve_pb2, vitserve_pb2_grpc
from proto.tensors import DTYPES, dtype_name, enum_of

DEFAULT_ADDRESS = "localhost:50051"
SERVICE = vitserve_pb2.DESCRIPTOR.services_by_name["VitServe"].full_name  # for health checks

ImageFile = Union[str, os.PathLike, bytes, bytearray, memoryview]
ImagesArg = Union[np.ndarray, ImageFile, Sequence[ImageFile]]
T = TypeVar("T")


class ClientError(Exception):
    """A failed RPC: `code` is the grpc.StatusCode name, `details` the server's message."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def tensor_to_proto(array: np.ndarray) -> vitserve_pb2.Tensor:
    """Encode an array as a Tensor in its own dtype (raw little-endian, C order)."""
    array = np.asarray(array)
    enum = enum_of(array.dtype)
    if enum is None:
        supported = ", ".join(str(d.newbyteorder("=")) for d in DTYPES.values())
        raise ValueError(f"unsupported tensor dtype {array.dtype}; supported: {supported}")
    data = np.ascontiguousarray(array, dtype=DTYPES[enum]).tobytes()
    return vitserve_pb2.Tensor(dtype=enum, shape=array.shape, data=data)


def tensor_from_proto(tensor: vitserve_pb2.Tensor) -> np.ndarray:
    """Decode a Tensor into a (writable, native byte order) numpy array."""
    if tensor.dtype not in DTYPES:
        raise ValueError(f"tensor has unsupported dtype {dtype_name(tensor.dtype)}")
    dtype = DTYPES[tensor.dtype]
    shape = tuple(tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(f"tensor of shape {list(shape)} needs {expected} bytes, got {len(tensor.data)}")
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def wire(name: str | None = None, *, convert: Callable[[Any], Any] | None = None) -> dict[str, Any]:
    """The metadata of a dataclass field whose client shape differs from its proto field (use as
    `field(metadata=wire(...))`): read from proto field `name` (default: the field's own name) and passed
    through `convert` instead of the generic conversion."""
    return {"wire": name, "convert": convert}


def wire_name(f: dataclasses.Field) -> str:
    """The proto field a dataclass field is read from."""
    return f.metadata.get("wire") or f.name


def _short_floats(values: Sequence[float]) -> list[float]:
    """float32 proto values as the short decimals they were written as (0.485, not 0.48500001)."""
    return [float(f"{v:.7g}") for v in values]


def _json_object(text: str) -> dict[str, Any]:
    return json.loads(text) if text else {}


def _top_classes(predictions: Sequence[vitserve_pb2.Prediction]) -> list[list[tuple[int, str, float]]]:
    """Per image, its (index, label, probability) ClassScores, best first."""
    return [[(s.index, s.label, s.probability) for s in p.top] for p in predictions]


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
class Preprocessing(_AsDict):
    """The schema of ModelInfo.preprocessing (a dict): resize to height x width (resize_shorter N > 0: the shorter
    side to N, then a centre crop of height x width) with the `interpolation` filter, then (pixel / 255 - mean) / std."""
    height: int
    width: int
    channels: int
    mean: list[float] = field(metadata=wire(convert=_short_floats))
    std: list[float] = field(metadata=wire(convert=_short_floats))
    resize_shorter: int = 0
    interpolation: str = field(default="bilinear", metadata=wire(convert=lambda name: name or "bilinear"))  # "": an older server


@dataclass
class ParameterInfo(_AsDict):
    """The schema of each ModelInfo.parameters entry (a dict): block -1 is outside the transformer blocks."""
    name: str
    shape: tuple[int, ...]
    trainable: bool
    block: int
    sublayer: str


@dataclass
class AttentionModule(_AsDict):
    """How one attention module makes q, k and v (fused: one weight named three times), found at export."""
    name: str
    block: int
    heads: int
    dim_head: int
    weights: list[str] = field(default_factory=list)
    biases: list[str] = field(default_factory=list)
    module: str = ""
    fused: bool = True


@dataclass
class UnplacedParameter(_AsDict):
    """A parameter the export could not place in a block and sub-layer, and why."""
    name: str
    reason: str


@dataclass
class ModelInfo(_AsDict):
    """GetModelInfo: the served model, how to feed it and its training state."""
    name: str
    config: dict[str, Any] = field(metadata=wire("config_json", convert=_json_object))
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
    attention: list[AttentionModule] = field(default_factory=list)
    unplaced: list[UnplacedParameter] = field(default_factory=list)
    role: str = "all"
    trainer: str = ""  # "ort" or "ort-training"; "" on an inference-only replica
    onnxruntime_version: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class PredictResult(_AsDict):
    """Predict: per image its top-k (index, label, probability), best first; the logits when asked for."""
    predictions: list[list[tuple[int, str, float]]] = field(metadata=wire(convert=_top_classes))
    logits: np.ndarray | None = None
    model_version: int = 0


@dataclass
class GradientSummary(_AsDict):
    """One trainable parameter's gradient in one step; block and sublayer place the parameter (-1: outside
    the transformer blocks)."""
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
    block: int = -1
    sublayer: str = "other"


@dataclass
class QkvGradient(_AsDict):
    """One attention module's q, k and v gradients, whole and head by head, for the weights and the biases
    (the bias fields are 0 / empty when the projections have no bias)."""
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
    module: str = ""
    weights: tuple[str, ...] = ()
    biases: tuple[str, ...] = ()
    q_bias_norm: float = 0.0
    k_bias_norm: float = 0.0
    v_bias_norm: float = 0.0
    q_bias_head_norms: tuple[float, ...] = ()
    k_bias_head_norms: tuple[float, ...] = ()
    v_bias_head_norms: tuple[float, ...] = ()


@dataclass
class HeadScores(_AsDict):
    """One attention module's head importance (Michel et al. 2019): per head, |dL/d xi_h| for a gate xi_h = 1
    multiplying that head's output, for the batch's mean loss."""
    block: int
    module: str
    importance: tuple[float, ...]


@dataclass
class TrainStepResult(_AsDict):
    """TrainStep: the loss, the update and, unless omitted, every trainable parameter's gradient summary."""
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
    head_importance: list[HeadScores] = field(default_factory=list)

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
class HeadImportanceResult(_AsDict):
    """HeadImportance: the batch's loss, the step of the weights used, and each attention module's head
    importance in block order. Changes nothing on the server."""
    loss: float
    step: int
    heads: list[HeadScores] = field(default_factory=list)

    def matrix(self) -> np.ndarray:
        """The importance as a [modules, heads] float array in block order (NaN pads modules with fewer heads)."""
        width = max((len(h.importance) for h in self.heads), default=0)
        out = np.full((len(self.heads), width), np.nan)
        for row, h in enumerate(self.heads):
            out[row, :len(h.importance)] = h.importance
        return out


@dataclass
class GradientHistory(_AsDict):
    """GetGradientHistory: the kept applied steps in the asked range, oldest first, each as TrainStep answered it
    (gradients and attention entries filtered by the parameter pattern), and how many steps the server keeps."""
    steps: list[TrainStepResult]
    capacity: int

    def parameters(self) -> list[str]:
        """The names of the parameters whose gradients the steps hold, in first-seen order."""
        return list(dict.fromkeys(g.name for step in self.steps for g in step.gradients))


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
        return vitserve_pb2.LinearSchedule(**dataclasses.asdict(self))


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
    """A checkpoint in the server's data directory; reason is "manual", "auto" or "shutdown"; problem says why a
    damaged one cannot be restored ("" when intact)."""
    name: str
    step: int
    created_unix: float
    size_bytes: int
    reason: str
    problem: str = ""


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


MESSAGES: dict[type, type[Message]] = {
    ModelVersion: vitserve_pb2.ModelVersion,
    Preprocessing: vitserve_pb2.Preprocessing,
    ParameterInfo: vitserve_pb2.ParameterInfo,
    AttentionModule: vitserve_pb2.AttentionModule,
    UnplacedParameter: vitserve_pb2.UnplacedParameter,
    ModelInfo: vitserve_pb2.ModelInfo,
    PredictResult: vitserve_pb2.PredictResponse,
    GradientSummary: vitserve_pb2.GradientSummary,
    QkvGradient: vitserve_pb2.QkvGradient,
    HeadScores: vitserve_pb2.HeadScores,
    TrainStepResult: vitserve_pb2.TrainStepResponse,
    HeadImportanceResult: vitserve_pb2.HeadImportanceResponse,
    GradientHistory: vitserve_pb2.GradientHistoryResponse,
    EvalResult: vitserve_pb2.EvalStepResponse,
    LinearSchedule: vitserve_pb2.LinearSchedule,
    OptimizerState: vitserve_pb2.OptimizerState,
    CheckpointInfo: vitserve_pb2.CheckpointInfo,
    CheckpointList: vitserve_pb2.ListCheckpointsResponse,
    GraphNode: vitserve_pb2.GraphNode,
    QkvPartGradient: vitserve_pb2.QkvPartGradient,
    ParameterGradientPath: vitserve_pb2.ParameterGradientPath,
    Explanation: vitserve_pb2.ExplainGradientsResponse,
}
"""Client dataclass -> the proto message it is built from (tests/test_client_schema.py checks them field by field)."""

_SCHEMAS = {message.DESCRIPTOR: cls for cls, message in MESSAGES.items()}  # message -> dataclass


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _without_none(hint: Any) -> Any:
    """X for `X | None`, else the hint itself."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return hint


def from_proto(cls: type[T], message: Message) -> T:
    """Dataclass `cls` (a key of MESSAGES) from its proto message, field by field."""
    fields, read = _readers(cls, message.DESCRIPTOR)
    values = read(message) if len(fields) > 1 else (read(message),)
    kwargs = {}
    for (name, wire, convert, optional), value in zip(fields, values):
        if optional and not message.HasField(wire):
            kwargs[name] = None  # an unset message: no schedule, no logits, an unreported node
        else:
            kwargs[name] = convert(value) if convert else value
    return cls(**kwargs)


@functools.cache
def _readers(cls: type, descriptor: Any) -> tuple[tuple[tuple[str, str, Callable[[Any], Any] | None, bool], ...],
                                                   Callable[[Message], Any]]:
    """How to read `cls` from its message, worked out once per class: per dataclass field (its name, its proto
    field, the converter or None for the value as it is, whether it is an optional message), and one
    getter of all the proto fields at once.

    The type hints and field descriptors are read here rather than for every message: a TrainStep answer
    holds a GradientSummary per parameter, and reading them per message cost ~4 ms a step (digits)."""
    fields = []
    for f in dataclasses.fields(cls):
        wire = wire_name(f)
        hint = _hints(cls)[f.name]
        if f.metadata.get("convert"):
            fields.append((f.name, wire, f.metadata["convert"], False))
        else:
            inner = _without_none(hint)
            fields.append((f.name, wire, _converter(inner, descriptor.fields_by_name[wire]), inner is not hint))
    return tuple(fields), operator.attrgetter(*(wire for _, wire, _, _ in fields))


def _converter(hint: Any, descriptor: Any) -> Callable[[Any], Any] | None:
    """One proto field's value -> the shape `hint` asks for (None: the value as it is)."""
    if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
        return dict
    if descriptor.is_repeated:
        container = typing.get_origin(hint)  # list or tuple
        element = _element(typing.get_args(hint)[0], descriptor)
        if element is None:
            return container
        return lambda values: container(map(element, values))
    return _element(hint, descriptor)


def _element(hint: Any, descriptor: Any) -> Callable[[Any], Any] | None:
    """A scalar as it is (None), an enum by name (for a str hint), a Tensor as an array, a message as its
    dataclass, or as that dataclass's dict for a dict hint."""
    if descriptor.enum_type is not None and hint is str:
        names = {number: value.name for number, value in descriptor.enum_type.values_by_number.items()}
        return lambda value: names.get(value, str(value))
    if descriptor.message_type is None:
        return None
    if descriptor.message_type is vitserve_pb2.Tensor.DESCRIPTOR:
        return tensor_from_proto
    if typing.get_origin(hint) is dict:
        schema = _SCHEMAS[descriptor.message_type]
        return lambda value: dataclasses.asdict(from_proto(schema, value))
    return lambda value: from_proto(hint, value)


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
            request.schedule.CopyFrom(_schedule_arg(schedule).to_proto())
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
