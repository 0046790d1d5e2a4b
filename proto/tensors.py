"""The one dtype table: vitserve.v1 DataType enum <-> little-endian numpy dtype, for the server and the client."""
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


def dtype_name(value: int) -> str:
    """The DataType name, or the raw number for a value this proto does not know."""
    return pb.DataType.Name(value) if value in pb.DataType.values() else str(value)


def enum_of(dtype: np.dtype) -> int | None:
    """The DataType of a numpy dtype (any byte order), or None when the wire has no such type."""
    for enum, wire in DTYPES.items():
        if dtype.kind == wire.kind and dtype.itemsize == wire.itemsize:
            return enum
    return None
