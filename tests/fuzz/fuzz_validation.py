"""Coverage-guided fuzz target (atheris) for request decoding and validation (server/decode.py).

    make fuzz                       # = python tests/fuzz/fuzz_validation.py tests/fuzz/corpus -max_total_time=60

`check(data)` is the property: whatever the bytes, decoding and validation either return a checked
batch or raise InvalidArgument, never anything else. libFuzzer keeps the inputs that reach new code in
tests/fuzz/corpus/; tests/test_fuzz_corpus.py replays every one of them (no atheris needed for that).
"""
from __future__ import annotations

import struct
import sys

import numpy as np

from engine.errors import InvalidArgument
from engine.manifest import Preprocessing
from server.decode import TrainingBatchValidator

DTYPE_NAMES = ["FLOAT32", "FLOAT64", "FLOAT16", "INT64", "INT32", "UINT8", "DATA_TYPE_UNSPECIFIED", "99"]
GRAY = TrainingBatchValidator((-1, 1, 8, 8), 10, 16, Preprocessing(8, 8, 1, (0.5,), (0.5,)))
RGB = TrainingBatchValidator((-1, 3, 8, 8), 10, 16, Preprocessing(8, 8, 3, (0.5,) * 3, (0.25,) * 3))


def _tensor_fields(data: bytes) -> tuple[str, list[int], bytes]:
    """dtype (1 byte), rank (1 byte), rank x int16 dims, then the payload."""
    dtype = DTYPE_NAMES[data[0] % len(DTYPE_NAMES)] if data else "FLOAT32"
    rank = data[1] % 6 if len(data) > 1 else 0
    dims_bytes = data[2:2 + 2 * rank].ljust(2 * rank, b"\0")
    shape = list(struct.unpack(f"<{rank}h", dims_bytes))
    return dtype, shape, data[2 + 2 * rank:]


def check(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    validator = RGB if data[0] & 0x80 else GRAY
    try:
        if mode == 0:
            images = validator.images_from_tensor(*_tensor_fields(rest))
            assert images.dtype == np.float32 and images.shape[1:] == validator.input_shape[1:]
            assert np.isfinite(images).all() and 0 < len(images) <= validator.max_batch_size
        elif mode == 1:
            batch = (rest[0] % 20) if rest else 0
            labels = validator.labels_from_tensor(*_tensor_fields(rest[1:]), batch=batch)
            assert labels.shape == (batch,) and ((labels >= 0) & (labels < 10)).all()
        else:
            blobs = rest.split(b"\xff\x00\xff")[:4] if mode == 2 else [rest]
            images = validator.images_from_files(blobs)
            assert images.shape == (len(blobs), *validator.input_shape[1:]) and np.isfinite(images).all()
    except InvalidArgument:
        pass


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
