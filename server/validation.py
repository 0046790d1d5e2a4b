"""Request validation against the model: raw bytes and encoded images in, checked numpy batches out.

Pure (numpy and Pillow through server.codec; no ONNX Runtime, no grpc), so it can be fuzzed on its
own (tests/fuzz). Every problem is an InvalidArgument whose message names it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server import codec
from server.errors import InvalidArgument
from server.manifest import Preprocessing


@dataclass(frozen=True)
class BatchValidator:
    input_shape: tuple[int, ...]  # (-1, C, H, W)
    num_classes: int
    max_batch_size: int
    preprocessing: Preprocessing

    def images_from_tensor(self, dtype_name: str, shape, data: bytes) -> np.ndarray:
        """A raw FLOAT32 (b, c, h, w) tensor, checked against the model's input (a view over `data`)."""
        if dtype_name != "FLOAT32":
            raise InvalidArgument(f"images: dtype must be FLOAT32 (normalized pixels), got {dtype_name}")
        expected = self.input_shape[1:]
        if len(shape) != 4 or tuple(shape[1:]) != expected:
            raise InvalidArgument(f"images: shape must be [batch, {', '.join(map(str, expected))}], got {list(shape)}")
        images = codec.decode_tensor("images", dtype_name, shape, data)
        self.check_batch(len(images))
        if not np.isfinite(images).all():
            bad = int(np.count_nonzero(~np.isfinite(images)))
            raise InvalidArgument(f"images: {bad} pixel values are NaN or Inf")
        return images

    def images_from_files(self, encoded: list[bytes]) -> np.ndarray:
        self.check_batch(len(encoded))
        return codec.decode_images(encoded, self.preprocessing)

    def labels_from_tensor(self, dtype_name: str, shape, data: bytes, batch: int) -> np.ndarray:
        if dtype_name != "INT64":
            raise InvalidArgument(f"labels: dtype must be INT64, got {dtype_name}")
        labels = codec.decode_tensor("labels", dtype_name, shape, data)
        if labels.shape != (batch,):
            raise InvalidArgument(f"labels: shape must be [{batch}] (one per image), got {list(labels.shape)}")
        out_of_range = labels[(labels < 0) | (labels >= self.num_classes)]
        if out_of_range.size:
            raise InvalidArgument(f"labels: must be in [0, {self.num_classes}), got {int(out_of_range[0])}")
        return labels

    def check_batch(self, size: int) -> None:
        if size == 0:
            raise InvalidArgument("images: the batch is empty")
        if size > self.max_batch_size:
            raise InvalidArgument(f"images: batch of {size} is over the maximum of {self.max_batch_size}")
