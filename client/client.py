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

from proto import vitserve_pb2, vitserve_pb2_grpc

DEFAULT_ADDRESS = "localhost:50051"

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

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class PredictResult(_AsDict):
    predictions: list[list[tuple[int, str, float]]]
    logits: np.ndarray | None = None


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
    )


def _from_proto(cls: type, message: Any, **overrides: Any) -> Any:
    """Build dataclass `cls` from the same-named fields of a proto message."""
    values = {f.name: getattr(message, f.name) for f in dataclasses.fields(cls)
              if f.name not in overrides}
    return cls(**values, **overrides)


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
                 max_message_mb: int = 64) -> None:
        self.address = address or self.default_address()
        self.timeout = timeout
        limit = max_message_mb * 1024 * 1024
        self._channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
        ])
        self._stub = vitserve_pb2_grpc.VitServeStub(self._channel)

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
            return method(request, timeout=self.timeout)
        except grpc.RpcError as e:
            code = e.code().name if hasattr(e, "code") and e.code() is not None else "UNKNOWN"
            details = (e.details() if hasattr(e, "details") else None) or str(e)
            raise ClientError(code, details) from e

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
        return PredictResult(predictions=predictions, logits=logits)

    def train_step(self, images: ImagesArg, labels: Any, summaries: bool = True) -> TrainStepResult:
        request = vitserve_pb2.TrainStepRequest(images=images_to_proto(images),
                                                labels=labels_to_proto(labels),
                                                omit_gradient_summaries=not summaries)
        r = self._call(self._stub.TrainStep, request)
        gradients = [_from_proto(GradientSummary, g, shape=tuple(g.shape)) for g in r.gradients]
        attention = [_from_proto(QkvGradient, a, q_head_norms=tuple(a.q_head_norms),
                                 k_head_norms=tuple(a.k_head_norms),
                                 v_head_norms=tuple(a.v_head_norms)) for a in r.attention]
        return _from_proto(TrainStepResult, r, gradients=gradients, attention=attention)
