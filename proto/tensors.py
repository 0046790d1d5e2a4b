"""The one tensor codec: numpy <-> vitserve.v1 Tensor (dtype enum, shape, little-endian bytes in C order), for the
server and the client. Problems are ValueErrors; the server's decoder names the field they are about."""
from __future__ import annotations

import numpy as np

from proto import vitserve_pb2 as pb

DTYPES: dict[int, np.dtype] = {
    pb.FLOAT32: np.dtype("<f4"),
    pb.FLOAT64: np.dtype("<f8"),
    pb.FLOAT16: np.dtype("<f2"),
    pb.INT64: np.dtype("<i8"),
    pb.INT32: np.dtype("<i4"),
    pb.UINT8: np.dtype("u1"),
}
"""DataType value -> the numpy dtype of its bytes on the wire."""

DTYPES_BY_NAME = {pb.DataType.Name(enum): dtype for enum, dtype in DTYPES.items()}
"""DataType name -> the same dtypes (the KServe v2 path and the error messages speak in names)."""


def dtype_name(value: int) -> str:
    """The DataType name, or the raw number for a value this proto does not know."""
    return pb.DataType.Name(value) if value in pb.DataType.values() else str(value)


def enum_of(dtype: np.dtype) -> int | None:
    """The DataType of a numpy dtype (any byte order), or None when the wire has no such type."""
    for enum, wire in DTYPES.items():
        if dtype.kind == wire.kind and dtype.itemsize == wire.itemsize:
            return enum
    return None


def tensor_to_proto(array: np.ndarray) -> pb.Tensor:
    """Encode an array as a Tensor in its own dtype (raw little-endian, C order)."""
    array = np.asarray(array)
    enum = enum_of(array.dtype)
    if enum is None:
        supported = ", ".join(str(d.newbyteorder("=")) for d in DTYPES.values())
        raise ValueError(f"unsupported tensor dtype {array.dtype}; supported: {supported}")
    data = np.ascontiguousarray(array, dtype=DTYPES[enum]).tobytes()
    return pb.Tensor(dtype=enum, shape=array.shape, data=data)


def array_view(dtype: str, shape, data: bytes) -> np.ndarray:
    """A read-only view over `data` (no copy) with the DataType named `dtype` and the given shape; ValueError when
    the dtype is unknown, a dimension negative or the byte count not the shape's."""
    if dtype not in DTYPES_BY_NAME:
        raise ValueError(f"dtype {dtype} is not supported (use one of {', '.join(DTYPES_BY_NAME)})")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"shape {list(shape)} has a negative dimension")
    numpy_dtype = DTYPES_BY_NAME[dtype]
    expected = int(np.prod(shape, dtype=np.float64)) * numpy_dtype.itemsize if shape else numpy_dtype.itemsize
    if len(data) != expected:
        raise ValueError(f"{len(data)} bytes do not match shape {list(shape)} of {dtype} ({expected} bytes expected)")
    return np.frombuffer(data, dtype=numpy_dtype).reshape(shape)


def tensor_from_proto(tensor: pb.Tensor) -> np.ndarray:
    """Decode a Tensor into a (writable, native byte order) numpy array."""
    view = array_view(dtype_name(tensor.dtype), tensor.shape, tensor.data)
    return view.astype(view.dtype.newbyteorder("="))
