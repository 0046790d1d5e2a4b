"""Request payloads -> numpy: raw tensor bytes and encoded images. No grpc here; bad input raises InvalidArgument."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from server.errors import InvalidArgument
from server.manifest import Preprocessing

# DataType enum names of the proto -> little-endian numpy dtypes.
DTYPES = {
    "FLOAT32": np.dtype("<f4"),
    "FLOAT64": np.dtype("<f8"),
    "FLOAT16": np.dtype("<f2"),
    "INT64": np.dtype("<i8"),
    "INT32": np.dtype("<i4"),
    "UINT8": np.dtype("u1"),
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_IMAGE_PIXELS = 4096 * 4096  # an encoded image larger than this is refused before decoding (decompression bombs)
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def decode_tensor(what: str, dtype_name: str, shape, data: bytes) -> np.ndarray:
    """A read-only view over `data` (no copy) with the given dtype and shape.

    `what` names the field in error messages ("images", "labels").
    """
    if dtype_name not in DTYPES:
        raise InvalidArgument(f"{what}: dtype {dtype_name} is not supported (use one of {', '.join(DTYPES)})")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{what}: shape {list(shape)} has a negative dimension")
    dtype = DTYPES[dtype_name]
    expected = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize if shape else dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"{what}: {len(data)} bytes do not match shape {list(shape)} of {dtype_name} ({expected} bytes expected)")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def encode_tensor(array: np.ndarray) -> tuple[str, list[int], bytes]:
    """numpy -> (dtype name, shape, little-endian bytes)."""
    little = array.dtype.newbyteorder("<")
    return DTYPE_NAMES[little], list(array.shape), np.ascontiguousarray(array, dtype=little).tobytes()


def decode_images(encoded: list[bytes], prep: Preprocessing) -> np.ndarray:
    """Encoded files -> float32 (b, c, h, w): convert to L/RGB, resize (bilinear), scale to [0, 1], normalize."""
    mode = {1: "L", 3: "RGB"}[prep.channels]
    mean = np.asarray(prep.mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(prep.std, dtype=np.float32).reshape(-1, 1, 1)
    batch = np.empty((len(encoded), prep.channels, prep.height, prep.width), dtype=np.float32)
    for i, blob in enumerate(encoded):
        try:
            with Image.open(io.BytesIO(blob)) as image:  # lazy: only the header is read here
                if image.width * image.height > MAX_IMAGE_PIXELS:  # refuse before decoding (Pillow only warns
                    raise Image.DecompressionBombError  # below twice its own limit: a memory DoS)
                image = image.convert(mode)
                if image.size != (prep.width, prep.height):
                    image = image.resize((prep.width, prep.height), Image.Resampling.BILINEAR)
                pixels = np.asarray(image, dtype=np.float32)
        except Image.DecompressionBombError:
            raise InvalidArgument(f"image {i}: larger than {MAX_IMAGE_PIXELS} pixels") from None
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            raise InvalidArgument(f"image {i}: cannot be decoded as an image ({len(blob)} bytes): {e}") from None
        pixels = pixels.reshape(prep.height, prep.width, prep.channels).transpose(2, 0, 1)  # (c, h, w)
        batch[i] = (pixels / 255.0 - mean) / std
    return batch
